//! The cost floor of a proxy-wasm HTTP filter: a root context and an HTTP context
//! that do nothing. Envoy still creates a context per request and calls into the VM
//! for every callback the SDK exports (request headers, response headers, log, done…),
//! which is what `./dev bench` measures against native Envoy and against registry-lb.

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::ContextType;

proxy_wasm::main! {{
    proxy_wasm::set_root_context(|_| Box::new(Root));
}}

struct Root;

impl Context for Root {}

impl RootContext for Root {
    fn create_http_context(&self, _id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Empty))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Empty;

impl Context for Empty {}

impl HttpContext for Empty {}
