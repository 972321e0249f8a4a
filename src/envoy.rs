//! What registry-lb needs from Envoy, as one narrow interface.
//!
//! Everything that decides — the request path, the tables, the poller duty — is
//! written against [`Envoy`] and takes it as an argument. `src/host/` implements it
//! with proxy-wasm host calls (the only place that talks to Envoy); tests use
//! [`fake::FakeEnvoy`], which records what was asked of it.
//!
//! Calls about "the request" act on the request Envoy is running the filter for, or,
//! inside a root callback, on the one named by [`Envoy::set_effective_context`] — as
//! the proxy-wasm ABI does.

use crate::http_call::HttpRequest;

/// A host call that did not succeed, as proxy-wasm reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HostError {
    /// The key, property, context or function does not exist.
    NotFound,
    /// The host refused the arguments.
    BadArgument,
    /// A shared-data write lost its compare-and-swap.
    CasMismatch,
    /// Anything else (status code as the host sent it).
    Other(u32),
}

impl std::fmt::Display for HostError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HostError::NotFound => f.write_str("NotFound"),
            HostError::BadArgument => f.write_str("BadArgument"),
            HostError::CasMismatch => f.write_str("CasMismatch"),
            HostError::Other(s) => write!(f, "status {s}"),
        }
    }
}

/// Kinds of Envoy stats.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MetricKind {
    Counter,
    Gauge,
}

/// What an outstanding `dispatch_http_call` answered with, as read from the host.
pub struct CallAnswer {
    /// Response headers; empty on a reset or an answer Envoy refused to buffer.
    pub headers: Vec<(String, String)>,
    /// The body, if it was read (see [`Envoy::call_answer`]).
    pub body: Vec<u8>,
}

/// The host: Envoy through proxy-wasm, or a fake in tests.
pub trait Envoy {
    /// Wall-clock microseconds (read on each call).
    fn now_us(&self) -> u64;
    /// Wall-clock milliseconds.
    fn now_ms(&self) -> u64 {
        self.now_us() / 1000
    }

    // Shared data: one store per Envoy process and `vm_id`.
    /// Value and CAS token of `key`; `(None, None)` when absent.
    fn shared_get(&self, key: &str) -> (Option<Vec<u8>>, Option<u32>);
    /// Writes `key`. With `cas`, only if unchanged since read. Envoy checks no CAS
    /// when the key is absent.
    fn shared_set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), HostError>;

    // Stats (`wasmcustom.<name>`), shared by every VM of the process.
    fn define_metric(&self, kind: MetricKind, name: &str) -> Result<u32, HostError>;
    fn metric_get(&self, id: u32) -> i64;
    fn metric_record(&self, id: u32, value: u64);
    fn metric_add(&self, id: u32, by: i64);

    // The current (or effective) request.
    fn request_header(&self, name: &str) -> Option<Vec<u8>>;
    /// Sets (`Some`) or removes (`None`) a request header.
    fn set_request_header(&self, name: &str, value: Option<&[u8]>) -> Result<(), HostError>;
    fn response_header(&self, name: &str) -> Option<Vec<u8>>;
    /// A property (`["xds", "route_name"]`, `["response", "code"]`…).
    fn property(&self, path: &[&str]) -> Option<Vec<u8>>;
    /// `set_envoy_filter_state` with serialized `SetEnvoyFilterStateArguments`.
    fn set_filter_state(&self, args: &[u8]) -> Result<(), HostError>;
    /// Answers the request locally (`details` goes to `%RESPONSE_CODE_DETAILS%`),
    /// as `text/plain`.
    fn local_reply(&self, status: u32, details: &str, body: &str) {
        self.local_reply_as(status, details, body, "text/plain");
    }
    /// [`Envoy::local_reply`] with this `content-type`.
    fn local_reply_as(&self, status: u32, details: &str, body: &str, content_type: &str);
    /// Sets (`Some`) or removes (`None`) a response header.
    fn set_response_header(&self, name: &str, value: Option<&[u8]>) -> Result<(), HostError>;
    /// `proxy_set_property`: Envoy keeps `value` as filter state `wasm.<path>`.
    fn set_property(&self, path: &[&str], value: &[u8]) -> Result<(), HostError>;
    /// Resumes a paused request.
    fn continue_request(&self);
    /// Makes the request `context` the one the calls above act on (root callbacks).
    fn set_effective_context(&self, context: u32) -> Result<(), HostError>;

    // Calls to other clusters (registries, health checks).
    /// Sends `req`; returns the token its answer comes back with.
    fn dispatch(&self, req: &HttpRequest) -> Result<u32, HostError>;
    /// The answer to a call: headers when `num_headers > 0` (never read otherwise:
    /// that panics in the SDK), the body when `0 < body_size <= max_body`.
    fn call_answer(&self, num_headers: usize, body_size: usize, max_body: usize) -> CallAnswer;
}

