//! [`Envoy`] implemented with proxy-wasm host calls: the one place with raw ABI
//! declarations.

use crate::envoy::{CallAnswer, Envoy, HostError, MetricKind};
use crate::http_call::HttpRequest;
use proxy_wasm::hostcalls;
use proxy_wasm::types::{BufferType, MapType, MetricType, Status};
use std::time::Duration;

/// Envoy, as seen from inside the VM.
pub struct ProxyWasm;

fn err(s: Status) -> HostError {
    match s {
        Status::NotFound => HostError::NotFound,
        Status::BadArgument => HostError::BadArgument,
        Status::CasMismatch => HostError::CasMismatch,
        other => HostError::Other(other as u32),
    }
}

fn status(s: Status) -> Result<(), HostError> {
    match s {
        Status::Ok => Ok(()),
        other => Err(err(other)),
    }
}

#[link(wasm_import_module = "env")]
extern "C" {
    fn proxy_send_local_response(
        status_code: u32,
        details_data: *const u8,
        details_size: usize,
        body_data: *const u8,
        body_size: usize,
        headers_data: *const u8,
        headers_size: usize,
        grpc_status: i32,
    ) -> Status;
    fn proxy_continue_stream(stream_type: u32) -> Status;
}

impl Envoy for ProxyWasm {
    fn now_us(&self) -> u64 {
        hostcalls::get_current_time()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| d.as_micros() as u64)
            .unwrap_or(0)
    }

    fn shared_get(&self, key: &str) -> (Option<Vec<u8>>, Option<u32>) {
        hostcalls::get_shared_data(key).unwrap_or((None, None))
    }

    fn shared_set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), HostError> {
        hostcalls::set_shared_data(key, Some(value), cas).map_err(err)
    }

    fn define_metric(&self, kind: MetricKind, name: &str) -> Result<u32, HostError> {
        let t = match kind {
            MetricKind::Counter => MetricType::Counter,
            MetricKind::Gauge => MetricType::Gauge,
        };
        hostcalls::define_metric(t, name).map_err(err)
    }

    fn metric_get(&self, id: u32) -> i64 {
        hostcalls::get_metric(id).map(|v| v as i64).unwrap_or(0)
    }

    fn metric_record(&self, id: u32, value: u64) {
        let _ = hostcalls::record_metric(id, value);
    }

    fn metric_add(&self, id: u32, by: i64) {
        let _ = hostcalls::increment_metric(id, by);
    }

    fn request_header(&self, name: &str) -> Option<Vec<u8>> {
        hostcalls::get_map_value_bytes(MapType::HttpRequestHeaders, name)
            .ok()
            .flatten()
    }

    fn set_request_header(&self, name: &str, value: Option<&[u8]>) -> Result<(), HostError> {
        hostcalls::set_map_value_bytes(MapType::HttpRequestHeaders, name, value).map_err(err)
    }

    fn response_header(&self, name: &str) -> Option<Vec<u8>> {
        hostcalls::get_map_value_bytes(MapType::HttpResponseHeaders, name)
            .ok()
            .flatten()
    }

    fn property(&self, path: &[&str]) -> Option<Vec<u8>> {
        hostcalls::get_property(path.to_vec()).ok().flatten()
    }

    fn set_filter_state(&self, args: &[u8]) -> Result<(), HostError> {
        hostcalls::call_foreign_function("set_envoy_filter_state", Some(args))
            .map(|_| ())
            .map_err(err)
    }

    fn local_reply_as(&self, status_code: u32, details: &str, body: &str, content_type: &str) {
        // proxy-wasm header map: count, (key len, value len)*, then each key\0 value\0.
        let (k, v) = ("content-type", content_type);
        let mut headers = Vec::with_capacity(48);
        headers.extend_from_slice(&1u32.to_le_bytes());
        headers.extend_from_slice(&(k.len() as u32).to_le_bytes());
        headers.extend_from_slice(&(v.len() as u32).to_le_bytes());
        headers.extend_from_slice(k.as_bytes());
        headers.push(0);
        headers.extend_from_slice(v.as_bytes());
        headers.push(0);
        // SAFETY: every pointer is valid for its length for the duration of the call.
        let _ = unsafe {
            proxy_send_local_response(
                status_code,
                details.as_ptr(),
                details.len(),
                body.as_ptr(),
                body.len(),
                headers.as_ptr(),
                headers.len(),
                -1,
            )
        };
    }

    fn set_response_header(&self, name: &str, value: Option<&[u8]>) -> Result<(), HostError> {
        hostcalls::set_map_value_bytes(MapType::HttpResponseHeaders, name, value).map_err(err)
    }

    fn set_property(&self, path: &[&str], value: &[u8]) -> Result<(), HostError> {
        hostcalls::set_property(path.to_vec(), Some(value)).map_err(err)
    }

    fn continue_request(&self) {
        // SAFETY: plain ABI call with no pointers; 0 = the request stream.
        let _ = status(unsafe { proxy_continue_stream(0) });
    }

    fn set_effective_context(&self, context: u32) -> Result<(), HostError> {
        hostcalls::set_effective_context(context).map_err(err)
    }

    fn dispatch(&self, req: &HttpRequest) -> Result<u32, HostError> {
        let mut headers: Vec<(&str, &str)> = vec![
            (":method", req.method),
            (":path", &req.path),
            (":authority", &req.authority),
        ];
        headers.extend(req.headers.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        let body = (!req.body.is_empty()).then_some(req.body.as_slice());
        hostcalls::dispatch_http_call(
            &req.cluster,
            headers,
            body,
            vec![],
            Duration::from_millis(req.timeout_ms),
        )
        .map_err(err)
    }

    fn call_answer(&self, num_headers: usize, body_size: usize, max_body: usize) -> CallAnswer {
        // With no headers the map must not be read (the SDK panics on it).
        let headers = if num_headers == 0 {
            Vec::new()
        } else {
            hostcalls::get_map(MapType::HttpCallResponseHeaders).unwrap_or_default()
        };
        let body = if num_headers == 0 || body_size == 0 || body_size > max_body {
            Vec::new()
        } else {
            hostcalls::get_buffer(BufferType::HttpCallResponseBody, 0, body_size)
                .ok()
                .flatten()
                .unwrap_or_default()
        };
        CallAnswer { headers, body }
    }
}
