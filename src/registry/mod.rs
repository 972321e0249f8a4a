//! Registry sources. Each source is a small state machine with no host calls: it
//! says which HTTP call to make next ([`Source::request`]) and turns the answer into
//! instances ([`Source::on_response`]). The host layer performs the calls.

pub mod consul;
pub mod etcd;
pub mod eureka;
pub mod kubernetes;
pub mod nacos;
pub mod static_list;

pub use crate::http_call::{HttpRequest, HttpResponse};
use crate::instance::Instance;

/// What a source needs to know of the service it feeds.
#[derive(Debug, Clone, Copy)]
pub struct ServiceRef<'a> {
    /// The registry-lb service name, the default name to look up in the registry.
    pub name: &'a str,
    /// Timeout of one registry call.
    pub request_timeout_ms: u64,
}

/// What a registry answer meant.
#[derive(Debug, PartialEq)]
pub enum Step {
    /// Same index/revision as last time: nothing was parsed.
    Unchanged,
    /// A fresh list. `rejected` lists entries that were skipped, with the reason;
    /// `warnings` are things about the whole answer worth an operator's attention
    /// (e.g. Nacos' protect threshold): the list is used, the host logs and counts them.
    Instances {
        instances: Vec<Instance>,
        rejected: crate::instance::Rejected,
        warnings: Vec<String>,
    },
    /// Intermediate step done: make the next call now. The reason names it for
    /// metrics: `login` (a token was obtained), `token_expired` (it was refused).
    Again(&'static str),
}

/// Why a refresh failed. The last good list is kept in every case.
#[derive(Debug, PartialEq, Eq, Clone)]
pub enum RegistryError {
    /// No answer: connect failure, reset or timeout (Envoy's own 503/504 replies).
    Unreachable(String),
    /// The registry refused our credentials (401/403, failed login).
    Auth(String),
    /// Any other non-success status.
    Status(u16, String),
    /// A body we could not understand.
    Malformed(String),
    /// A body over `max_response_bytes`.
    TooLarge(usize),
}

impl RegistryError {
    /// Short name used in metric names.
    pub fn kind(&self) -> &'static str {
        match self {
            RegistryError::Unreachable(_) => "unreachable",
            RegistryError::Auth(_) => "auth",
            RegistryError::Status(..) => "status",
            RegistryError::Malformed(_) => "malformed",
            RegistryError::TooLarge(_) => "too_large",
        }
    }
}

impl std::fmt::Display for RegistryError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RegistryError::Unreachable(m) => write!(f, "registry unreachable: {m}"),
            RegistryError::Auth(m) => write!(f, "registry refused credentials: {m}"),
            RegistryError::Status(s, m) => write!(f, "registry answered {s}: {m}"),
            RegistryError::Malformed(m) => write!(f, "malformed registry answer: {m}"),
            RegistryError::TooLarge(n) => {
                write!(f, "registry answer of {n} bytes is over max_response_bytes; raise it in the service's configuration if the answer is expected")
            }
        }
    }
}

/// Errors Envoy produces itself when the registry cannot be reached: a local reply
/// with only a few headers, `503` (connect failure / reset) or `504` (timeout).
pub fn envoy_local_failure(resp: &HttpResponse) -> Option<RegistryError> {
    let from_envoy = resp.header("server").is_none() && resp.headers.len() <= 4;
    match resp.status {
        503 | 504 if from_envoy => Some(RegistryError::Unreachable(format!(
            "{} {}",
            resp.status,
            crate::instance::truncate(&String::from_utf8_lossy(resp.body), 120)
        ))),
        _ => None,
    }
}

/// Short, printable excerpt of an error body for logs.
pub fn excerpt(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let one_line: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    crate::instance::truncate(one_line.trim(), 160)
}

/// One registry source with its protocol state. A static list is no source: it
/// makes no calls (see `poller`).
#[derive(Debug)]
pub enum Source {
    Consul(consul::Consul),
    Etcd(etcd::Etcd),
    Nacos(nacos::Nacos),
    Eureka(eureka::Eureka),
    Kubernetes(kubernetes::Kubernetes),
}

impl Source {
    /// The next call to make. `now_ms` is wall-clock time, for sources whose
    /// credentials expire (Nacos tokens).
    pub fn request(&mut self, now_ms: u64) -> HttpRequest {
        match self {
            Source::Consul(c) => c.request(),
            Source::Etcd(e) => e.request(),
            Source::Nacos(n) => n.request(now_ms),
            Source::Eureka(e) => e.request(),
            Source::Kubernetes(k) => k.request(),
        }
    }

    pub fn on_response(
        &mut self,
        resp: &HttpResponse,
        max_bytes: usize,
    ) -> Result<Step, RegistryError> {
        if resp.body.len() > max_bytes {
            return Err(RegistryError::TooLarge(resp.body.len()));
        }
        match self {
            Source::Consul(c) => c.on_response(resp),
            Source::Etcd(e) => e.on_response(resp),
            Source::Nacos(n) => n.on_response(resp),
            Source::Eureka(e) => e.on_response(resp),
            Source::Kubernetes(k) => k.on_response(resp),
        }
    }

