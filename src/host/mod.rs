//! The thin layer that talks to Envoy through proxy-wasm: the contexts Envoy calls
//! ([`root`], [`http`]) forward to [`crate::plugin::Plugin`], and [`ffi`] implements
//! [`crate::envoy::Envoy`] with host calls. Nothing here decides anything.
//!
//! Only `proxy_wasm::hostcalls` functions that return `Result` are used, with their
//! statuses mapped; the `Context` trait helpers of the SDK unwrap host errors and
//! would panic, so they are avoided.

mod ffi;
mod http;
mod root;

use crate::log_text::escape_control;
use proxy_wasm::hostcalls;
use proxy_wasm::types::LogLevel;

/// Every log line goes through here: control characters in registry, route or
/// client text are escaped before Envoy prints it.
struct Logger;

impl log::Log for Logger {
    fn enabled(&self, _: &log::Metadata) -> bool {
        true
    }

    fn log(&self, record: &log::Record) {
        let level = match record.level() {
            log::Level::Error => LogLevel::Error,
            log::Level::Warn => LogLevel::Warn,
            log::Level::Info => LogLevel::Info,
            log::Level::Debug => LogLevel::Debug,
            log::Level::Trace => LogLevel::Trace,
        };
        let line = record.args().to_string();
        let _ = hostcalls::log(level, &escape_control(&line));
    }

    fn flush(&self) {}
}

static LOGGER: Logger = Logger;

proxy_wasm::main! {{
    // Envoy's own `wasm` log level decides what is printed; nothing logs per request.
    if log::set_logger(&LOGGER).is_ok() {
        log::set_max_level(log::LevelFilter::Debug);
    }
    std::panic::set_hook(Box::new(|info| {
        let line = format!("registry-lb: panic: {info}");
        let _ = hostcalls::log(LogLevel::Critical, &escape_control(&line));
    }));
    proxy_wasm::set_root_context(|_| Box::new(root::Root::new()));
}}
