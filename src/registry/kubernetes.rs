//! Kubernetes EndpointSlices through the API server:
//! `GET /apis/discovery.k8s.io/v1/namespaces/<ns>/endpointslices?labelSelector=kubernetes.io/service-name%3D<svc>`
//! with `Authorization: Bearer <token>`, polled every `refresh_interval`.
//!
//! Reference: Kubernetes API `discovery.k8s.io/v1` EndpointSlice and "API concepts"
//! (lists carry `metadata.resourceVersion`). The list's `resourceVersion` is the
//! change token: the same value is `Unchanged` without reading the items. Every
//! address of every endpoint is an instance, on the slice's port named `port_name`
//! (default: the slice's first TCP port). Conditions: `ready` (unset counts as ready),
//! `serving` + `terminating` → draining, not ready → unhealthy. `zone`, `nodeName`,
//! `hostname` and the Pod name (`targetRef`) become zone and metadata. The same
//! `address:port` in several slices (possible while slices are rebalanced) counts
//! once, in its best state. 401/403 answers are `Status` objects: their `message`
//! is put in the auth error. FQDN slices are refused per address (IP literals only).
//!
//! Read load (`watch_cache`, on by default), after "API concepts — Resource versions":
//! a list without `resourceVersion` is a quorum read through to etcd on every call.
//! Each list here instead asks `resourceVersionMatch=NotOlderThan` with the last
//! `resourceVersion` seen (`0` at first: any), which the API server answers from its
//! watch cache — no etcd read — and which never goes back in time, even across API
//! server replicas. A replica whose cache is behind waits up to 3s and answers 504
//! "Too large resource version"; the source then forgets its version (the next list
//! asks `0`) and keeps the last good list meanwhile. A watch (`watch=1`) is left out:
//! `dispatch_http_call` hands over an answer only when the call ends, so a change in
//! a long-poll watch would arrive only at its `timeoutSeconds`.

use super::{
    encode_component, envoy_local_failure, excerpt, HttpRequest, HttpResponse, RegistryError,
    ServiceRef, Step,
};
use crate::instance::Rejected;
use crate::instance::{self, Instance, State};
use crate::validate::{field_err, printable, ConfigError};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::Value;
use std::collections::HashMap;

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct KubernetesConfig {
    /// Envoy cluster that reaches the Kubernetes API server.
    pub cluster: String,
    #[serde(default)]
    pub authority: Option<String>,
    #[serde(default = "default_k8s_namespace")]
    pub namespace: String,
    /// Kubernetes Service name; defaults to the registry-lb service name.
    #[serde(default)]
    pub service: Option<String>,
    /// Name of the EndpointSlice port to use; default: each slice's first port.
    #[serde(default)]
    pub port_name: Option<String>,
    /// Bearer token (e.g. a ServiceAccount token allowed to list endpointslices).
    #[serde(default)]
    pub token: Option<String>,
    /// Lists served from the API server's watch cache (see the module doc); `false`
    /// reads through to etcd every time.
    #[serde(default = "default_true")]
    pub watch_cache: bool,
}

fn default_true() -> bool {
    true
}

fn default_k8s_namespace() -> String {
    "default".to_string()
}

impl KubernetesConfig {
    /// `:authority` of registry calls: `authority`, else the cluster name.
    pub fn authority(&self) -> &str {
        self.authority.as_deref().unwrap_or(&self.cluster)
    }

