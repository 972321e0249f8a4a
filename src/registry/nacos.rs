//! Nacos: `GET /nacos/v1/ns/instance/list` (or `/nacos/v2/ns/instance/list`, whose
//! answer is wrapped in `{code, message, data}`), polled every `refresh_interval`.
//!
//! Reference: Nacos Open API guide ("Query instances", v1 and v2) and its auth guide.
//! Query: `serviceName`, `groupName`, `namespaceId` (if set), the clusters (v1
//! `clusters=a,b`; v2 `clusterName=a,b`), `healthyOnly`. Each of `hosts[]` gives
//! `ip`, `port`, `weight` (a float: ×100 and rounded, so 0.5 → 50 and 1 → 100;
//! 0 = no traffic, skipped), `healthy` (false → unhealthy), `enabled` (false →
//! draining), `metadata`, `clusterName` (→ zone).
//!
//! Auth: with `username`/`password`, `POST /nacos/v1/auth/login` (form body) gives
//! `accessToken` and `tokenTtl` (seconds); the token goes in the `accessToken` query
//! parameter. It is renewed once 90 % of its TTL has passed (as Nacos' own client
//! does), and at once when Nacos answers 403 with a token that was accepted before.
//!
//! Nacos has no change token: the raw `hosts` array is hashed (FNV-1a) and an answer
//! with the same hash is `Unchanged` (`lastRefTime` outside the array changes on
//! every call). `reachProtectionThreshold: true` means Nacos found too few healthy
//! instances and reports unhealthy ones as healthy: the list is still used, the step
//! carries a warning, and such answers are never short-cut as unchanged so that each
//! one is logged and counted while it lasts.

