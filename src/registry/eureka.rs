//! Eureka: `GET <path_prefix>/apps` (every application, one call shared by all the
//! services an Envoy reads from one Eureka) or `GET <path_prefix>/apps/<APP>`, with
//! `Accept: application/json`, polled every `refresh_interval` (30s by default for a
//! service fed only by Eureka: the server answers both from a response cache it
//! refreshes every 30s, `eureka.server.responseCacheUpdateIntervalMs`).
//!
//! `fetch`: `auto` (default) reads `/apps` when two or more services of the
//! configuration read the same Eureka (same cluster, prefix and credentials) — one
//! request per interval for all of them, as Eureka's own clients fetch — and
//! `/apps/<APP>` when only one does (fewer bytes for the same one request); `all` and
//! `app` force either. `/apps/delta` is left out: applying deltas needs the full
//! list kept between calls and Eureka's hash-code check, for a saving in bytes only.
//!
//! Reference: Netflix Eureka REST operations and its JSON codec (`EurekaJacksonCodec`).
//! The answer is `{"application":{"name":…,"instance":[…]}}`; older servers (the
//! XStream/Jettison codec) send `instance` as a single object when there is one, and
//! `port.$` as a string. Each instance gives `ipAddr` (else `hostName` when that is an
//! IP literal), `port`/`securePort` as `{"$":8080,"@enabled":"true"}` (a disabled
//! port skips the instance), `status` (UP → healthy, OUT_OF_SERVICE → draining, DOWN,
//! STARTING, UNKNOWN → unhealthy) and `metadata` (the placeholder
//! `{"@class":"java.util.Collections$EmptyMap"}` of an empty map is ignored). Weight
//! and zone come from metadata keys (`weight_key`, `zone_key`); the zone falls back to
//! an AWS `dataCenterInfo.metadata.availability-zone`.
//!
//! 404 means Eureka knows no such application — which is also what it answers once
//! the last instance of an application is gone. 401/403 are auth failures.
//!
//! Change detection: Eureka's `apps__hashcode` (only in whole-registry answers) just
//! counts instances per status (`UP_3_`), so it misses a changed address; the parsed
//! list is hashed instead and an equal hash is `Unchanged`.