    /// Checks what the types cannot; `at` names this source in errors
    /// (`services[0].sources[1].kubernetes`).
    /// `service_name` is the registry-lb service, the default Kubernetes Service.
    pub fn validate(&self, at: &str, service_name: &str) -> Result<(), ConfigError> {
        if self.cluster.is_empty() {
            return field_err(at, "cluster", "must name an Envoy cluster");
        }
        if !dns_label(&self.namespace) {
            return field_err(
                at,
                "namespace",
                "must be a DNS label (lowercase letters, digits, '-')",
            );
        }
        match &self.service {
            Some(s) if !dns_label(s) => {
                return field_err(
                    at,
                    "service",
                    "must be a DNS label (lowercase letters, digits, '-')",
                );
            }
            None if !dns_label(service_name) => {
                return field_err(
                    at,
                    "service",
                    &format!("required: the service name `{service_name}` is not a Kubernetes Service name (DNS label)"),
                );
            }
            _ => {}
        }
        if self
            .port_name
            .as_deref()
            .is_some_and(|p| p.is_empty() || !printable(p))
        {
            return field_err(at, "port_name", "must be a non-empty port name");
        }
        if self
            .token
            .as_deref()
            .is_some_and(|t| t.is_empty() || !printable(t))
        {
            return field_err(at, "token", "must be non-empty, without control characters");
        }
        Ok(())
    }
}