    /// Change token to carry over to another poller (Consul index, etcd revision,
    /// Kubernetes resourceVersion, hash of the last Nacos/Eureka list).
    pub fn token(&self) -> String {
        match self {
            Source::Consul(c) => c.index.to_string(),
            Source::Etcd(e) => e.token(),
            Source::Nacos(n) => n.token(),
            Source::Eureka(e) => e.token(),
            Source::Kubernetes(k) => k.resource_version.clone(),
        }
    }

    pub fn restore_token(&mut self, token: &str) {
        match self {
            Source::Consul(c) => c.index = token.parse().unwrap_or(0),
            Source::Etcd(e) => e.restore_token(token),
            Source::Nacos(n) => n.restore_token(token),
            Source::Eureka(e) => e.restore_token(token),
            Source::Kubernetes(k) => k.resource_version = token.to_string(),
        }
    }

    /// Short name of the registry kind, for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Source::Consul(_) => "consul",
            Source::Etcd(_) => "etcd",
            Source::Nacos(_) => "nacos",
            Source::Eureka(_) => "eureka",
            Source::Kubernetes(_) => "kubernetes",
        }
    }

    /// While the guard holds a change: re-read within `ms` — a blocking query
    /// waits at most that long (so a recovery is still seen at once); other
    /// sources poll every refresh interval anyway.
    pub fn confirm_within(&mut self, ms: u64) {
        if let Source::Consul(c) = self {
            c.next_wait_ms = Some(ms.max(1000));
        }
    }

    /// True when the next answer may take long by design (a blocking query).
    pub fn is_blocking(&self) -> bool {
        matches!(self, Source::Consul(c) if c.blocking())
    }
}

/// FNV-1a 64 of some bytes, as a change token for registries without one.
pub fn fnv64(bytes: &[u8]) -> u64 {
    use std::hash::Hasher;
    let mut h = fnv::FnvHasher::default();
    h.write(bytes);
    h.finish()
}

/// Percent-encodes a query-string component (RFC 3986 unreserved set kept).
pub fn encode_component(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Helpers shared by the registry modules' tests.
#[cfg(test)]
pub(crate) mod test_util {
    use super::HttpResponse;
    use crate::config::{ConfigError, PluginConfig, ServiceConfig};

    /// The configuration of one service `web` with this one source, parsed and checked.
    pub fn one_source(src: &str) -> Result<PluginConfig, ConfigError> {
        PluginConfig::parse(
            format!(r#"{{"services":[{{"name":"web","sources":[{src}]}}]}}"#).as_bytes(),
        )
    }

    /// Service `name` of a one-source configuration `{"<kind>":{"cluster":"<cluster>"<extra>}}`.
    pub fn service(name: &str, kind: &str, cluster: &str, extra: &str) -> ServiceConfig {
        let json = format!(
            r#"{{"services":[{{"name":"{name}","sources":[{{"{kind}":{{"cluster":"{cluster}"{extra}}}}}]}}]}}"#
        );
        PluginConfig::parse(json.as_bytes())
            .unwrap()
            .services
            .remove(0)
    }

    /// Bodies no JSON object answer can be: empty, cut short, an array, `null`, an
    /// empty object. Each registry's malformed-answer test adds its own shapes.
    pub const NOT_AN_ANSWER: [&str; 5] = ["", "{", "[]", "null", "{}"];

    /// An answer without headers.
    pub fn resp(status: u16, body: &str) -> HttpResponse<'_> {
        HttpResponse {
            status,
            headers: &[],
            body: body.as_bytes(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wasm_bindgen_test::wasm_bindgen_test;

    #[wasm_bindgen_test(unsupported = test)]
    fn encodes_query_components() {
        assert_eq!(encode_component("web"), "web");
        assert_eq!(encode_component("a b/c?&"), "a%20b%2Fc%3F%26");
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn recognises_envoy_local_failures() {
        let h = vec![
            ("content-length".to_string(), "91".to_string()),
            ("content-type".to_string(), "text/plain".to_string()),
            (":status".to_string(), "503".to_string()),
        ];
        let r = HttpResponse {
            status: 503,
            headers: &h,
            body: b"upstream connect error",
        };
        assert!(matches!(
            envoy_local_failure(&r),
            Some(RegistryError::Unreachable(_))
        ));
        let r = HttpResponse {
            status: 200,
            headers: &h,
            body: b"",
        };
        assert_eq!(envoy_local_failure(&r), None);
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn excerpt_is_one_short_line() {
        let e = excerpt(b"line1\nline2\r\n");
        assert_eq!(e, "line1 line2");
        assert!(excerpt(&[b'x'; 1000]).chars().count() <= 161);
    }
}