use super::{
    encode_component, envoy_local_failure, excerpt, HttpRequest, HttpResponse, RegistryError,
    ServiceRef, Step,
};
use crate::instance::Rejected;
use crate::instance::{self, Instance, State};
use crate::snapshot;
use crate::validate::{field_err, printable, ConfigError};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Map, Value};

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EurekaConfig {
    /// Envoy cluster that reaches the Eureka server (port 8761).
    pub cluster: String,
    #[serde(default)]
    pub authority: Option<String>,
    /// Eureka application name; defaults to the registry-lb service name. Sent with ASCII
    /// letters uppercased, as Eureka stores application names (no Unicode case tables in the .wasm).
    #[serde(default)]
    pub app: Option<String>,
    /// Path of the Eureka REST API (`/eureka` for Spring Cloud, `/eureka/v2` for Netflix's war).
    #[serde(default = "default_eureka_prefix")]
    pub path_prefix: String,
    /// HTTP basic auth.
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub password: Option<String>,
    /// Use `securePort` instead of `port`.
    #[serde(default)]
    pub secure: bool,
    /// Instance metadata key holding the weight (an integer; default 1).
    #[serde(default = "default_weight_key")]
    pub weight_key: String,
    /// Instance metadata key holding the zone.
    #[serde(default = "default_zone_key")]
    pub zone_key: String,
    /// `auto` | `all` (`GET /apps`) | `app` (`GET /apps/<APP>`); see the module doc.
    #[serde(default)]
    pub fetch: Fetch,
    /// What `fetch` resolved to for this configuration (set after parsing).
    #[serde(skip)]
    pub fetch_all: bool,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Fetch {
    #[default]
    Auto,
    All,
    App,
}

fn default_eureka_prefix() -> String {
    "/eureka".to_string()
}
fn default_weight_key() -> String {
    "weight".to_string()
}
fn default_zone_key() -> String {
    "zone".to_string()
}

impl EurekaConfig {
    /// `:authority` of registry calls: `authority`, else the cluster name.
    pub fn authority(&self) -> &str {
        self.authority.as_deref().unwrap_or(&self.cluster)
    }

    /// Sources with the same key call the same Eureka the same way: `GET /apps` is
    /// one call for all of them.
    pub fn server_key(&self) -> (&str, &str, &str, Option<&str>, Option<&str>) {
        (
            &self.cluster,
            self.authority(),
            self.path_prefix.trim_end_matches('/'),
            self.username.as_deref(),
            self.password.as_deref(),
        )
    }

    /// Checks what the types cannot; `at` names this source in errors
    /// (`services[0].sources[1].eureka`).
    pub fn validate(&self, at: &str) -> Result<(), ConfigError> {
        if self.cluster.is_empty() {
            return field_err(at, "cluster", "must name an Envoy cluster");
        }
        if let Some(app) = &self.app {
            if app.is_empty() || app.contains('/') || !printable(app) {
                return field_err(
                    at,
                    "app",
                    "must be a non-empty application name without '/'",
                );
            }
        }
        let p = &self.path_prefix;
        if !p.starts_with('/') || p.contains(['?', '#']) || !printable(p) {
            return field_err(
                at,
                "path_prefix",
                "must be a path starting with '/' (self.g. \"/eureka\")",
            );
        }
        validate_basic_auth(at, self.username.as_deref(), self.password.as_deref())?;
        if self.weight_key.is_empty() {
            return field_err(at, "weight_key", "must not be empty");
        }
        if self.zone_key.is_empty() {
            return field_err(at, "zone_key", "must not be empty");
        }
        Ok(())
    }
}

#[derive(Debug)]
pub struct Eureka {
    cfg: EurekaConfig,
    /// Application name as Eureka stores it (uppercase).
    app: String,
    request_timeout_ms: u64,
    authorization: Option<String>,
    /// [`snapshot::content_hash`] of the last list applied; 0 = none.
    pub last_hash: u64,
}

/// Checks HTTP basic auth credentials (Eureka's readers and registrars): both or
/// neither; the user-id non-empty, without ':' (RFC 7617) or control characters; the
/// password without control characters. `at` names the object holding them.
pub fn validate_basic_auth(
    at: &str,
    username: Option<&str>,
    password: Option<&str>,
) -> Result<(), ConfigError> {
    if username.is_some() != password.is_some() {
        return field_err(at, "username", "username and password go together");
    }
    if let Some(u) = username {
        if u.is_empty() || u.contains(':') || !printable(u) {
            return field_err(
                at,
                "username",
                "must be non-empty, without ':' or control characters",
            );
        }
    }
    if password.is_some_and(|p| !printable(p)) {
        return field_err(at, "password", "contains control characters");
    }
    Ok(())
}

/// `Authorization: Basic …` for the credentials, if any.
pub fn basic_authorization(username: Option<&str>, password: Option<&str>) -> Option<String> {
    match (username, password) {
        (Some(u), Some(p)) => Some(format!("Basic {}", B64.encode(format!("{u}:{p}")))),
        _ => None,
    }
}

impl Eureka {
    pub fn new(svc: ServiceRef, cfg: &EurekaConfig) -> Eureka {
        let authorization = basic_authorization(cfg.username.as_deref(), cfg.password.as_deref());
        Eureka {
            app: cfg
                .app
                .clone()
                .unwrap_or_else(|| svc.name.to_string())
                .to_ascii_uppercase(),
            cfg: cfg.clone(),
            request_timeout_ms: svc.request_timeout_ms,
            authorization,
            last_hash: 0,
        }
    }

    pub fn request(&self) -> HttpRequest {
        let prefix = self.cfg.path_prefix.trim_end_matches('/');
        let mut headers = vec![("accept".to_string(), "application/json".to_string())];
        if let Some(a) = &self.authorization {
            headers.push(("authorization".to_string(), a.clone()));
        }
        HttpRequest {
            cluster: self.cfg.cluster.clone(),
            method: "GET",
            authority: self.cfg.authority().to_string(),
            path: if self.cfg.fetch_all {
                format!("{prefix}/apps")
            } else {
                format!("{prefix}/apps/{}", encode_component(&self.app))
            },
            headers,
            body: Vec::new(),
            timeout_ms: self.request_timeout_ms,
        }
    }

    pub fn on_response(&mut self, resp: &HttpResponse) -> Result<Step, RegistryError> {
        if let Some(e) = envoy_local_failure(resp) {
            return Err(e);
        }
        match resp.status {
            200 => {}
            401 | 403 => {
                return Err(RegistryError::Auth(format!(
                    "{} {}",
                    resp.status,
                    excerpt(resp.body)
                )))
            }
            404 => {
                return Err(RegistryError::Status(
                    404,
                    format!(
                        "eureka knows no application `{}` (none registered, or all instances gone)",
                        instance::truncate(&self.app, 64)
                    ),
                ))
            }
            s => return Err(RegistryError::Status(s, excerpt(resp.body))),
        }
        let Some((instances, rejected)) = parse_app(resp.body, &self.app, &self.cfg)? else {
            // In `/apps`, an application without instances is left out, as `/apps/<APP>`
            // answers 404: both keep the last good list.
            return Err(RegistryError::Status(
                404,
                format!(
                    "eureka lists no application `{}` (none registered, or all instances gone)",
                    instance::truncate(&self.app, 64)
                ),
            ));
        };
        let hash = snapshot::content_hash(instances.iter()) | 1;
        if hash == self.last_hash {
            return Ok(Step::Unchanged);
        }
        self.last_hash = hash;
        Ok(Step::Instances {
            instances,
            rejected,
            warnings: Vec::new(),
        })
    }

    pub fn token(&self) -> String {
        self.last_hash.to_string()
    }

    pub fn restore_token(&mut self, token: &str) {
        self.last_hash = token.parse().unwrap_or(0);
    }
}

fn malformed(msg: impl Into<String>) -> RegistryError {
    RegistryError::Malformed(format!("eureka application: {}", msg.into()))
}

/// Parses `{"application":{…}}` (or a whole-registry `{"applications":{…}}`, taking
/// the application named `app`; none when it is not listed).
pub fn parse(
    body: &[u8],
    app: &str,
    cfg: &EurekaConfig,
) -> Result<(Vec<Instance>, Rejected), RegistryError> {
    Ok(parse_app(body, app, cfg)?.unwrap_or_default())
}

/// A whole-registry answer, read only as far as each application's name: the
/// instances of the others are skipped unparsed.
#[derive(Deserialize)]
struct Registry<'a> {
    #[serde(borrow)]
    applications: Option<Applications<'a>>,
    #[serde(borrow)]
    application: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct Applications<'a> {
    #[serde(borrow, default)]
    application: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct NamedApp<'a> {
    #[serde(default)]
    name: Option<String>,
    #[serde(borrow, default)]
    instance: Option<&'a RawValue>,
}

