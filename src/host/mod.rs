//! The thin layer that talks to Envoy through proxy-wasm. Everything it decides is
//! delegated to the pure modules; here are only host calls and their error handling.
//!
//! Only `proxy_wasm::hostcalls` functions that return `Result` are used, and only
//! in ways whose statuses they map; the `Context` trait helpers of the SDK unwrap
//! host errors and would panic, so they are avoided.

mod handoff;
mod http;
mod metrics;
mod root;
mod shared;
mod worker;

use proxy_wasm::types::LogLevel;

proxy_wasm::main! {{
    // Envoy's own `wasm` log level decides what is printed; nothing logs per request.
    proxy_wasm::set_log_level(LogLevel::Debug);
    std::panic::set_hook(Box::new(|info| {
        let _ = proxy_wasm::hostcalls::log(LogLevel::Critical, &format!("registry-lb: panic: {info}"));
    }));
    proxy_wasm::set_root_context(|_| Box::new(root::Root::new()));
}}

/// Wall-clock milliseconds from the host.
pub(crate) fn now_ms() -> u64 {
    (now_us() / 1000) as u64
}

/// Wall-clock microseconds from the host (the host reads its clock on each call).
pub(crate) fn now_us() -> u128 {
    proxy_wasm::hostcalls::get_current_time()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_micros())
        .unwrap_or(0)
}
