//! Consul: `GET /v1/health/service/<service>` on the local agent, as blocking queries.
//!
//! Reference: Consul HTTP API, "Health — List Service Instances for Service" and
//! "Blocking Queries". How an entry becomes an instance (address, health, weight,
//! zone, metadata) is in `registry_lb_wire::consul`, which reads the answer. Left
//! out: `TaggedAddresses` (lan/wan selection), Connect sidecar addresses, namespaces
//! and partitions (Enterprise).
//!
//! Read load (`consistency`, `cached`), after Consul's "Consistency Modes" and "Agent
//! Caching": by default the agent forwards each query to the leader server. With
//! `consistency: "stale"` any server answers from its own state (`?stale`), which
//! spreads a fleet's reads over every server for an answer that lags the leader by
//! its replication delay (Consul reports it in `X-Consul-LastContact`, typically
//! milliseconds). `consistency: "consistent"` (`?consistent`) makes the leader
//! confirm its leadership first: one more round trip, only for readers that must
//! never see an old list. `cached: true` (`?cached`) has the local agent answer from
//! its cache, which the agent keeps current with its own blocking query: every
//! proxy on a node then costs the servers one query per service, not one each.
//!
//! Auth: a fixed ACL `token` (`X-Consul-Token`), or an ACL auth method: `POST
//! /v1/acl/login` with a bearer token yields a token (`SecretID`) that may expire;
//! when Consul refuses it (403 "ACL not found"), the source logs in again at once.