/// An integer property (8 bytes, little endian); 0 when absent or malformed.
pub fn int_property(host: &impl Envoy, path: &[&str]) -> u64 {
    host.property(path)
        .and_then(|b| <[u8; 8]>::try_from(b.as_slice()).ok())
        .map_or(0, u64::from_le_bytes)
}

/// A test double for [`Envoy`]: shared data, stats and requests kept in memory,
/// every hand-off, reply and call recorded per request context.
#[cfg(test)]
pub mod fake {
    use super::*;
    use std::cell::{Cell, RefCell};
    use std::collections::HashMap;

    /// One request as the fake sees it.
    #[derive(Clone, Debug, Default)]
    pub struct FakeRequest {
        pub headers: Vec<(String, Vec<u8>)>,
        pub response_headers: Vec<(String, Vec<u8>)>,
        pub properties: HashMap<Vec<String>, Vec<u8>>,
        /// `original_dst_address` values set through filter state.
        pub filter_state: Vec<String>,
        pub reply: Option<(u32, String, String)>,
        /// `content-type` of the local reply.
        pub reply_type: Option<String>,
        /// Properties set by the filter (`set_property`), by path joined with '.'.
        pub set_properties: Vec<(String, Vec<u8>)>,
        pub continued: u32,
    }

    #[derive(Default)]
    pub struct FakeEnvoy {
        pub now_us: Cell<u64>,
        pub shared: RefCell<HashMap<String, (Vec<u8>, u32)>>,
        pub metrics: RefCell<Vec<(String, MetricKind, i64)>>,
        pub requests: RefCell<HashMap<u32, FakeRequest>>,
        /// The request host calls act on (0: none, as in a root callback).
        pub current: Cell<u32>,
        /// `set_filter_state` fails with this when set (an Envoy before 1.37
        /// called from a root callback, say).
        pub filter_state_error: Cell<Option<HostError>>,
        /// Filter state set outside any request (a root context).
        pub filter_state_on_root: Cell<u32>,
        pub dispatched: RefCell<Vec<HttpRequest>>,
        pub answer: RefCell<Option<CallAnswer>>,
    }

    impl FakeEnvoy {
        pub fn new() -> FakeEnvoy {
            let f = FakeEnvoy::default();
            f.now_us.set(1_000_000_000);
            f
        }
        pub fn advance_ms(&self, ms: u64) {
            self.now_us.set(self.now_us.get() + ms * 1000);
        }
        /// Starts request `id` with these headers and makes it current.
        pub fn begin(&self, id: u32, headers: &[(&str, &str)]) {
            let r = FakeRequest {
                headers: headers
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
                    .collect(),
                ..FakeRequest::default()
            };
            self.requests.borrow_mut().insert(id, r);
            self.current.set(id);
        }
        /// Makes request `id` current (a callback for it), or none with 0.
        pub fn enter(&self, id: u32) {
            self.current.set(id);
        }
        pub fn set_property(&self, id: u32, path: &[&str], value: &[u8]) {
            if let Some(r) = self.requests.borrow_mut().get_mut(&id) {
                r.properties
                    .insert(path.iter().map(|s| s.to_string()).collect(), value.to_vec());
            }
        }
        pub fn request(&self, id: u32) -> FakeRequest {
            self.requests.borrow().get(&id).cloned().unwrap_or_default()
        }
        /// Value of stat `registry_lb.<name>` (0 when never defined).
        pub fn stat(&self, name: &str) -> i64 {
            let full = format!("registry_lb.{name}");
            self.metrics
                .borrow()
                .iter()
                .find(|(n, _, _)| *n == full)
                .map(|(_, _, v)| *v)
                .unwrap_or(0)
        }
        pub fn stat_names(&self) -> Vec<String> {
            self.metrics
                .borrow()
                .iter()
                .map(|(n, _, _)| n.clone())
                .collect()
        }
        fn with_current<T>(&self, f: impl FnOnce(&mut FakeRequest) -> T) -> Option<T> {
            self.requests
                .borrow_mut()
                .get_mut(&self.current.get())
                .map(f)
        }
    }