/// Instances of one application, and the entries skipped.
pub type Parsed = (Vec<Instance>, Rejected);

/// As [`parse`], `None` when a whole-registry answer does not list `app`.
pub fn parse_app(
    body: &[u8],
    app: &str,
    cfg: &EurekaConfig,
) -> Result<Option<Parsed>, RegistryError> {
    let top: Registry = serde_json::from_slice(body).map_err(|e| malformed(e.to_string()))?;
    let application: Value =
        match (top.application, top.applications) {
            (Some(a), _) => serde_json::from_str(a.get()).map_err(|e| malformed(e.to_string()))?,
            (None, Some(apps)) => {
                let Some(list) = apps.application else {
                    return Ok(None);
                };
                // One application is written as an object by the older codec.
                let list: Vec<NamedApp> = if list.get().trim_start().starts_with('{') {
                    vec![serde_json::from_str(list.get()).map_err(|e| malformed(e.to_string()))?]
                } else {
                    serde_json::from_str(list.get()).map_err(|e| malformed(e.to_string()))?
                };
                let Some(found) = list.into_iter().find(|a| {
                    a.name
                        .as_deref()
                        .is_some_and(|n| n.eq_ignore_ascii_case(app))
                }) else {
                    return Ok(None);
                };
                let mut m = Map::new();
                if let Some(i) = found.instance {
                    let v: Value =
                        serde_json::from_str(i.get()).map_err(|e| malformed(e.to_string()))?;
                    m.insert("instance".to_string(), v);
                }
                Value::Object(m)
            }
            (None, None) => return Err(malformed(
                "no `application` object (was the answer XML? `Accept: application/json` is sent)",
            )),
        };
    let application = application
        .as_object()
        .ok_or_else(|| malformed("`application` is not an object"))?;
    let raw = match application.get("instance") {
        None | Some(Value::Null) => Vec::new(),
        Some(i @ (Value::Array(_) | Value::Object(_))) => one_or_many(i),
        Some(_) => return Err(malformed("`instance` is neither a list nor an object")),
    };
    // Not sized by the entry count: entries may be 2-byte junk that becomes no
    // instance, and room for ~100-byte instances per entry was 48x the answer's size.
    let mut out = Vec::new();
    let mut rejected = Rejected::default();
    for (k, inst) in raw.into_iter().enumerate() {
        let Some(obj) = inst.as_object() else {
            rejected.push(format!("instance #{k}: not an object"));
            continue;
        };
        let name = instance::truncate(
            str_field(obj, "instanceId")
                .or_else(|| str_field(obj, "hostName"))
                .unwrap_or("?"),
            96,
        );
        match parse_instance(obj, cfg) {
            Ok(Some(i)) => out.push(i),
            Ok(None) => {}
            Err(e) => rejected.push(format!("instance `{name}`: {e}")),
        }
    }
    Ok(Some((out, rejected)))
}

