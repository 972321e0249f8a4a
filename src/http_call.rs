//! The HTTP calls the plain logic asks the host layer to make (registry calls,
//! health checks) and the answers it gets back. A leaf: it depends on nothing else
//! in the crate, so every module can speak it.

/// An HTTP call for the host layer to dispatch to an Envoy cluster.
#[derive(Debug, Clone, PartialEq)]
pub struct HttpRequest {
    pub cluster: String,
    pub method: &'static str,
    pub authority: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub timeout_ms: u64,
}

/// The answer to an [`HttpRequest`], as Envoy delivered it.
#[derive(Debug, Clone, Copy)]
pub struct HttpResponse<'a> {
    pub status: u16,
    pub headers: &'a [(String, String)],
    pub body: &'a [u8],
}

impl HttpResponse<'_> {
    /// First value of a header, by name in any case.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wasm_bindgen_test::wasm_bindgen_test;

    #[wasm_bindgen_test(unsupported = test)]
    fn header_lookup_ignores_case_and_takes_the_first() {
        let h = vec![
            ("X-Consul-Index".to_string(), "7".to_string()),
            ("x-consul-index".to_string(), "8".to_string()),
        ];
        let r = HttpResponse {
            status: 200,
            headers: &h,
            body: b"",
        };
        assert_eq!(r.header("x-consul-index"), Some("7"));
        assert_eq!(r.header("X-CONSUL-INDEX"), Some("7"));
        assert_eq!(r.header("x-consul-knownleader"), None);
    }
}