/// RFC 1123 label, as Kubernetes requires of namespace and Service names.
fn dns_label(s: &str) -> bool {
    (1..=63).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

#[derive(Debug)]
pub struct Kubernetes {
    cfg: KubernetesConfig,
    service: String,
    request_timeout_ms: u64,
    /// `metadata.resourceVersion` of the last list applied; "" = none.
    pub resource_version: String,
}

#[derive(Deserialize)]
struct ListHead<'a> {
    #[serde(default)]
    kind: Option<String>,
    #[serde(default)]
    metadata: Option<ListMeta>,
    #[serde(borrow, default)]
    items: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct ListMeta {
    #[serde(default, rename = "resourceVersion")]
    resource_version: Option<String>,
}

#[derive(Deserialize)]
struct Slice {
    #[serde(default)]
    metadata: Option<ObjectMeta>,
    #[serde(default)]
    endpoints: Option<Vec<Endpoint>>,
    #[serde(default)]
    ports: Option<Vec<Port>>,
}

#[derive(Deserialize)]
struct ObjectMeta {
    #[serde(default)]
    name: Option<String>,
}

#[derive(Deserialize)]
struct Port {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    port: Option<i64>,
    #[serde(default)]
    protocol: Option<String>,
}

#[derive(Deserialize)]
struct Endpoint {
    #[serde(default)]
    addresses: Vec<String>,
    #[serde(default)]
    conditions: Option<Conditions>,
    #[serde(default)]
    hostname: Option<String>,
    #[serde(default, rename = "nodeName")]
    node_name: Option<String>,
    #[serde(default)]
    zone: Option<String>,
    #[serde(default, rename = "targetRef")]
    target_ref: Option<TargetRef>,
}

#[derive(Deserialize)]
struct Conditions {
    #[serde(default)]
    ready: Option<bool>,
    #[serde(default)]
    serving: Option<bool>,
    #[serde(default)]
    terminating: Option<bool>,
}

#[derive(Deserialize)]
struct TargetRef {
    #[serde(default)]
    kind: Option<String>,
    #[serde(default)]
    name: Option<String>,
}

#[derive(Deserialize)]
struct StatusObject {
    #[serde(default)]
    message: Option<String>,
}

impl Kubernetes {
    pub fn new(svc: ServiceRef, cfg: &KubernetesConfig) -> Kubernetes {
        Kubernetes {
            service: cfg.service.clone().unwrap_or_else(|| svc.name.to_string()),
            cfg: cfg.clone(),
            request_timeout_ms: svc.request_timeout_ms,
            resource_version: String::new(),
        }
    }

    pub fn request(&self) -> HttpRequest {
        let mut headers = vec![("accept".to_string(), "application/json".to_string())];
        if let Some(t) = &self.cfg.token {
            headers.push(("authorization".to_string(), format!("Bearer {t}")));
        }
        HttpRequest {
            cluster: self.cfg.cluster.clone(),
            method: "GET",
            authority: self.cfg.authority().to_string(),
            path: {
                let mut p = format!(
                    "/apis/discovery.k8s.io/v1/namespaces/{}/endpointslices?labelSelector=kubernetes.io/service-name%3D{}",
                    encode_component(&self.cfg.namespace),
                    encode_component(&self.service)
                );
                if self.cfg.watch_cache {
                    let rv = if self.resource_version.is_empty() {
                        "0"
                    } else {
                        &self.resource_version
                    };
                    p.push_str("&resourceVersion=");
                    p.push_str(&encode_component(rv));
                    p.push_str("&resourceVersionMatch=NotOlderThan");
                }
                p
            },
            headers,
            body: Vec::new(),
            timeout_ms: self.request_timeout_ms,
        }
    }

    pub fn on_response(&mut self, resp: &HttpResponse) -> Result<Step, RegistryError> {
        // A cache behind the version asked for (504 "Too large resource version"), or
        // a version the server no longer knows (410 Gone): ask for any version next.
        let too_large =
            || String::from_utf8_lossy(resp.body).contains("Too large resource version");
        if resp.status == 410 || (resp.status == 504 && too_large()) {
            self.resource_version.clear();
        }
        if let Some(e) = envoy_local_failure(resp) {
            return Err(e);
        }
        match resp.status {
            200 => self.on_list(resp.body),
            401 | 403 => Err(RegistryError::Auth(format!(
                "{} {}",
                resp.status,
                status_message(resp.body)
            ))),
            s => Err(RegistryError::Status(s, status_message(resp.body))),
        }
    }

    fn on_list(&mut self, body: &[u8]) -> Result<Step, RegistryError> {
        let head: ListHead = serde_json::from_slice(body)
            .map_err(|e| RegistryError::Malformed(format!("kubernetes endpointslice list: {e}")))?;
        if let Some(kind) = head.kind.as_deref() {
            if kind != "EndpointSliceList" {
                return Err(RegistryError::Malformed(format!(
                    "kubernetes answered a `{}`, not an EndpointSliceList",
                    instance::truncate(kind, 40)
                )));
            }
        }
        let items = head.items.ok_or_else(|| {
            RegistryError::Malformed("kubernetes endpointslice list without `items`".into())
        })?;
        let rv = head
            .metadata
            .and_then(|m| m.resource_version)
            .unwrap_or_default();
        if !rv.is_empty() && rv == self.resource_version {
            return Ok(Step::Unchanged);
        }
        let raw: Vec<Value> = serde_json::from_str(items.get()).map_err(|e| {
            RegistryError::Malformed(format!("kubernetes endpointslice `items`: {e}"))
        })?;
        let (instances, rejected) = parse_slices(raw, self.cfg.port_name.as_deref());
        self.resource_version = rv;
        Ok(Step::Instances {
            instances,
            rejected,
            warnings: Vec::new(),
        })
    }
}

/// The `message` of a Kubernetes `Status` answer, else an excerpt of the body.
fn status_message(body: &[u8]) -> String {
    match serde_json::from_slice::<StatusObject>(body) {
        Ok(StatusObject { message: Some(m) }) if !m.is_empty() => instance::truncate(&m, 300),
        _ => excerpt(body),
    }
}

fn rank(s: State) -> u8 {
    match s {
        State::Healthy => 0,
        State::Draining => 1,
        State::Unhealthy => 2,
    }
}

fn parse_slices(raw: Vec<Value>, port_name: Option<&str>) -> (Vec<Instance>, Rejected) {
    let mut out: Vec<Instance> = Vec::new();
    let mut at: HashMap<std::net::SocketAddr, usize> = HashMap::new();
    let mut rejected = Rejected::default();
    for (k, v) in raw.into_iter().enumerate() {
        let slice: Slice = match serde_json::from_value(v) {
            Ok(s) => s,
            Err(e) => {
                rejected.push(format!("endpointslice #{k}: {e}"));
                continue;
            }
        };
        let name = slice
            .metadata
            .and_then(|m| m.name)
            .unwrap_or_else(|| format!("#{k}"));
        let name = instance::truncate(&name, 96);
        let endpoints = slice.endpoints.unwrap_or_default();
        if endpoints.is_empty() {
            continue;
        }
        let ports = slice.ports.unwrap_or_default();
        let tcp = |p: &&Port| matches!(p.protocol.as_deref(), None | Some("TCP"));
        let port = match port_name {
            Some(n) => ports.iter().find(|p| p.name.as_deref() == Some(n)),
            None => ports.iter().find(tcp),
        };
        let port = match port.and_then(|p| p.port) {
            Some(p) => p,
            None => {
                let what = match port_name {
                    Some(n) => format!("no port named `{}`", instance::truncate(n, 64)),
                    None => "no TCP port".to_string(),
                };
                rejected.push(format!(
                    "endpointslice `{name}`: {what}; its {} endpoint(s) skipped",
                    endpoints.len()
                ));
                continue;
            }
        };
        for ep in endpoints {
            let c = ep.conditions.as_ref();
            let ready = c.and_then(|c| c.ready).unwrap_or(true);
            let serving = c.and_then(|c| c.serving).unwrap_or(ready);
            let terminating = c.and_then(|c| c.terminating).unwrap_or(false);
            let state = if terminating {
                if serving {
                    State::Draining
                } else {
                    State::Unhealthy
                }
            } else if ready {
                State::Healthy
            } else {
                State::Unhealthy
            };
            let mut meta: Vec<(String, String)> = Vec::new();
            if let Some(h) = &ep.hostname {
                meta.push(("hostname".into(), h.clone()));
            }
            if let Some(n) = &ep.node_name {
                meta.push(("node".into(), n.clone()));
            }
            if let Some(TargetRef {
                kind: Some(kind),
                name: Some(n),
            }) = &ep.target_ref
            {
                if kind == "Pod" {
                    meta.push(("pod".into(), n.clone()));
                }
            }
            meta.sort();
            for a in &ep.addresses {
                let addr = match instance::socket_addr(a, port) {
                    Ok(x) => x,
                    Err(e) => {
                        rejected.push(format!("endpointslice `{name}`: {e}"));
                        continue;
                    }
                };
                let mut inst = Instance::new(addr, 1);
                inst.state = state;
                inst.zone = ep.zone.clone().unwrap_or_default();
                inst.metadata = meta.clone();
                match at.get(&addr) {
                    Some(&i) => {
                        if rank(state) < rank(out[i].state) {
                            out[i] = inst;
                        }
                    }
                    None => {
                        at.insert(addr, out.len());
                        out.push(inst);
                    }
                }
            }
        }
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

    const LIST: &str = include_str!("../../tests/fixtures/kubernetes/endpointslicelist_v1.json");
    const DOCS: &str =
        include_str!("../../tests/fixtures/kubernetes/endpointslice_docs_example.json");
    const FORBIDDEN: &str =
        include_str!("../../tests/fixtures/kubernetes/status_403_forbidden.json");

    fn k8s(extra: &str) -> Kubernetes {
        let svc = service("example", "kubernetes", "k8s", extra);
        match &svc.sources[0] {
            SourceConfig::Kubernetes(k) => Kubernetes::new(svc.for_registry(), k),
            _ => unreachable!(),
        }
    }

    fn instances(step: Step) -> (Vec<Instance>, Rejected) {
        match step {
            Step::Instances {
                instances,
                rejected,
                ..
            } => (instances, rejected),
            other => panic!("expected instances, got {other:?}"),
        }
    }

    fn slice(name: &str, ports: &str, endpoints: &str) -> String {
        format!(
            r#"{{"metadata":{{"name":"{name}","labels":{{"kubernetes.io/service-name":"example"}}}},"addressType":"IPv4","ports":{ports},"endpoints":{endpoints}}}"#
        )
    }

    fn list(rv: &str, slices: &[String]) -> String {
        format!(
            r#"{{"kind":"EndpointSliceList","apiVersion":"discovery.k8s.io/v1","metadata":{{"resourceVersion":"{rv}"}},"items":[{}]}}"#,
            slices.join(",")
        )
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn request_shape() {
        let k = k8s(r#","token":"ey.abc""#);
        let r = k.request();
        assert_eq!(
            r.path,
            "/apis/discovery.k8s.io/v1/namespaces/default/endpointslices?labelSelector=kubernetes.io/service-name%3Dexample&resourceVersion=0&resourceVersionMatch=NotOlderThan"
        );
        assert!(r
            .headers
            .contains(&("authorization".into(), "Bearer ey.abc".into())));
        let k = k8s(r#","namespace":"prod","service":"web-v2""#);
        let r = k.request();
        assert!(r
            .path
            .starts_with("/apis/discovery.k8s.io/v1/namespaces/prod/endpointslices?"));
        assert!(r.path.contains("service-name%3Dweb-v2&resourceVersion=0&"));
        assert!(!r.headers.iter().any(|(h, _)| h == "authorization"));
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn lists_ask_the_watch_cache_for_no_older_than_the_last_version() {
        let base = "/apis/discovery.k8s.io/v1/namespaces/default/endpointslices?labelSelector=kubernetes.io/service-name%3Dexample";
        let mut k = k8s("");
        k.on_response(&resp(200, &list("4711", &[]))).unwrap();
        assert_eq!(
            k.request().path,
            format!("{base}&resourceVersion=4711&resourceVersionMatch=NotOlderThan")
        );
        // A replica whose cache is behind: 504, then any version again.
        let too_large = r#"{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","message":"Too large resource version: 4711, current: 4700","reason":"Timeout","details":{"causes":[{"reason":"ResourceVersionTooLarge","message":"Too large resource version"}],"retryAfterSeconds":1},"code":504}"#;
        // As the API server sends it (Envoy adds the last header); not a reply of Envoy's own.
        let headers: Vec<(String, String)> = [
            ("audit-id", "5b1c6c1e-3d1f-4a83-9f7e-0d1c2b3a4f5e"),
            ("cache-control", "no-cache, private"),
            ("content-type", "application/json"),
            (
                "x-kubernetes-pf-flowschema-uid",
                "e3a1b5f0-7d3c-4d5e-8f9a-0b1c2d3e4f5a",
            ),
            (
                "x-kubernetes-pf-prioritylevel-uid",
                "1a2b3c4d-5e6f-4a8b-9c0d-1e2f3a4b5c6d",
            ),
            ("date", "Mon, 30 Nov 2026 14:00:00 GMT"),
            ("x-envoy-upstream-service-time", "3001"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let answer = HttpResponse {
            status: 504,
            headers: &headers,
            body: too_large.as_bytes(),
        };
        let e = k.on_response(&answer).unwrap_err();
        assert!(
            matches!(&e, RegistryError::Status(504, m) if m.contains("Too large resource version")),
            "{e:?}"
        );
        assert_eq!(
            k.request().path,
            format!("{base}&resourceVersion=0&resourceVersionMatch=NotOlderThan")
        );
        // Another failure keeps the version.
        k.on_response(&resp(200, &list("4712", &[]))).unwrap();
        let _ = k.on_response(&resp(500, "{}"));
        assert!(k.request().path.contains("resourceVersion=4712&"));
        // watch_cache off: no version, a read through to etcd.
        let mut k = k8s(r#","watch_cache":false"#);
        k.on_response(&resp(200, &list("4711", &[]))).unwrap();
        assert_eq!(k.request().path, base);
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn parses_the_list_with_a_terminating_endpoint() {
        let mut k = k8s("");
        let (list, rejected) = instances(k.on_response(&resp(200, LIST)).unwrap());
        assert!(rejected.is_empty(), "{rejected:?}");
        let got: Vec<(String, State, String)> = list
            .iter()
            .map(|i| (i.addr.to_string(), i.state, i.zone.clone()))
            .collect();
        assert_eq!(
            got,
            [
                (
                    "10.1.2.3:80".to_string(),
                    State::Healthy,
                    "us-west2-a".to_string()
                ),
                (
                    "10.1.2.4:80".to_string(),
                    State::Draining,
                    "us-west2-b".to_string()
                ),
            ]
        );
        assert_eq!(
            list[0].metadata,
            vec![
                ("hostname".to_string(), "pod-1".to_string()),
                ("node".to_string(), "node-1".to_string()),
                ("pod".to_string(), "example-7d9f8-a".to_string())
            ]
        );
        assert_eq!(k.resource_version, "123456");
        // Same resourceVersion: not even parsed.
        assert_eq!(k.on_response(&resp(200, LIST)).unwrap(), Step::Unchanged);
        let moved = LIST.replace("\"123456\"", "\"123457\"");
        assert!(matches!(
            k.on_response(&resp(200, &moved)).unwrap(),
            Step::Instances { .. }
        ));
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn parses_the_documentation_example() {
        let mut k = k8s(r#","port_name":"http""#);
        let (list, _) = instances(k.on_response(&resp(200, DOCS)).unwrap());
        assert_eq!(list.len(), 1);
        assert_eq!(
            (
                list[0].addr.to_string(),
                list[0].state,
                list[0].zone.as_str()
            ),
            ("10.1.2.3:80".to_string(), State::Healthy, "us-west2-a")
        );
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn conditions_ports_duplicates_and_bad_addresses() {
        let ports = r#"[{"name":"metrics","protocol":"TCP","port":9090},{"name":"http","protocol":"TCP","port":8080}]"#;
        let a = slice(
            "example-a",
            ports,
            r#"[{"addresses":["10.0.0.1"],"conditions":{"ready":true}},
                {"addresses":["10.0.0.2","10.0.0.3"],"conditions":{"ready":false,"serving":false,"terminating":false}},
                {"addresses":["10.0.0.4"],"conditions":{"ready":false,"serving":false,"terminating":true}},
                {"addresses":["10.0.0.5"],"conditions":{}},
                {"addresses":["10.0.0.6"],"conditions":{"ready":false,"serving":true,"terminating":true}}]"#,
        );
        // The same endpoints again in another slice (rebalancing), one now ready.
        let b = slice(
            "example-b",
            ports,
            r#"[{"addresses":["10.0.0.1"],"conditions":{"ready":false}},
                {"addresses":["10.0.0.2"],"conditions":{"ready":true}},
                {"addresses":["db.example.com"],"conditions":{"ready":true}}]"#,
        );
        let no_port = slice(
            "example-c",
            r#"[{"name":"grpc","port":9000}]"#,
            r#"[{"addresses":["10.0.0.9"]}]"#,
        );
        let empty = slice("example-d", "null", "null");
        let body = list("7", &[a, b, no_port, empty]);
        let mut k = k8s(r#","port_name":"http""#);
        let (list, rejected) = instances(k.on_response(&resp(200, &body)).unwrap());
        let got: Vec<(String, State)> =
            list.iter().map(|i| (i.addr.to_string(), i.state)).collect();
        assert_eq!(
            got,
            [
                ("10.0.0.1:8080".to_string(), State::Healthy),
                ("10.0.0.2:8080".to_string(), State::Healthy),
                ("10.0.0.3:8080".to_string(), State::Unhealthy),
                ("10.0.0.4:8080".to_string(), State::Unhealthy),
                ("10.0.0.5:8080".to_string(), State::Healthy),
                ("10.0.0.6:8080".to_string(), State::Draining),
            ]
        );
        assert_eq!(rejected.len(), 2, "{rejected:?}");
        assert!(
            rejected[0].contains("`db.example.com` is not an IP literal"),
            "{rejected:?}"
        );
        assert_eq!(
            rejected[1],
            "endpointslice `example-c`: no port named `http`; its 1 endpoint(s) skipped"
        );
        // Without port_name: the first TCP port.
        let udp_first = slice(
            "example-e",
            r#"[{"name":"dns","protocol":"UDP","port":53},{"name":"web","port":8081}]"#,
            r#"[{"addresses":["10.0.0.1"]}]"#,
        );
        let mut k = k8s("");
        let (list, _) = instances(k.on_response(&resp(200, &list_of("8", udp_first))).unwrap());
        assert_eq!(list[0].addr.to_string(), "10.0.0.1:8081");
    }

    fn list_of(rv: &str, s: String) -> String {
        list(rv, &[s])
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn forbidden_status_message_is_in_the_auth_error() {
        let mut k = k8s("");
        let e = k.on_response(&resp(403, FORBIDDEN)).unwrap_err();
        assert_eq!(e.kind(), "auth");
        assert!(
            e.to_string().contains("403 endpointslices.discovery.k8s.io is forbidden: User \"system:serviceaccount:default:default\" cannot list"),
            "{e}"
        );
        let unauthorized = r#"{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","message":"Unauthorized","reason":"Unauthorized","code":401}"#;
        let e = k.on_response(&resp(401, unauthorized)).unwrap_err();
        assert_eq!(e, RegistryError::Auth("401 Unauthorized".into()));
        let e = k
            .on_response(&resp(
                404,
                r#"{"kind":"Status","message":"namespaces \"nope\" not found"}"#,
            ))
            .unwrap_err();
        assert_eq!(
            e,
            RegistryError::Status(404, "namespaces \"nope\" not found".into())
        );
        assert_eq!(
            k.on_response(&resp(500, "<html>")).unwrap_err(),
            RegistryError::Status(500, "<html>".into())
        );
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn malformed_bodies_are_errors_not_panics() {
        for body in NOT_AN_ANSWER.into_iter().chain([
            r#"{"kind":"Status","items":[]}"#,
            r#"{"metadata":{"resourceVersion":"1"},"items":{}}"#,
            r#"{"metadata":{"resourceVersion":5},"items":[]}"#,
        ]) {
            let mut k = k8s("");
            assert_eq!(
                k.on_response(&resp(200, body)).unwrap_err().kind(),
                "malformed",
                "{body}"
            );
            assert_eq!(k.resource_version, "");
        }
        // Slices of the wrong shape are skipped one by one.
        let mut k = k8s("");
        let (list, rejected) = instances(
            k.on_response(&resp(
                200,
                r#"{"metadata":{"resourceVersion":"3"},"items":[5,{"endpoints":7}]}"#,
            ))
            .unwrap(),
        );
        assert!(list.is_empty());
        assert_eq!(rejected.len(), 2);
        let e = k
            .on_response(&resp(
                200,
                r#"{"metadata":{"resourceVersion":"4"},"items":null}"#,
            ))
            .unwrap_err();
        assert_eq!(e.kind(), "malformed");
        assert_eq!(k.resource_version, "3");
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn kubernetes_source_defaults_and_errors() {
        let c = one_source(r#"{"kubernetes":{"cluster":"k8s"}}"#).unwrap();
        let SourceConfig::Kubernetes(k) = &c.services[0].sources[0] else {
            panic!()
        };
        assert_eq!(
            (
                k.namespace.as_str(),
                k.service.as_deref(),
                k.port_name.as_deref()
            ),
            ("default", None, None)
        );
        one_source(r#"{"kubernetes":{"cluster":"k8s","namespace":"prod","service":"web-v2","port_name":"http","token":"ey.x"}}"#).unwrap();
        for (src, want) in [
            (
                r#"{"kubernetes":{"cluster":"k","namespace":"Prod"}}"#,
                "services[0].sources[0].kubernetes.namespace: ",
            ),
            (
                r#"{"kubernetes":{"cluster":"k","service":"web_v2"}}"#,
                "services[0].sources[0].kubernetes.service: ",
            ),
            (
                r#"{"kubernetes":{"cluster":"k","token":"a
b"}}"#,
                "services[0].sources[0].kubernetes.token: ",
            ),
            (
                r#"{"kubernetes":{"cluster":"k","port_name":""}}"#,
                "services[0].sources[0].kubernetes.port_name: ",
            ),
            (
                r#"{"kubernetes":{"cluster":"k","labels":{}}}"#,
                "services[0].sources[0].kubernetes.labels: unknown field",
            ),
        ] {
            let e = one_source(src).unwrap_err();
            assert!(e.0.starts_with(want), "{src}: {}", e.0);
        }
        // The default Service name is the registry-lb service name, which must then fit.
        let e = crate::config::PluginConfig::parse(
            br#"{"services":[{"name":"Web_1","sources":[{"kubernetes":{"cluster":"k"}}]}]}"#,
        )
        .unwrap_err();
        assert!(
            e.0.starts_with("services[0].sources[0].kubernetes.service: required"),
            "{}",
            e.0
        );
    }
}
