//! registry-lb: registry-aware load balancing inside Envoy, as a proxy-wasm HTTP filter.
//!
//! Everything but `host` is plain logic with no host calls, tested natively and
//! inside a wasm engine: it reaches Envoy only through the [`envoy::Envoy`] trait.
//! `host` (built for wasm only) implements that trait with proxy-wasm host calls and
//! forwards Envoy's callbacks to [`plugin::Plugin`].

pub mod backoff;
pub mod balancer;
pub mod cidr;
pub mod config;
pub mod detmath;
pub mod duration;
pub mod envoy;
pub mod explain;
pub mod fuzzing;
pub mod handoff;
pub mod hash_key;
pub mod health_check;
pub mod http_call;
pub mod json_path;
pub use registry_lb_wire::instance;
pub mod lease;
pub mod load_report;
pub mod log_text;
pub mod outlier;
pub mod picker;
pub mod plugin;
pub mod poller;
pub mod registrar;
pub mod registry;
pub mod rng;
pub mod slow_start;
pub mod stats;
pub use registry_lb_wire::snapshot;
pub mod subset;
pub mod validate;
pub mod zone;

#[cfg(target_os = "wasi")]
mod host;