/// An array's elements, or the value itself (the older single-object shape).
fn one_or_many(v: &Value) -> Vec<&Value> {
    match v {
        Value::Array(a) => a.iter().collect(),
        other => vec![other],
    }
}

fn str_field<'a>(obj: &'a Map<String, Value>, key: &str) -> Option<&'a str> {
    obj.get(key).and_then(Value::as_str)
}

/// `Ok(None)` for a weight of 0.
fn parse_instance(
    obj: &Map<String, Value>,
    cfg: &EurekaConfig,
) -> Result<Option<Instance>, String> {
    let is_ip = |s: &&str| instance::socket_addr(s, 1).is_ok();
    let ip = match (str_field(obj, "ipAddr"), str_field(obj, "hostName")) {
        (Some(ip), _) if is_ip(&ip) => ip,
        (_, Some(host)) if is_ip(&host) => host,
        (Some(ip), _) if !ip.trim().is_empty() => {
            return Err(format!(
                "`ipAddr` `{}` is not an IP literal, nor is `hostName`",
                instance::truncate(ip, 64)
            ))
        }
        _ => return Err("no `ipAddr`, and `hostName` is not an IP literal".into()),
    };
    let port_key = if cfg.secure { "securePort" } else { "port" };
    let port = obj
        .get(port_key)
        .ok_or_else(|| format!("no `{port_key}`"))?;
    let (number, enabled) = match port {
        // `{"$": 8080, "@enabled": "true"}`; `$` is a string in older servers.
        Value::Object(p) => (p.get("$"), p.get("@enabled")),
        bare => (Some(bare), None),
    };
    let enabled = match enabled {
        None | Some(Value::Null) => true,
        Some(Value::Bool(b)) => *b,
        Some(Value::String(s)) => !s.trim().eq_ignore_ascii_case("false"),
        Some(_) => return Err(format!("`{port_key}.@enabled` is not a boolean")),
    };
    if !enabled {
        return Err(format!("`{port_key}` is disabled (`@enabled` false)"));
    }
    let port = match number {
        Some(Value::Number(n)) => n.as_i64(),
        Some(Value::String(s)) => s.trim().parse::<i64>().ok(),
        _ => None,
    }
    .ok_or_else(|| format!("`{port_key}.$` is not a port number"))?;
    let addr = instance::socket_addr(ip, port).map_err(|e| e.to_string())?;

    let mut meta: Vec<(String, String)> = Vec::new();
    if let Some(m) = obj.get("metadata").and_then(Value::as_object) {
        for (k, v) in m {
            if k == "@class" {
                continue;
            }
            let text = match v {
                Value::String(s) => s.clone(),
                Value::Null => String::new(),
                other => other.to_string(),
            };
            meta.push((k.clone(), text));
        }
    }
    meta.sort();
    let lookup = |key: &str| meta.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str());
    let weight = match lookup(&cfg.weight_key) {
        None => 1,
        Some(w) => w.trim().parse::<u32>().map_err(|_| {
            format!(
                "metadata `{}` = `{}` is not a non-negative integer",
                cfg.weight_key,
                instance::truncate(w, 32)
            )
        })?,
    };
    if weight == 0 {
        return Ok(None);
    }
    let mut inst = Instance::new(addr, weight);
    inst.state = match str_field(obj, "status").unwrap_or("UNKNOWN") {
        "UP" => State::Healthy,
        "OUT_OF_SERVICE" => State::Draining,
        _ => State::Unhealthy, // DOWN, STARTING, UNKNOWN, anything else
    };
    inst.zone = lookup(&cfg.zone_key)
        .map(str::to_string)
        .or_else(|| {
            obj.get("dataCenterInfo")
                .and_then(|d| d.get("metadata"))
                .and_then(|m| m.get("availability-zone"))
                .and_then(Value::as_str)
                .map(str::to_string)
        })
        .unwrap_or_default();
    inst.metadata = meta;
    // When it came up (else registered): slow start ramps from there.
    let lease = obj.get("leaseInfo");
    let stamp = |k: &str| {
        lease
            .and_then(|l| l.get(k))
            .and_then(Value::as_u64)
            .filter(|&t| t > 0)
    };
    inst.registered_ms = stamp("serviceUpTimestamp")
        .or_else(|| stamp("registrationTimestamp"))
        .unwrap_or(0);
    Ok(Some(inst))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::SourceConfig;
    use crate::registry::test_util::one_source;
    use crate::registry::test_util::{resp, service, NOT_AN_ANSWER};
    use wasm_bindgen_test::wasm_bindgen_test;

    const FARGO: &str = include_str!("../../tests/fixtures/eureka/fargo_apps-sample-1-2.json");

    fn eureka(extra: &str) -> Eureka {
        let svc = service("web", "eureka", "eureka", extra);
        match &svc.sources[0] {
            SourceConfig::Eureka(e) => Eureka::new(svc.for_registry(), e),
            _ => unreachable!(),
        }
    }

    fn instances(step: Step) -> (Vec<Instance>, Rejected) {
        match step {
            Step::Instances {
                instances,
                rejected,
                warnings,
            } => {
                assert!(warnings.is_empty());
                (instances, rejected)
            }
            other => panic!("expected instances, got {other:?}"),
        }
    }

    /// One instance in the current Jackson shape (`$` a number, `@enabled` a string).
    fn modern(id: &str, ip: &str, port: u16, status: &str, meta: &str) -> String {
        format!(
            r#"{{"instanceId":"{id}","hostName":"{ip}","app":"WEB","ipAddr":"{ip}","status":"{status}","overriddenStatus":"UNKNOWN",
                "port":{{"$":{port},"@enabled":"true"}},"securePort":{{"$":{},"@enabled":"false"}},"countryId":1,
                "dataCenterInfo":{{"@class":"com.netflix.appinfo.InstanceInfo$DefaultDataCenterInfo","name":"MyOwn"}},
                "leaseInfo":{{"renewalIntervalInSecs":30,"durationInSecs":90}},"metadata":{meta},"vipAddress":"web",
                "isCoordinatingDiscoveryServer":"false","lastUpdatedTimestamp":"1","lastDirtyTimestamp":"1","actionType":"ADDED"}}"#,
            port + 1
        )
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn request_shape() {
        let e = eureka("");
        let r = e.request();
        assert_eq!((r.method, r.path.as_str()), ("GET", "/eureka/apps/WEB"));
        assert!(r
            .headers
            .contains(&("accept".into(), "application/json".into())));
        assert!(!r.headers.iter().any(|(k, _)| k == "authorization"));
        let e = eureka(
            r#","app":"testeng.lsm","path_prefix":"/eureka/v2/","username":"user","password":"pa:ss""#,
        );
        let r = e.request();
        assert_eq!(r.path, "/eureka/v2/apps/TESTENG.LSM");
        // base64("user:pa:ss")
        assert!(
            r.headers
                .contains(&("authorization".into(), "Basic dXNlcjpwYTpzcw==".into())),
            "{:?}",
            r.headers
        );
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn parses_the_older_whole_registry_sample() {
        // fargo's sample: `$` as a string, `overriddenstatus`, the `applications` wrapper.
        let mut e = eureka(r#","app":"testeng.lsm""#);
        let (list, rejected) = instances(e.on_response(&resp(200, FARGO)).unwrap());
        assert!(rejected.is_empty(), "{rejected:?}");
        let got: Vec<(String, u32, State)> = list
            .iter()
            .map(|i| (i.addr.to_string(), i.weight, i.state))
            .collect();
        assert_eq!(
            got,
            [
                ("192.168.191.150:7100".to_string(), 1, State::Healthy),
                ("192.168.191.235:7100".to_string(), 1, State::Healthy)
            ]
        );
        assert!(list[0].metadata.contains(&(
            "base-uri".into(),
            "https://qa16gs.qa.somecompany.com:7100".into()
        )));
        // leaseInfo.serviceUpTimestamp: slow start ramps from it.
        assert_eq!(
            (list[0].registered_ms, list[1].registered_ms),
            (1_402_357_291_394, 1_402_096_233_497)
        );
        // The same list again: unchanged.
        assert_eq!(e.on_response(&resp(200, FARGO)).unwrap(), Step::Unchanged);
        // An app a whole-registry answer does not list: as `/apps/<APP>`'s 404, an
        // error that keeps the last good list.
        let mut other = eureka(r#","app":"nope""#);
        let e = other.on_response(&resp(200, FARGO)).unwrap_err();
        assert!(
            matches!(&e, RegistryError::Status(404, m) if m.contains("eureka lists no application `NOPE`")),
            "{e:?}"
        );
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn statuses_ports_metadata_weight_and_zone() {
        let empty = r#"{"@class":"java.util.Collections$EmptyMap"}"#;
        let body = format!(
            r#"{{"application":{{"name":"WEB","instance":[{},{},{},{},{},{},{},{}]}}}}"#,
            modern(
                "a",
                "10.0.0.1",
                8080,
                "UP",
                r#"{"weight":"5","zone":"z1","version":"v1"}"#
            ),
            modern("b", "10.0.0.2", 8080, "OUT_OF_SERVICE", empty),
            modern("c", "10.0.0.3", 8080, "DOWN", empty),
            modern("d", "10.0.0.4", 8080, "STARTING", empty),
            modern("e", "10.0.0.5", 8080, "UNKNOWN", r#"{"weight":"0"}"#),
            modern("f", "web-f.internal", 8080, "UP", empty),
            modern("g", "10.0.0.7", 8080, "UP", r#"{"weight":"heavy"}"#),
            modern("h", "10.0.0.8", 8080, "UP", empty).replace(
                r#""port":{"$":8080,"@enabled":"true"}"#,
                r#""port":{"$":8080,"@enabled":"false"}"#
            ),
        );
        let mut e = eureka("");
        let (list, rejected) = instances(e.on_response(&resp(200, &body)).unwrap());
        let got: Vec<(String, u32, State, String)> = list
            .iter()
            .map(|i| (i.addr.to_string(), i.weight, i.state, i.zone.clone()))
            .collect();
        assert_eq!(
            got,
            [
                (
                    "10.0.0.1:8080".to_string(),
                    5,
                    State::Healthy,
                    "z1".to_string()
                ),
                (
                    "10.0.0.2:8080".to_string(),
                    1,
                    State::Draining,
                    String::new()
                ),
                (
                    "10.0.0.3:8080".to_string(),
                    1,
                    State::Unhealthy,
                    String::new()
                ),
                (
                    "10.0.0.4:8080".to_string(),
                    1,
                    State::Unhealthy,
                    String::new()
                ),
            ]
        );
        assert_eq!(
            list[1].metadata,
            vec![],
            "the EmptyMap placeholder is not metadata"
        );
        assert_eq!(rejected.len(), 3, "{rejected:?}");
        assert!(
            rejected[0].starts_with("instance `f`: `ipAddr` `web-f.internal` is not an IP literal"),
            "{rejected:?}"
        );
        assert!(rejected[1].contains("`weight` = `heavy`"), "{rejected:?}");
        assert!(rejected[2].contains("`port` is disabled"), "{rejected:?}");
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn single_object_instance_secure_port_and_host_name_fallback() {
        // The older shape: one instance as an object; `$` as a string; ipAddr missing.
        let body = r#"{"application":{"name":"WEB","instance":{"hostName":"10.1.1.1","app":"WEB","status":"UP",
            "port":{"@enabled":"true","$":"8080"},"securePort":{"@enabled":"true","$":"8443"},
            "dataCenterInfo":{"@class":"com.netflix.appinfo.AmazonInfo","name":"Amazon","metadata":{"availability-zone":"us-east-1a"}},
            "metadata":{"@class":"java.util.Collections$EmptyMap"}}}}"#;
        let mut e = eureka("");
        let (list, _) = instances(e.on_response(&resp(200, body)).unwrap());
        assert_eq!(list[0].addr.to_string(), "10.1.1.1:8080");
        assert_eq!(list[0].zone, "us-east-1a");
        let mut e = eureka(r#","secure":true"#);
        let (list, _) = instances(e.on_response(&resp(200, body)).unwrap());
        assert_eq!(list[0].addr.to_string(), "10.1.1.1:8443");
        // A host name that is not an IP is refused.
        let named = body.replace(r#""hostName":"10.1.1.1""#, r#""hostName":"web-1.local""#);
        let (list, rejected) = instances(eureka("").on_response(&resp(200, &named)).unwrap());
        assert!(list.is_empty());
        assert!(
            rejected[0].contains("`hostName` is not an IP literal"),
            "{rejected:?}"
        );
        // No instance at all.
        let none = r#"{"application":{"name":"WEB","instance":[]}}"#;
        assert_eq!(
            instances(eureka("").on_response(&resp(200, none)).unwrap())
                .0
                .len(),
            0
        );
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn custom_metadata_keys() {
        let body = format!(
            r#"{{"application":{{"name":"WEB","instance":[{}]}}}}"#,
            modern(
                "a",
                "10.0.0.1",
                8080,
                "UP",
                r#"{"lb.weight":"7","weight":"1","az":"b"}"#
            )
        );
        let mut e = eureka(r#","weight_key":"lb.weight","zone_key":"az""#);
        let (list, _) = instances(e.on_response(&resp(200, &body)).unwrap());
        assert_eq!((list[0].weight, list[0].zone.as_str()), (7, "b"));
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn statuses_404_and_auth() {
        let mut e = eureka("");
        let err = e.on_response(&resp(404, "")).unwrap_err();
        assert_eq!(err.kind(), "status");
        assert!(
            err.to_string()
                .contains("eureka knows no application `WEB`"),
            "{err}"
        );
        assert_eq!(e.on_response(&resp(403, "")).unwrap_err().kind(), "auth");
        assert_eq!(
            e.on_response(&resp(401, "Unauthorized"))
                .unwrap_err()
                .kind(),
            "auth"
        );
        assert_eq!(
            e.on_response(&resp(500, "boom")).unwrap_err(),
            RegistryError::Status(500, "boom".into())
        );
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn malformed_bodies_are_errors_not_panics() {
        let xml = r#"<application><name>WEB</name><instance></instance></application>"#;
        for body in NOT_AN_ANSWER.into_iter().chain([
            xml,
            r#"{"application":[]}"#,
            r#"{"application":{"instance":5}}"#,
            r#"{"application":"WEB"}"#,
        ]) {
            let mut e = eureka("");
            assert_eq!(
                e.on_response(&resp(200, body)).unwrap_err().kind(),
                "malformed",
                "{body}"
            );
            assert_eq!(e.last_hash, 0);
        }
        // Instances of the wrong shape are skipped one by one.
        let odd = r#"{"application":{"name":"WEB","instance":[5,{"ipAddr":"10.0.0.1","status":"UP"},{"ipAddr":"10.0.0.2","port":{"$":[1]}},{"ipAddr":"10.0.0.3","port":{"$":"80","@enabled":7}}]}}"#;
        let (list, rejected) = instances(eureka("").on_response(&resp(200, odd)).unwrap());
        assert!(list.is_empty());
        assert_eq!(rejected.len(), 4, "{rejected:?}");
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn the_hash_is_carried_to_another_poller() {
        let mut a = eureka(r#","app":"testeng.lsm""#);
        a.on_response(&resp(200, FARGO)).unwrap();
        let mut b = eureka(r#","app":"testeng.lsm""#);
        b.restore_token(&a.token());
        assert_eq!(b.on_response(&resp(200, FARGO)).unwrap(), Step::Unchanged);
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn eureka_source_defaults_and_errors() {
        let c = one_source(r#"{"eureka":{"cluster":"eureka"}}"#).unwrap();
        let SourceConfig::Eureka(e) = &c.services[0].sources[0] else {
            panic!()
        };
        assert_eq!(
            (
                e.path_prefix.as_str(),
                e.weight_key.as_str(),
                e.zone_key.as_str(),
                e.secure
            ),
            ("/eureka", "weight", "zone", false)
        );
        assert_eq!(e.authority(), "eureka");
        one_source(r#"{"eureka":{"cluster":"e","app":"web-app","path_prefix":"/eureka/v2","username":"u","password":"p:w","secure":true}}"#)
            .unwrap();
        for (src, want) in [
            (
                r#"{"eureka":{"cluster":"e","path_prefix":"eureka"}}"#,
                "services[0].sources[0].eureka.path_prefix: ",
            ),
            (
                r#"{"eureka":{"cluster":"e","username":"a:b","password":"p"}}"#,
                "services[0].sources[0].eureka.username: ",
            ),
            (
                r#"{"eureka":{"cluster":"e","password":"p"}}"#,
                "services[0].sources[0].eureka.username: username and password go together",
            ),
            (
                r#"{"eureka":{"cluster":"e","app":"a/b"}}"#,
                "services[0].sources[0].eureka.app: ",
            ),
            (
                r#"{"eureka":{"cluster":"e","weight_key":""}}"#,
                "services[0].sources[0].eureka.weight_key: ",
            ),
            (
                r#"{"eureka":{"cluster":"e","secure":"yes"}}"#,
                "services[0].sources[0].eureka.secure: invalid type",
            ),
        ] {
            let e = one_source(src).unwrap_err();
            assert!(e.0.starts_with(want), "{src}: {}", e.0);
        }
    }
}