use super::{
    encode_component, envoy_local_failure, excerpt, fnv64, HttpRequest, HttpResponse,
    RegistryError, ServiceRef, Step,
};
use crate::instance::Rejected;
use crate::instance::{self, Instance, State};
use crate::validate::{field_err, printable, ConfigError};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::Value;
use std::collections::BTreeMap;

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum NacosApi {
    /// `/nacos/v1/ns/instance/list`, the bare service object.
    #[default]
    V1,
    /// `/nacos/v2/ns/instance/list` (Nacos 2.2+), wrapped in `{code, message, data}`.
    V2,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct NacosConfig {
    /// Envoy cluster that reaches the Nacos server's HTTP API (port 8848).
    pub cluster: String,
    #[serde(default)]
    pub authority: Option<String>,
    /// Nacos service name; defaults to the registry-lb service name.
    #[serde(default)]
    pub service: Option<String>,
    #[serde(default = "default_nacos_group")]
    pub group: String,
    /// Namespace id (Nacos' default is `public`).
    #[serde(default)]
    pub namespace: Option<String>,
    /// Only instances of these Nacos clusters.
    #[serde(default)]
    pub clusters: Vec<String>,
    /// Ask Nacos for healthy instances only (`healthyOnly=true`).
    #[serde(default)]
    pub healthy_only: bool,
    #[serde(default)]
    pub api: NacosApi,
    /// With `password`: log in at `/nacos/v1/auth/login` and send `accessToken`.
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub password: Option<String>,
}

fn default_nacos_group() -> String {
    "DEFAULT_GROUP".to_string()
}

impl NacosConfig {
    /// `:authority` of registry calls: `authority`, else the cluster name.
    pub fn authority(&self) -> &str {
        self.authority.as_deref().unwrap_or(&self.cluster)
    }

    /// Checks what the types cannot; `at` names this source in errors
    /// (`services[0].sources[1].nacos`).
    pub fn validate(&self, at: &str) -> Result<(), ConfigError> {
        if self.cluster.is_empty() {
            return field_err(at, "cluster", "must name an Envoy cluster");
        }
        if self
            .service
            .as_deref()
            .is_some_and(|s| s.is_empty() || !printable(s))
        {
            return field_err(
                at,
                "service",
                "must be a non-empty name without control characters",
            );
        }
        if self.group.is_empty() || !printable(&self.group) {
            return field_err(
                at,
                "group",
                "must be a non-empty name without control characters",
            );
        }
        if self
            .namespace
            .as_deref()
            .is_some_and(|s| s.is_empty() || !printable(s))
        {
            return field_err(at, "namespace", "must be a non-empty namespace id");
        }
        for (k, c) in self.clusters.iter().enumerate() {
            if c.is_empty() || c.contains(',') || !printable(c) {
                return field_err(
                    at,
                    &format!("clusters[{k}]"),
                    "must be a non-empty Nacos cluster name without ','",
                );
            }
        }
        if self.username.is_some() != self.password.is_some() {
            return field_err(at, "username", "username and password go together");
        }
        if self.username.as_deref().is_some_and(str::is_empty) {
            return field_err(at, "username", "must not be empty");
        }
        Ok(())
    }
}

/// Nacos' default `tokenTtl` (seconds), used when a login answer has none.
const DEFAULT_TOKEN_TTL_S: u64 = 18_000;

#[derive(Debug)]
pub struct Nacos {
    cfg: NacosConfig,
    service: String,
    request_timeout_ms: u64,
    token: Option<Token>,
    pending: Pending,
    /// FNV-1a of the last `hosts` array applied; 0 = none.
    pub last_hash: u64,
}

#[derive(Debug, Clone)]
struct Token {
    value: String,
    /// Log in again from this time on (90 % of the TTL after the login was sent).
    renew_at_ms: u64,
    /// No list call has succeeded with it yet: a 403 then means "refused", not "expired".
    fresh: bool,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Pending {
    Login { sent_ms: u64 },
    List,
}

#[derive(Deserialize)]
struct LoginAnswer {
    #[serde(rename = "accessToken")]
    access_token: String,
    #[serde(default, rename = "tokenTtl")]
    token_ttl: Option<u64>,
}

#[derive(Deserialize)]
struct V2Answer<'a> {
    code: i64,
    #[serde(default)]
    message: Option<String>,
    #[serde(borrow, default)]
    data: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct ServiceInfo<'a> {
    #[serde(borrow, default)]
    hosts: Option<&'a RawValue>,
    #[serde(default, rename = "reachProtectionThreshold")]
    reach_protection_threshold: bool,
}

#[derive(Deserialize)]
struct Host {
    #[serde(default, rename = "instanceId")]
    instance_id: Option<String>,
    ip: String,
    port: i64,
    #[serde(default = "one")]
    weight: f64,
    #[serde(default = "yes")]
    healthy: bool,
    #[serde(default = "yes")]
    enabled: bool,
    #[serde(default, rename = "clusterName")]
    cluster_name: Option<String>,
    #[serde(default)]
    metadata: Option<BTreeMap<String, Value>>,
}

fn one() -> f64 {
    1.0
}
fn yes() -> bool {
    true
}

impl Nacos {
    pub fn new(svc: ServiceRef, cfg: &NacosConfig) -> Nacos {
        Nacos {
            service: cfg.service.clone().unwrap_or_else(|| svc.name.to_string()),
            cfg: cfg.clone(),
            request_timeout_ms: svc.request_timeout_ms,
            token: None,
            pending: Pending::List,
            last_hash: 0,
        }
    }

    fn credentials(&self) -> Option<(&str, &str)> {
        Some((self.cfg.username.as_deref()?, self.cfg.password.as_deref()?))
    }

    pub fn request(&mut self, now_ms: u64) -> HttpRequest {
        let renew = match &self.token {
            None => true,
            Some(t) => now_ms >= t.renew_at_ms,
        };
        let (method, path, headers, body) = match self.credentials() {
            Some((user, pass)) if renew => {
                let body = format!(
                    "username={}&password={}",
                    encode_component(user),
                    encode_component(pass)
                );
                self.pending = Pending::Login { sent_ms: now_ms };
                let headers = vec![
                    (
                        "content-type".to_string(),
                        "application/x-www-form-urlencoded".to_string(),
                    ),
                    ("accept".to_string(), "application/json".to_string()),
                ];
                (
                    "POST",
                    "/nacos/v1/auth/login".to_string(),
                    headers,
                    body.into_bytes(),
                )
            }
            _ => {
                self.pending = Pending::List;
                (
                    "GET",
                    self.list_path(),
                    vec![("accept".to_string(), "application/json".to_string())],
                    Vec::new(),
                )
            }
        };
        HttpRequest {
            cluster: self.cfg.cluster.clone(),
            method,
            authority: self.cfg.authority().to_string(),
            path,
            headers,
            body,
            timeout_ms: self.request_timeout_ms,
        }
    }

    fn list_path(&self) -> String {
        let (path, clusters_param) = match self.cfg.api {
            NacosApi::V1 => ("/nacos/v1/ns/instance/list", "clusters"),
            NacosApi::V2 => ("/nacos/v2/ns/instance/list", "clusterName"),
        };
        let mut q = vec![
            format!("serviceName={}", encode_component(&self.service)),
            format!("groupName={}", encode_component(&self.cfg.group)),
        ];
        if let Some(ns) = &self.cfg.namespace {
            q.push(format!("namespaceId={}", encode_component(ns)));
        }
        if !self.cfg.clusters.is_empty() {
            q.push(format!(
                "{clusters_param}={}",
                encode_component(&self.cfg.clusters.join(","))
            ));
        }
        q.push(format!("healthyOnly={}", self.cfg.healthy_only));
        if let Some(t) = &self.token {
            q.push(format!("accessToken={}", encode_component(&t.value)));
        }
        format!("{path}?{}", q.join("&"))
    }

    pub fn on_response(&mut self, resp: &HttpResponse) -> Result<Step, RegistryError> {
        if let Some(e) = envoy_local_failure(resp) {
            return Err(e);
        }
        match self.pending {
            Pending::Login { sent_ms } => self.on_login(resp, sent_ms),
            Pending::List => match resp.status {
                200 => {
                    let step = self.on_list(resp.body)?;
                    if let Some(t) = &mut self.token {
                        t.fresh = false;
                    }
                    Ok(step)
                }
                401 | 403 if self.token.as_ref().is_some_and(|t| !t.fresh) => {
                    // "token expired!" / "token invalid!": log in again right away.
                    self.token = None;
                    Ok(Step::Again("token_expired"))
                }
                401 | 403 => {
                    let had_token = self.token.take().is_some();
                    let why = if had_token {
                        "refused a token it just issued"
                    } else {
                        "requires authentication"
                    };
                    Err(RegistryError::Auth(format!(
                        "nacos {why}: {} {}",
                        resp.status,
                        excerpt(resp.body)
                    )))
                }
                s => Err(RegistryError::Status(s, excerpt(resp.body))),
            },
        }
    }

    fn on_login(&mut self, resp: &HttpResponse, sent_ms: u64) -> Result<Step, RegistryError> {
        let user = self.cfg.username.as_deref().unwrap_or("");
        if resp.status != 200 {
            self.token = None;
            return Err(RegistryError::Auth(format!(
                "login as `{user}` failed: {} {}",
                resp.status,
                excerpt(resp.body)
            )));
        }
        let a: LoginAnswer = serde_json::from_slice(resp.body)
            .map_err(|e| RegistryError::Malformed(format!("nacos login answer: {e}")))?;
        if a.access_token.is_empty() {
            return Err(RegistryError::Auth(format!(
                "login as `{user}` gave an empty accessToken"
            )));
        }
        let ttl_ms = a
            .token_ttl
            .unwrap_or(DEFAULT_TOKEN_TTL_S)
            .saturating_mul(1000);
        self.token = Some(Token {
            value: a.access_token,
            renew_at_ms: sent_ms.saturating_add(ttl_ms - ttl_ms / 10),
            fresh: true,
        });
        Ok(Step::Again("login"))
    }

    fn on_list(&mut self, body: &[u8]) -> Result<Step, RegistryError> {
        let malformed =
            |e: serde_json::Error| RegistryError::Malformed(format!("nacos instance list: {e}"));
        let info: ServiceInfo = match self.cfg.api {
            NacosApi::V1 => serde_json::from_slice(body).map_err(malformed)?,
            NacosApi::V2 => {
                let w: V2Answer = serde_json::from_slice(body).map_err(malformed)?;
                if w.code != 0 {
                    let msg = instance::truncate(w.message.as_deref().unwrap_or(""), 160);
                    return Err(RegistryError::Status(
                        200,
                        format!("nacos code {}: {msg}", w.code),
                    ));
                }
                let data = w.data.ok_or_else(|| {
                    RegistryError::Malformed("nacos v2 answer without `data`".into())
                })?;
                serde_json::from_str(data.get()).map_err(malformed)?
            }
        };
        let hosts = info.hosts.ok_or_else(|| {
            RegistryError::Malformed("nacos instance list without `hosts`".into())
        })?;
        let hash = fnv64(hosts.get().as_bytes());
        if hash == self.last_hash && !info.reach_protection_threshold {
            return Ok(Step::Unchanged);
        }
        let raw: Vec<Value> = serde_json::from_str(hosts.get())
            .map_err(|e| RegistryError::Malformed(format!("nacos `hosts` is not a list: {e}")))?;
        let (instances, rejected) = parse_hosts(raw);
        let mut warnings = Vec::new();
        if info.reach_protection_threshold {
            warnings.push(format!(
                "nacos reports reachProtectionThreshold for `{}`: too few healthy instances, so it lists unhealthy ones as healthy",
                instance::truncate(&self.service, 64)
            ));
        }
        self.last_hash = hash;
        Ok(Step::Instances {
            instances,
            rejected,
            warnings,
        })
    }

    pub fn token(&self) -> String {
        self.last_hash.to_string()
    }

    pub fn restore_token(&mut self, token: &str) {
        self.last_hash = token.parse().unwrap_or(0);
    }
}

fn parse_hosts(raw: Vec<Value>) -> (Vec<Instance>, Rejected) {
    // Not sized by the entry count: entries may be 2-byte junk that becomes no
    // instance, and room for ~100-byte instances per entry was 48x the answer's size.
    let mut out = Vec::new();
    let mut rejected = Rejected::default();
    for (i, v) in raw.into_iter().enumerate() {
        let h: Host = match serde_json::from_value(v) {
            Ok(h) => h,
            Err(e) => {
                rejected.push(format!("host #{i}: {e}"));
                continue;
            }
        };
        let name = || instance::truncate(h.instance_id.as_deref().unwrap_or(&h.ip), 96);
        let addr = match instance::socket_addr(&h.ip, h.port) {
            Ok(a) => a,
            Err(e) => {
                rejected.push(format!("instance `{}`: {e}", name()));
                continue;
            }
        };
        if !h.weight.is_finite() || h.weight < 0.0 {
            rejected.push(format!(
                "instance `{}`: weight {} is not a non-negative number",
                name(),
                h.weight
            ));
            continue;
        }
        // Nacos weights are floats (default 1.0, range 0..10000): keep two decimals.
        let scaled = (h.weight * 100.0).round();
        if h.weight == 0.0 {
            continue;
        }
        let weight = if scaled >= f64::from(u32::MAX) {
            u32::MAX
        } else {
            (scaled as u32).max(1)
        };
        let mut inst = Instance::new(addr, weight);
        inst.state = if !h.enabled {
            State::Draining
        } else if !h.healthy {
            State::Unhealthy
        } else {
            State::Healthy
        };
        inst.zone = h.cluster_name.unwrap_or_default();
        inst.metadata = h
            .metadata
            .unwrap_or_default()
            .into_iter()
            .map(|(k, v)| {
                let text = match v {
                    Value::String(s) => s,
                    Value::Null => String::new(),
                    other => other.to_string(),
                };
                (k, text)
            })
            .collect();
        out.push(inst);
    }
    (out, rejected)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::SourceConfig;
    use crate::registry::test_util::one_source;
    use crate::registry::test_util::{resp, service, NOT_AN_ANSWER};
    use wasm_bindgen_test::wasm_bindgen_test;

    const V1_LIST: &str = include_str!("../../tests/fixtures/nacos/v1_instance_list.json");
    const V2_LIST: &str = include_str!("../../tests/fixtures/nacos/v2_instance_list.json");
    const LOGIN: &str = include_str!("../../tests/fixtures/nacos/v1_auth_login.json");
    const LOGIN_TOKEN: &str = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJuYWNvcyIsImV4cCI6MTYwNTYyOTE2Nn0.2TogGhhr11_vLEjqKko1HJHUJEmsPuCxkur-CfNojDo";

    fn nacos(extra: &str) -> Nacos {
        let svc = service("web", "nacos", "nacos", extra);
        match &svc.sources[0] {
            SourceConfig::Nacos(n) => Nacos::new(svc.for_registry(), n),
            _ => unreachable!(),
        }
    }

    fn instances(step: Step) -> (Vec<Instance>, Rejected, Vec<String>) {
        match step {
            Step::Instances {
                instances,
                rejected,
                warnings,
            } => (instances, rejected, warnings),
            other => panic!("expected instances, got {other:?}"),
        }
    }

    fn list(hosts: &str, protection: bool) -> String {
        format!(
            r#"{{"name":"DEFAULT_GROUP@@web","groupName":"DEFAULT_GROUP","clusters":"","cacheMillis":10000,"hosts":[{hosts}],
               "lastRefTime":1700000000000,"checksum":"","allIPs":false,"reachProtectionThreshold":{protection},"valid":true}}"#
        )
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn list_request_carries_every_parameter() {
        let mut n = nacos("");
        let r = n.request(0);
        assert_eq!(
            (r.method, r.cluster.as_str(), r.authority.as_str()),
            ("GET", "nacos", "nacos")
        );
        assert_eq!(
            r.path,
            "/nacos/v1/ns/instance/list?serviceName=web&groupName=DEFAULT_GROUP&healthyOnly=false"
        );
        let mut n = nacos(
            r#","service":"nacos.test.1","group":"my group","namespace":"dev","clusters":["a","b"],"healthy_only":true"#,
        );
        assert_eq!(
            n.request(0).path,
            "/nacos/v1/ns/instance/list?serviceName=nacos.test.1&groupName=my%20group&namespaceId=dev&clusters=a%2Cb&healthyOnly=true"
        );
        let mut n = nacos(r#","api":"v2","clusters":["a"]"#);
        assert_eq!(
            n.request(0).path,
            "/nacos/v2/ns/instance/list?serviceName=web&groupName=DEFAULT_GROUP&clusterName=a&healthyOnly=false"
        );
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn parses_the_documented_v1_answer() {
        let mut n = nacos(r#","service":"nacos.test.1""#);
        n.request(0);
        let (list, rejected, warnings) = instances(n.on_response(&resp(200, V1_LIST)).unwrap());
        assert!(rejected.is_empty() && warnings.is_empty());
        assert_eq!(list.len(), 1);
        let i = &list[0];
        assert_eq!(i.addr.to_string(), "10.10.10.10:8888");
        assert_eq!(i.weight, 100, "weight 1 scaled by 100");
        assert_eq!(i.state, State::Unhealthy, "healthy: false");
        assert_eq!(i.zone, "DEFAULT");
        assert!(i.metadata.is_empty());
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn parses_the_documented_v2_answer_and_skips_the_same_hosts() {
        let mut n = nacos(r#","api":"v2""#);
        n.request(0);
        let (list, _, _) = instances(n.on_response(&resp(200, V2_LIST)).unwrap());
        assert_eq!(list[0].addr.to_string(), "127.0.0.1:8080");
        assert_eq!((list[0].weight, list[0].state), (100, State::Healthy));
        assert_eq!(
            list[0].metadata,
            vec![("value".to_string(), "1".to_string())]
        );
        // Only lastRefTime moved: the hosts hash is the same.
        let later = V2_LIST.replace("1662554390814", "1662554399999");
        n.request(10);
        assert_eq!(n.on_response(&resp(200, &later)).unwrap(), Step::Unchanged);
        // A v1 body read as v2 is malformed, not a panic.
        n.request(20);
        assert_eq!(
            n.on_response(&resp(200, V1_LIST)).unwrap_err().kind(),
            "malformed"
        );
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn v2_error_codes_are_failures() {
        let mut n = nacos(r#","api":"v2""#);
        n.request(0);
        let body = r#"{"code":20004,"message":"service not found: public@@DEFAULT_GROUP@@web","data":null}"#;
        let e = n.on_response(&resp(200, body)).unwrap_err();
        assert_eq!(
            e,
            RegistryError::Status(
                200,
                "nacos code 20004: service not found: public@@DEFAULT_GROUP@@web".into()
            )
        );
        n.request(0);
        let e = n.on_response(&resp(500, body)).unwrap_err();
        assert_eq!(e.kind(), "status");
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn weights_health_enabled_and_bad_hosts() {
        let hosts = r#"
          {"instanceId":"a","ip":"10.0.0.1","port":80,"weight":0.5,"healthy":true,"enabled":true,"clusterName":"z1","metadata":{"v":"1","n":2}},
          {"instanceId":"b","ip":"10.0.0.2","port":80,"weight":3,"healthy":true,"enabled":false,"clusterName":"z1"},
          {"instanceId":"c","ip":"10.0.0.3","port":80,"weight":0.0,"healthy":true,"enabled":true},
          {"instanceId":"d","ip":"web-d.internal","port":80,"weight":1,"healthy":true,"enabled":true},
          {"instanceId":"e","ip":"10.0.0.5","port":"eighty","weight":1},
          {"instanceId":"f","ip":"10.0.0.6","port":80,"weight":-2},
          {"ip":"10.0.0.7","port":81,"weight":0.001},
          {"ip":"10.0.0.8","port":82,"weight":10000},
          {"ip":"10.0.0.9","port":0}"#;
        let mut n = nacos("");
        n.request(0);
        let (list, rejected, _) =
            instances(n.on_response(&resp(200, &list(hosts, false))).unwrap());
        let got: Vec<(String, u32, State)> = list
            .iter()
            .map(|i| (i.addr.to_string(), i.weight, i.state))
            .collect();
        assert_eq!(
            got,
            [
                ("10.0.0.1:80".to_string(), 50, State::Healthy),
                ("10.0.0.2:80".to_string(), 300, State::Draining),
                ("10.0.0.7:81".to_string(), 1, State::Healthy),
                (
                    "10.0.0.8:82".to_string(),
                    instance::MAX_WEIGHT,
                    State::Healthy
                ),
            ]
        );
        assert_eq!(list[0].zone, "z1");
        assert_eq!(
            list[0].metadata,
            vec![
                ("n".to_string(), "2".to_string()),
                ("v".to_string(), "1".to_string())
            ]
        );
        assert_eq!(rejected.len(), 4, "{rejected:?}");
        assert!(
            rejected[0].starts_with("instance `d`: address `web-d.internal` is not an IP literal"),
            "{rejected:?}"
        );
        assert!(
            rejected[1].starts_with("host #4: invalid type"),
            "{rejected:?}"
        );
        assert!(rejected[2].contains("weight -2"), "{rejected:?}");
        assert!(rejected[3].contains("port 0"), "{rejected:?}");
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn protection_threshold_is_used_with_a_warning_every_time() {
        let hosts = r#"{"ip":"10.0.0.1","port":80,"weight":1,"healthy":true,"enabled":true},
                       {"ip":"10.0.0.2","port":80,"weight":1,"healthy":true,"enabled":true}"#;
        let mut n = nacos("");
        for t in 0..2 {
            n.request(t);
            let (list, _, warnings) =
                instances(n.on_response(&resp(200, &list(hosts, true))).unwrap());
            assert_eq!(list.len(), 2);
            assert_eq!(warnings.len(), 1);
            assert!(
                warnings[0].contains("reachProtectionThreshold"),
                "{warnings:?}"
            );
        }
        // Back to normal with the very same hosts: nothing new, no warning.
        n.request(2);
        assert_eq!(
            n.on_response(&resp(200, &list(hosts, false))).unwrap(),
            Step::Unchanged
        );
        // Protection reached again: reported although the hosts did not change.
        n.request(3);
        let (_, _, warnings) = instances(n.on_response(&resp(200, &list(hosts, true))).unwrap());
        assert_eq!(warnings.len(), 1);
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn login_renews_before_the_ttl_and_on_403() {
        let mut n = nacos(r#","username":"nacos","password":"p&ss =w%rd""#);
        let r = n.request(1_000);
        assert_eq!(
            (r.method, r.path.as_str()),
            ("POST", "/nacos/v1/auth/login")
        );
        assert_eq!(
            String::from_utf8(r.body).unwrap(),
            "username=nacos&password=p%26ss%20%3Dw%25rd"
        );
        assert!(r.headers.contains(&(
            "content-type".into(),
            "application/x-www-form-urlencoded".into()
        )));
        assert_eq!(
            n.on_response(&resp(200, LOGIN)).unwrap(),
            Step::Again("login")
        );

        let r = n.request(1_010);
        assert_eq!(r.method, "GET");
        assert!(
            r.path.ends_with(&format!("&accessToken={LOGIN_TOKEN}")),
            "{}",
            r.path
        );
        instances(n.on_response(&resp(200, V1_LIST)).unwrap());

        // tokenTtl 18000 s: still good at 90 % minus a millisecond, renewed at 90 %.
        let renew_at = 1_000 + 18_000_000 * 9 / 10;
        assert_eq!(n.request(renew_at - 1).method, "GET");
        assert_eq!(n.on_response(&resp(200, V1_LIST)).unwrap(), Step::Unchanged);
        assert_eq!(n.request(renew_at).path, "/nacos/v1/auth/login");
        let short = r#"{"accessToken":"t2","tokenTtl":10,"globalAdmin":false}"#;
        assert_eq!(
            n.on_response(&resp(200, short)).unwrap(),
            Step::Again("login")
        );
        assert!(n.request(renew_at + 1).path.ends_with("&accessToken=t2"));
        assert_eq!(n.on_response(&resp(200, V1_LIST)).unwrap(), Step::Unchanged);
        assert_eq!(
            n.request(renew_at + 9_000).path,
            "/nacos/v1/auth/login",
            "10 s TTL renewed after 9 s"
        );
        n.on_response(&resp(200, short)).unwrap();
        n.request(renew_at + 9_001);
        n.on_response(&resp(200, V1_LIST)).unwrap();

        // A token that worked, then 403 (e.g. the server restarted with a new secret):
        // log in again at once.
        n.request(renew_at + 9_002);
        assert_eq!(
            n.on_response(&resp(403, "token expired!")).unwrap(),
            Step::Again("token_expired")
        );
        assert_eq!(n.request(renew_at + 9_003).path, "/nacos/v1/auth/login");
        n.on_response(&resp(200, short)).unwrap();
        // A fresh token refused at once is an auth failure, not a loop.
        n.request(renew_at + 9_004);
        let e = n.on_response(&resp(403, "token invalid!")).unwrap_err();
        assert_eq!(e.kind(), "auth");
        assert!(
            e.to_string().contains("refused a token it just issued"),
            "{e}"
        );
        assert_eq!(n.request(renew_at + 9_005).path, "/nacos/v1/auth/login");
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn login_failures() {
        let mut n = nacos(r#","username":"nacos","password":"wrong""#);
        n.request(0);
        let e = n.on_response(&resp(403, "unknown user!")).unwrap_err();
        assert_eq!(
            e,
            RegistryError::Auth("login as `nacos` failed: 403 unknown user!".into())
        );
        n.request(0);
        assert_eq!(
            n.on_response(&resp(200, "<html>")).unwrap_err().kind(),
            "malformed"
        );
        n.request(0);
        assert_eq!(
            n.on_response(&resp(200, r#"{"accessToken":"","tokenTtl":5}"#))
                .unwrap_err()
                .kind(),
            "auth"
        );
        // Without credentials, a 403 is an auth failure.
        let mut n = nacos("");
        n.request(0);
        assert_eq!(
            n.on_response(&resp(403, "user not found!"))
                .unwrap_err()
                .kind(),
            "auth"
        );
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn malformed_bodies_are_errors_not_panics() {
        for body in NOT_AN_ANSWER.into_iter().chain([
            r#"{"hosts":null}"#,
            r#"{"hosts":{}}"#,
            r#"{"hosts":"x"}"#,
            r#"{"hosts":[],"reachProtectionThreshold":"no"}"#,
        ]) {
            let mut n = nacos("");
            n.request(0);
            assert_eq!(
                n.on_response(&resp(200, body)).unwrap_err().kind(),
                "malformed",
                "{body}"
            );
            assert_eq!(n.last_hash, 0);
        }
        for body in [
            "",
            "{}",
            r#"{"code":0}"#,
            r#"{"code":0,"data":{"hosts":5}}"#,
            r#"{"code":"0","data":{}}"#,
        ] {
            let mut n = nacos(r#","api":"v2""#);
            n.request(0);
            assert_eq!(
                n.on_response(&resp(200, body)).unwrap_err().kind(),
                "malformed",
                "v2 {body}"
            );
        }
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn the_hash_is_carried_to_another_poller() {
        let mut a = nacos("");
        a.request(0);
        a.on_response(&resp(200, V1_LIST)).unwrap();
        let mut b = nacos("");
        b.restore_token(&a.token());
        b.request(0);
        assert_eq!(b.on_response(&resp(200, V1_LIST)).unwrap(), Step::Unchanged);
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn nacos_source_defaults_and_options() {
        let c = one_source(r#"{"nacos":{"cluster":"nacos"}}"#).unwrap();
        let SourceConfig::Nacos(n) = &c.services[0].sources[0] else {
            panic!()
        };
        assert_eq!(
            (n.group.as_str(), n.api, n.healthy_only, n.authority()),
            ("DEFAULT_GROUP", NacosApi::V1, false, "nacos")
        );
        assert_eq!(
            (
                n.service.as_deref(),
                n.namespace.as_deref(),
                n.clusters.len()
            ),
            (None, None, 0)
        );
        let c = one_source(
            r#"{"nacos":{"cluster":"nacos","authority":"nacos.local","service":"svc","group":"G","namespace":"dev",
                "clusters":["a","b"],"healthy_only":true,"api":"v2","username":"nacos","password":"pw"}}"#,
        )
        .unwrap();
        let SourceConfig::Nacos(n) = &c.services[0].sources[0] else {
            panic!()
        };
        assert_eq!(n.api, NacosApi::V2);
        assert_eq!(n.clusters, ["a", "b"]);
        assert_eq!(c.services[0].sources[0].kind(), "nacos");
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn nacos_errors_name_the_field() {
        for (src, want) in [
            (
                r#"{"nacos":{"cluster":""}}"#,
                "services[0].sources[0].nacos.cluster: must name",
            ),
            (
                r#"{"nacos":{"cluster":"n","api":"v3"}}"#,
                "services[0].sources[0].nacos.api: unknown variant `v3`",
            ),
            (
                r#"{"nacos":{"cluster":"n","username":"u"}}"#,
                "services[0].sources[0].nacos.username: username and password go together",
            ),
            (
                r#"{"nacos":{"cluster":"n","clusters":["a,b"]}}"#,
                "services[0].sources[0].nacos.clusters[0]: ",
            ),
            (
                r#"{"nacos":{"cluster":"n","group":""}}"#,
                "services[0].sources[0].nacos.group: ",
            ),
            (
                r#"{"nacos":{"cluster":"n","namespace":""}}"#,
                "services[0].sources[0].nacos.namespace: ",
            ),
            (
                r#"{"nacos":{"cluster":"n","healthy":true}}"#,
                "services[0].sources[0].nacos.healthy: unknown field `healthy`",
            ),
        ] {
            let e = one_source(src).unwrap_err();
            assert!(e.0.starts_with(want), "{src}: {}", e.0);
        }
    }
}
