//! The hot path of a refresh, in its own crate so it is built for speed
//! (`opt-level = 3`) while the rest of `registry_lb.wasm` is built for size: the
//! instance type, the reader of Consul's health list (the largest answer a registry
//! sends), and the shared-data snapshot (encoded by the poller, decoded by every
//! worker).

pub mod consul;
pub mod instance;
pub mod snapshot;
