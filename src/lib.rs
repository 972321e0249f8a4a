//! registry-lb: registry-aware load balancing inside Envoy, as a proxy-wasm HTTP filter.
//!
//! Everything but [`host`] is plain logic with no host calls, tested natively and
//! inside a wasm engine. [`host`] is the thin layer that talks to Envoy.

pub mod backoff;
pub mod balancer;
pub mod config;
pub mod detmath;
pub mod duration;
pub mod hash_key;
pub mod health_check;
pub mod http_call;
pub use registry_lb_wire::instance;
pub mod lease;
pub mod load_report;
pub mod outlier;
pub mod picker;
pub mod poller;
pub mod registry;
pub mod rng;
pub mod slow_start;
pub use registry_lb_wire::snapshot;
pub mod subset;
pub mod validate;
pub mod zone;

#[cfg(target_os = "wasi")]
mod host;