use super::{
    encode_component, envoy_local_failure, excerpt, HttpRequest, HttpResponse, RegistryError,
    ServiceRef, Step,
};
use crate::duration::Millis;
use crate::instance::Instance;
use crate::instance::Rejected;
use crate::validate::{field_err, ConfigError};
use serde::Deserialize;

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ConsulConfig {
    /// Envoy cluster that reaches the Consul agent's HTTP API.
    pub cluster: String,
    /// `:authority` of registry calls; defaults to the cluster name.
    #[serde(default)]
    pub authority: Option<String>,
    /// Consul service name; defaults to the registry-lb service name.
    #[serde(default)]
    pub service: Option<String>,
    #[serde(default)]
    pub datacenter: Option<String>,
    /// Only instances carrying this tag.
    #[serde(default)]
    pub tag: Option<String>,
    /// Ask Consul for passing instances only (`?passing`). Without it, instances with
    /// a critical check are kept as unhealthy and warning ones get `Weights.Warning`.
    #[serde(default)]
    pub passing_only: bool,
    /// ACL token, sent as `X-Consul-Token`.
    #[serde(default)]
    pub token: Option<String>,
    /// Log in through a Consul ACL auth method (`POST /v1/acl/login`) with this
    /// bearer token (e.g. a Kubernetes service-account JWT) instead of a fixed
    /// `token`; the login is repeated whenever Consul refuses the token (expired).
    #[serde(default)]
    pub auth_method: Option<String>,
    #[serde(default)]
    pub bearer_token: Option<String>,
    /// Use blocking queries (`?index=&wait=`): changes arrive as soon as Consul has them.
    #[serde(default = "default_true")]
    pub blocking: bool,
    /// `wait` of a blocking query.
    #[serde(default = "default_consul_wait")]
    pub wait: Millis,
    /// `default` | `stale` | `consistent` (see the module doc).
    #[serde(default)]
    pub consistency: Consistency,
    /// Answers from the local agent's cache (`?cached`; see the module doc).
    #[serde(default)]
    pub cached: bool,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Consistency {
    #[default]
    Default,
    Stale,
    Consistent,
}

fn default_true() -> bool {
    true
}
fn default_consul_wait() -> Millis {
    Millis::from_secs(30)
}

impl ConsulConfig {
    /// `:authority` of registry calls: `authority`, else the cluster name.
    pub fn authority(&self) -> &str {
        self.authority.as_deref().unwrap_or(&self.cluster)
    }

    /// Checks what the types cannot; `at` names this source in errors
    /// (`services[0].sources[1].consul`).
    pub fn validate(&self, at: &str) -> Result<(), ConfigError> {
        if self.cluster.is_empty() {
            return field_err(at, "cluster", "must name an Envoy cluster");
        }
        if self.wait.0 < 1000 || self.wait.0 > 600_000 {
            return field_err(at, "wait", "must be between 1s and 10m");
        }
        if let Some(t) = &self.token {
            if t.chars().any(|ch| ch.is_control()) {
                return field_err(at, "token", "contains control characters");
            }
        }
        if self.auth_method.is_some() != self.bearer_token.is_some() {
            return field_err(
                at,
                "auth_method",
                "auth_method and bearer_token go together",
            );
        }
        if self.cached && self.consistency == Consistency::Consistent {
            // Consul refuses `?cached` with `?consistent`: a cache cannot be linearizable.
            return field_err(
                at,
                "cached",
                "cannot be combined with consistency \"consistent\"",
            );
        }
        if self.auth_method.is_some() && self.token.is_some() {
            return field_err(at, "token", "use either token or auth_method, not both");
        }
        Ok(())
    }
}

#[derive(Debug)]
pub struct Consul {
    cfg: ConsulConfig,
    service: String,
    request_timeout_ms: u64,
    /// Last `X-Consul-Index` seen; 0 = none (the next query does not block).
    pub index: u64,
    /// Token from an auth-method login.
    login_token: Option<String>,
    /// The call in flight is a login.
    logging_in: bool,
    /// A shorter `wait` for the next blocking query only (set while a change is
    /// held back by the guard, so it is re-confirmed on time).
    pub next_wait_ms: Option<u64>,
}

impl Consul {
    pub fn new(svc: ServiceRef, cfg: &ConsulConfig) -> Consul {
        Consul {
            service: cfg.service.clone().unwrap_or_else(|| svc.name.to_string()),
            cfg: cfg.clone(),
            request_timeout_ms: svc.request_timeout_ms,
            index: 0,
            login_token: None,
            logging_in: false,
            next_wait_ms: None,
        }
    }

    pub fn blocking(&self) -> bool {
        self.cfg.blocking
    }

    pub fn request(&mut self) -> HttpRequest {
        if let (Some(method), Some(bearer), None) = (
            &self.cfg.auth_method,
            &self.cfg.bearer_token,
            &self.login_token,
        ) {
            self.logging_in = true;
            let body = serde_json::json!({ "AuthMethod": method, "BearerToken": bearer });
            return HttpRequest {
                cluster: self.cfg.cluster.clone(),
                method: "POST",
                authority: self.cfg.authority().to_string(),
                path: "/v1/acl/login".to_string(),
                headers: vec![("content-type".to_string(), "application/json".to_string())],
                body: body.to_string().into_bytes(),
                timeout_ms: self.request_timeout_ms,
            };
        }
        self.logging_in = false;
        let mut path = format!("/v1/health/service/{}", encode_component(&self.service));
        let mut q: Vec<String> = Vec::new();
        if self.cfg.passing_only {
            q.push("passing=1".into());
        }
        if let Some(dc) = &self.cfg.datacenter {
            q.push(format!("dc={}", encode_component(dc)));
        }
        if let Some(tag) = &self.cfg.tag {
            q.push(format!("tag={}", encode_component(tag)));
        }
        match self.cfg.consistency {
            Consistency::Default => {}
            Consistency::Stale => q.push("stale".into()),
            Consistency::Consistent => q.push("consistent".into()),
        }
        if self.cfg.cached {
            q.push("cached".into());
        }
        let mut timeout_ms = self.request_timeout_ms;
        if self.cfg.blocking && self.index > 0 {
            let wait = self
                .next_wait_ms
                .take()
                .unwrap_or(self.cfg.wait.0)
                .min(self.cfg.wait.0);
            q.push(format!("index={}", self.index));
            q.push(format!("wait={wait}ms"));
            // Consul adds up to wait/16 of jitter to the wait.
            timeout_ms += wait + wait / 16;
        }
        if !q.is_empty() {
            path.push('?');
            path.push_str(&q.join("&"));
        }
        let mut headers = vec![("accept".to_string(), "application/json".to_string())];
        if let Some(t) = self.login_token.as_ref().or(self.cfg.token.as_ref()) {
            headers.push(("x-consul-token".to_string(), t.clone()));
        }
        HttpRequest {
            cluster: self.cfg.cluster.clone(),
            method: "GET",
            authority: self.cfg.authority().to_string(),
            path,
            headers,
            body: Vec::new(),
            timeout_ms,
        }
    }

    pub fn on_response(&mut self, resp: &HttpResponse) -> Result<Step, RegistryError> {
        if let Some(e) = envoy_local_failure(resp) {
            return Err(e);
        }
        if self.logging_in {
            self.logging_in = false;
            if resp.status != 200 {
                return Err(RegistryError::Auth(format!(
                    "ACL login failed: {} {}",
                    resp.status,
                    excerpt(resp.body)
                )));
            }
            #[derive(Deserialize)]
            struct Login {
                #[serde(rename = "SecretID")]
                secret_id: String,
            }
            let l: Login = serde_json::from_slice(resp.body)
                .map_err(|e| RegistryError::Malformed(format!("consul ACL login: {e}")))?;
            self.login_token = Some(l.secret_id);
            return Ok(Step::Again("login"));
        }
        match resp.status {
            200 => {}
            403 if self.login_token.is_some() => {
                // The login token expired or was revoked: log in again right away.
                self.login_token = None;
                return Ok(Step::Again("token_expired"));
            }
            401 | 403 => {
                return Err(RegistryError::Auth(format!(
                    "{} {}",
                    resp.status,
                    excerpt(resp.body)
                )))
            }
            s => return Err(RegistryError::Status(s, excerpt(resp.body))),
        }
        let index = match resp
            .header("x-consul-index")
            .map(|v| v.trim().parse::<u64>())
        {
            Some(Ok(i)) => i,
            Some(Err(_)) => {
                return Err(RegistryError::Malformed(
                    "X-Consul-Index is not a number".into(),
                ))
            }
            None => 0,
        };
        if index != 0 && index == self.index {
            return Ok(Step::Unchanged);
        }
        let (instances, rejected) = parse(resp.body)?;
        // "Reset the index if it goes backwards" (Consul blocking-query docs); an
        // index of 0 must never be used to block either.
        self.index = if index < self.index { 0 } else { index };
        Ok(Step::Instances {
            instances,
            rejected,
            warnings: Vec::new(),
        })
    }
}

/// Parses a `/v1/health/service` body.
pub fn parse(body: &[u8]) -> Result<(Vec<Instance>, Rejected), RegistryError> {
    // Validated once as UTF-8, then parsed as `&str`: serde_json then skips the
    // per-string UTF-8 check (about a fifth of the parse, `cargo bench --bench refresh`).
    let text = std::str::from_utf8(body)
        .map_err(|e| RegistryError::Malformed(format!("consul health list: not UTF-8: {e}")))?;
    registry_lb_wire::consul::health_list(text)
        .map_err(|e| RegistryError::Malformed(format!("consul health list: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::SourceConfig;
    use crate::instance::State;
    use crate::registry::test_util::one_source;
    use crate::registry::test_util::service;
    use wasm_bindgen_test::wasm_bindgen_test;

    const REDIS: &str = include_str!("../../tests/fixtures/consul/health_service_redis.json");
    const MODERN: &str =
        include_str!("../../tests/fixtures/consul/health_service_modern_shape.json");

    fn consul(extra: &str) -> Consul {
        let svc = service("web", "consul", "consul", extra);
        match &svc.sources[0] {
            SourceConfig::Consul(k) => Consul::new(svc.for_registry(), k),
            _ => unreachable!(),
        }
    }

    fn hdrs(index: &str) -> Vec<(String, String)> {
        vec![
            ("content-type".into(), "application/json".into()),
            ("x-consul-index".into(), index.into()),
            ("x-consul-knownleader".into(), "true".into()),
            ("server".into(), "envoy".into()),
        ]
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn parses_documented_sample() {
        let (list, rejected) = parse(REDIS.as_bytes()).unwrap();
        assert!(rejected.is_empty());
        assert_eq!(list.len(), 1);
        assert_eq!(list[0].addr.to_string(), "10.1.10.12:8000");
        assert_eq!(list[0].weight, 10);
        assert_eq!(list[0].state, State::Healthy);
        assert!(list[0]
            .metadata
            .contains(&("tag:primary".into(), String::new())));
        assert!(list[0]
            .metadata
            .contains(&("redis_version".into(), "4.0".into())));
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn warning_check_uses_warning_weight() {
        let (list, _) = parse(MODERN.as_bytes()).unwrap();
        assert_eq!(list[0].weight, 1);
        assert_eq!(list[0].state, State::Healthy);
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn critical_maintenance_node_address_and_bad_entries() {
        let body = r#"[
          {"Node":{"Address":"10.0.0.1"},"Service":{"ID":"a","Address":"","Port":80},"Checks":[{"CheckID":"serfHealth","Status":"passing"}]},
          {"Node":{"Address":"10.0.0.2"},"Service":{"ID":"b","Address":"10.0.1.2","Port":80},"Checks":[{"CheckID":"service:b","Status":"critical"}]},
          {"Node":{"Address":"10.0.0.3"},"Service":{"ID":"c","Address":"10.0.1.3","Port":80},"Checks":[{"CheckID":"_service_maintenance:c","Status":"critical"}]},
          {"Node":{"Address":"10.0.0.4"},"Service":{"ID":"d","Address":"db.internal","Port":80},"Checks":[]},
          {"Node":{"Address":"10.0.0.5"},"Service":{"ID":"e","Address":"10.0.1.5","Port":0},"Checks":[]},
          {"Node":{"Address":"10.0.0.6"},"Service":{"ID":"f","Address":"10.0.1.6","Port":80,"Weights":{"Passing":0,"Warning":0}},"Checks":[]},
          {"Node":{"Address":"10.0.0.7","Meta":{"zone":"z1"}},"Service":{"ID":"g","Address":"10.0.1.7","Port":80,"Meta":null,"Tags":null},"Checks":[]}
        ]"#;
        let (list, rejected) = parse(body.as_bytes()).unwrap();
        let addrs: Vec<String> = list.iter().map(|i| i.addr.to_string()).collect();
        assert_eq!(
            addrs,
            ["10.0.0.1:80", "10.0.1.2:80", "10.0.1.3:80", "10.0.1.7:80"]
        );
        assert_eq!(list[1].state, State::Unhealthy);
        assert_eq!(list[2].state, State::Draining);
        assert_eq!(list[3].zone, "z1");
        assert_eq!(rejected.len(), 2);
        assert!(rejected[0].contains("`d`") && rejected[0].contains("not an IP"));
        assert!(rejected[1].contains("port 0"));
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn nulls_duplicate_keys_and_escapes() {
        let body = r#"[
          {"Node":{"Address":"10.0.0.1","Meta":null},
           "Service":{"ID":"a","Port":80,"Tags":null,"Meta":null,"Weights":null},"Checks":null},
          {"Node":{"Address":"10.0.0.2","Meta":{"zone":"node-zone"}},
           "Service":{"ID":"b","Port":80,"Tags":["x","x","v\u00e9"],
                      "Meta":{"zone":"z1","k":"1","zone":"z2"}},
           "Checks":[{"CheckID":"c","Status":"critical"},{"CheckID":"_node_maintenance","Status":"critical"}]}
        ]"#;
        let (v, rejected) = parse(body.as_bytes()).unwrap();
        assert!(rejected.is_empty());
        assert_eq!(v.len(), 2);
        assert_eq!(
            (v[0].state, v[0].weight, v[0].zone.as_str()),
            (State::Healthy, 1, "")
        );
        assert!(v[0].metadata.is_empty());
        // The last of a repeated key wins, as in a JSON object; a repeated tag is one key.
        assert_eq!(v[1].zone, "z2");
        assert_eq!(v[1].state, State::Draining);
        let keys: Vec<(&str, &str)> = v[1]
            .metadata
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        assert_eq!(
            keys,
            [
                ("k", "1"),
                ("tag:v\u{e9}", ""),
                ("tag:x", ""),
                ("zone", "z2")
            ]
        );
        // Not UTF-8, or a metadata value that is not a string: the whole answer is refused.
        assert!(matches!(parse(b"[\xff]"), Err(RegistryError::Malformed(_))));
        let bad = r#"[{"Node":{"Address":"10.0.0.1"},"Service":{"Port":80,"Meta":{"k":1}}}]"#;
        assert!(matches!(
            parse(bad.as_bytes()),
            Err(RegistryError::Malformed(_))
        ));
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn malformed_bodies_are_errors_not_panics() {
        for body in ["", "{", "{}", "[{\"Node\":1}]", "null", "[1,2]"] {
            assert!(
                matches!(parse(body.as_bytes()), Err(RegistryError::Malformed(_))),
                "{body}"
            );
        }
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn blocking_query_protocol() {
        let mut c = consul(r#","token":"s3cret","datacenter":"dc 1","tag":"v1","wait":"10s""#);
        let r = c.request();
        assert_eq!(r.path, "/v1/health/service/web?dc=dc%201&tag=v1");
        assert!(r
            .headers
            .contains(&("x-consul-token".into(), "s3cret".into())));
        assert_eq!(r.timeout_ms, 5000);

        let h = hdrs("42");
        let step = c
            .on_response(&HttpResponse {
                status: 200,
                headers: &h,
                body: REDIS.as_bytes(),
            })
            .unwrap();
        assert!(matches!(step, Step::Instances { ref instances, .. } if instances.len() == 1));
        let r = c.request();
        assert_eq!(
            r.path,
            "/v1/health/service/web?dc=dc%201&tag=v1&index=42&wait=10000ms"
        );
        assert_eq!(r.timeout_ms, 5000 + 10_000 + 625);

        // Same index: the body is not even looked at.
        let step = c
            .on_response(&HttpResponse {
                status: 200,
                headers: &h,
                body: b"garbage",
            })
            .unwrap();
        assert_eq!(step, Step::Unchanged);

        // Index went backwards: reset, so the next query does not block.
        let h = hdrs("7");
        c.on_response(&HttpResponse {
            status: 200,
            headers: &h,
            body: b"[]",
        })
        .unwrap();
        assert!(!c.request().path.contains("index="));
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn error_statuses() {
        let mut c = consul("");
        let h = hdrs("1");
        let e = c
            .on_response(&HttpResponse {
                status: 403,
                headers: &h,
                body: b"ACL not found",
            })
            .unwrap_err();
        assert_eq!(e, RegistryError::Auth("403 ACL not found".into()));
        let e = c
            .on_response(&HttpResponse {
                status: 500,
                headers: &h,
                body: b"No path to datacenter",
            })
            .unwrap_err();
        assert_eq!(e.kind(), "status");
        let envoy = vec![
            (":status".into(), "504".into()),
            ("content-length".into(), "24".into()),
        ];
        let e = c
            .on_response(&HttpResponse {
                status: 504,
                headers: &envoy,
                body: b"upstream request timeout",
            })
            .unwrap_err();
        assert_eq!(e.kind(), "unreachable");
        let bad = hdrs("x1");
        let e = c
            .on_response(&HttpResponse {
                status: 200,
                headers: &bad,
                body: b"[]",
            })
            .unwrap_err();
        assert_eq!(e.kind(), "malformed");
        assert_eq!(c.index, 0, "a failed answer leaves the index alone");
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn passing_only_and_non_blocking() {
        let mut c = consul(r#","passing_only":true,"blocking":false"#);
        let h = hdrs("5");
        c.on_response(&HttpResponse {
            status: 200,
            headers: &h,
            body: b"[]",
        })
        .unwrap();
        assert_eq!(c.request().path, "/v1/health/service/web?passing=1");
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn auth_method_login_and_relogin_on_expiry() {
        let mut c = consul(r#","auth_method":"kubernetes","bearer_token":"jwt-1""#);
        let r = c.request();
        assert_eq!((r.method, r.path.as_str()), ("POST", "/v1/acl/login"));
        let body: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(
            body,
            serde_json::json!({"AuthMethod": "kubernetes", "BearerToken": "jwt-1"})
        );
        let login = br#"{"AccessorID":"a","SecretID":"s-1","ExpirationTTL":"1h0m0s"}"#;
        let h = hdrs("1");
        assert_eq!(
            c.on_response(&HttpResponse {
                status: 200,
                headers: &h,
                body: login
            })
            .unwrap(),
            Step::Again("login")
        );
        let r = c.request();
        assert!(r.path.starts_with("/v1/health/service/web"));
        assert!(r.headers.contains(&("x-consul-token".into(), "s-1".into())));
        // Expired: 403, log in again at once.
        let step = c
            .on_response(&HttpResponse {
                status: 403,
                headers: &h,
                body: b"ACL not found",
            })
            .unwrap();
        assert_eq!(step, Step::Again("token_expired"));
        assert_eq!(c.request().path, "/v1/acl/login");
        let e = c
            .on_response(&HttpResponse {
                status: 403,
                headers: &h,
                body: b"Permission denied",
            })
            .unwrap_err();
        assert_eq!(e.kind(), "auth");
        assert!(e.to_string().contains("ACL login failed: 403"), "{e}");
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn consul_config_defaults_and_errors() {
        let c = one_source(r#"{"consul":{"cluster":"consul"}}"#).unwrap();
        let SourceConfig::Consul(k) = &c.services[0].sources[0] else {
            panic!()
        };
        assert_eq!(
            (k.blocking, k.wait, k.passing_only, k.authority()),
            (true, Millis(30_000), false, "consul")
        );
        let c = one_source(
            r#"{"consul":{"cluster":"consul","authority":"consul.local","auth_method":"k8s","bearer_token":"jwt"}}"#,
        )
        .unwrap();
        let SourceConfig::Consul(k) = &c.services[0].sources[0] else {
            panic!()
        };
        assert_eq!(k.authority(), "consul.local");
        for (src, want) in [
            (
                r#"{"consul":{"cluster":""}}"#,
                "services[0].sources[0].consul.cluster: must name an Envoy cluster",
            ),
            (
                r#"{"consul":{"cluster":"c","wait":"999ms"}}"#,
                "services[0].sources[0].consul.wait: must be between 1s and 10m",
            ),
            (
                r#"{"consul":{"cluster":"c","wait":"11m"}}"#,
                "services[0].sources[0].consul.wait: must be between 1s and 10m",
            ),
            (
                r#"{"consul":{"cluster":"c","token":"a\u0007b"}}"#,
                "services[0].sources[0].consul.token: contains control characters",
            ),
            (
                r#"{"consul":{"cluster":"c","auth_method":"k8s"}}"#,
                "services[0].sources[0].consul.auth_method: auth_method and bearer_token go together",
            ),
            (
                r#"{"consul":{"cluster":"c","auth_method":"k8s","bearer_token":"jwt","token":"t"}}"#,
                "services[0].sources[0].consul.token: use either token or auth_method, not both",
            ),
        ] {
            let e = one_source(src).unwrap_err();
            assert_eq!(e.0, want, "{src}");
        }
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn stale_consistent_and_cached_reads_are_asked_as_consul_spells_them() {
        let path = |extra: &str| consul(extra).request().path;
        assert_eq!(path(""), "/v1/health/service/web");
        assert_eq!(
            path(r#","consistency":"stale","cached":true,"passing_only":true"#),
            "/v1/health/service/web?passing=1&stale&cached"
        );
        assert_eq!(
            path(r#","consistency":"consistent""#),
            "/v1/health/service/web?consistent"
        );
        // Blocking queries keep their index and wait with either.
        let mut c = consul(r#","consistency":"stale","cached":true"#);
        c.index = 42;
        assert_eq!(
            c.request().path,
            "/v1/health/service/web?stale&cached&index=42&wait=30000ms"
        );
        // Consul refuses ?cached with ?consistent (400): refused here first.
        let e =
            one_source(r#"{"consul":{"cluster":"c","cached":true,"consistency":"consistent"}}"#)
                .unwrap_err();
        assert!(e.0.contains("cached"), "{e:?}");
        let e = one_source(r#"{"consul":{"cluster":"c","consistency":"eventual"}}"#).unwrap_err();
        assert!(e.0.contains("consistency"), "{e:?}");
    }
}