    impl Envoy for FakeEnvoy {
        fn now_us(&self) -> u64 {
            self.now_us.get()
        }
        fn shared_get(&self, key: &str) -> (Option<Vec<u8>>, Option<u32>) {
            match self.shared.borrow().get(key) {
                Some((v, cas)) => (Some(v.clone()), Some(*cas)),
                None => (None, None),
            }
        }
        fn shared_set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), HostError> {
            let mut m = self.shared.borrow_mut();
            match (m.get_mut(key), cas) {
                (Some((v, c)), want) => {
                    if want.is_some_and(|w| w != *c) {
                        return Err(HostError::CasMismatch);
                    }
                    *v = value.to_vec();
                    *c += 1;
                }
                (None, _) => {
                    m.insert(key.to_string(), (value.to_vec(), 1));
                }
            }
            Ok(())
        }
        fn define_metric(&self, kind: MetricKind, name: &str) -> Result<u32, HostError> {
            let mut m = self.metrics.borrow_mut();
            if let Some(i) = m.iter().position(|(n, _, _)| n == name) {
                return Ok(i as u32);
            }
            m.push((name.to_string(), kind, 0));
            Ok((m.len() - 1) as u32)
        }
        fn metric_get(&self, id: u32) -> i64 {
            self.metrics
                .borrow()
                .get(id as usize)
                .map(|m| m.2)
                .unwrap_or(0)
        }
        fn metric_record(&self, id: u32, value: u64) {
            if let Some(m) = self.metrics.borrow_mut().get_mut(id as usize) {
                m.2 = value as i64;
            }
        }
        fn metric_add(&self, id: u32, by: i64) {
            if let Some(m) = self.metrics.borrow_mut().get_mut(id as usize) {
                m.2 += by;
            }
        }
        fn request_header(&self, name: &str) -> Option<Vec<u8>> {
            self.with_current(|r| {
                r.headers
                    .iter()
                    .find(|(k, _)| k.eq_ignore_ascii_case(name))
                    .map(|(_, v)| v.clone())
            })
            .flatten()
        }
        fn set_request_header(&self, name: &str, value: Option<&[u8]>) -> Result<(), HostError> {
            self.with_current(|r| {
                r.headers.retain(|(k, _)| !k.eq_ignore_ascii_case(name));
                if let Some(v) = value {
                    r.headers.push((name.to_string(), v.to_vec()));
                }
            })
            .ok_or(HostError::NotFound)
        }
        fn response_header(&self, name: &str) -> Option<Vec<u8>> {
            self.with_current(|r| {
                r.response_headers
                    .iter()
                    .find(|(k, _)| k.eq_ignore_ascii_case(name))
                    .map(|(_, v)| v.clone())
            })
            .flatten()
        }
        fn property(&self, path: &[&str]) -> Option<Vec<u8>> {
            let key: Vec<String> = path.iter().map(|s| s.to_string()).collect();
            self.with_current(|r| r.properties.get(&key).cloned())
                .flatten()
        }
        fn set_filter_state(&self, args: &[u8]) -> Result<(), HostError> {
            if let Some(e) = self.filter_state_error.get() {
                return Err(e);
            }
            let value = decode_filter_state(args).ok_or(HostError::BadArgument)?;
            match self.with_current(|r| r.filter_state.push(value)) {
                Some(()) => Ok(()),
                None => {
                    self.filter_state_on_root
                        .set(self.filter_state_on_root.get() + 1);
                    Err(HostError::BadArgument)
                }
            }
        }
        fn local_reply_as(&self, status: u32, details: &str, body: &str, content_type: &str) {
            self.with_current(|r| {
                r.reply = Some((status, details.to_string(), body.to_string()));
                r.reply_type = Some(content_type.to_string());
            });
        }
        fn set_response_header(&self, name: &str, value: Option<&[u8]>) -> Result<(), HostError> {
            self.with_current(|r| {
                r.response_headers
                    .retain(|(k, _)| !k.eq_ignore_ascii_case(name));
                if let Some(v) = value {
                    r.response_headers.push((name.to_string(), v.to_vec()));
                }
            })
            .ok_or(HostError::NotFound)
        }
        fn set_property(&self, path: &[&str], value: &[u8]) -> Result<(), HostError> {
            self.with_current(|r| r.set_properties.push((path.join("."), value.to_vec())))
                .ok_or(HostError::NotFound)
        }
        fn continue_request(&self) {
            self.with_current(|r| r.continued += 1);
        }
        fn set_effective_context(&self, context: u32) -> Result<(), HostError> {
            if self.requests.borrow().contains_key(&context) {
                self.current.set(context);
                Ok(())
            } else {
                Err(HostError::BadArgument)
            }
        }
        fn dispatch(&self, req: &HttpRequest) -> Result<u32, HostError> {
            let mut d = self.dispatched.borrow_mut();
            d.push(req.clone());
            Ok(d.len() as u32)
        }
        fn call_answer(&self, _: usize, _: usize, _: usize) -> CallAnswer {
            self.answer.borrow_mut().take().unwrap_or(CallAnswer {
                headers: Vec::new(),
                body: Vec::new(),
            })
        }
    }

    /// The `value` of serialized `SetEnvoyFilterStateArguments` whose path is the
    /// original-destination key (short lengths only: enough for tests).
    pub fn decode_filter_state(b: &[u8]) -> Option<String> {
        let mut i = 0;
        let mut path = None;
        let mut value = None;
        while i < b.len() {
            let tag = *b.get(i)?;
            i += 1;
            if tag == 0x18 {
                i += 1;
                continue;
            }
            let len = *b.get(i)? as usize;
            i += 1;
            let s = String::from_utf8(b.get(i..i + len)?.to_vec()).ok()?;
            i += len;
            match tag {
                0x0a => path = Some(s),
                0x12 => value = Some(s),
                _ => return None,
            }
        }
        (path.as_deref() == Some(crate::handoff::ORIGINAL_DST_KEY)).then_some(value?)
    }
}
