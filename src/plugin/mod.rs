//! One configured registry-lb in one VM: its routing tables, the request path, and —
//! in the root that holds the lease — the registry polling.
//!
//! Everything here talks to Envoy through [`Envoy`] only, so it runs natively and in
//! a wasm engine against [`crate::envoy::fake::FakeEnvoy`]. `src/host/` creates one
//! [`Plugin`] per VM and forwards the proxy-wasm callbacks to it:
//!
//! | callback | here |
//! |---|---|
//! | root `on_configure` | [`Plugin::configure`] |
//! | root `on_tick` | [`Plugin::on_tick`]: tables, lease, polling, held requests, stats |
//! | root `on_http_call_response` | [`Plugin::on_call_answer`] |
//! | HTTP `on_http_request_headers` | [`Plugin::on_request_headers`] |
//! | HTTP `on_http_response_headers` | [`Plugin::on_response_headers`] |
//! | HTTP `on_log` | [`Plugin::on_log`] |
//! | root `on_done` | [`Plugin::on_done`]: the registrar deregisters (best effort) |
//!
//! Submodules: [`tables`] keeps the worker's tables current from shared data
//! (snapshots, ejections, weights), [`request`] routes and accounts for requests,
//! [`leader`] polls the registries and publishes snapshots, [`register`] runs the
//! registrar (see `registrar`) in the leader.

mod leader;
mod register;
mod request;
mod status;
mod tables;

pub use request::{RequestKey, Routed};

use crate::config::PluginConfig;
use crate::envoy::Envoy;
use crate::rng::SplitMix64;
use crate::stats::Stats;
use std::hash::Hasher;
use std::rc::Rc;

/// What the filter tells Envoy after a request callback.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Continue,
    /// Held (first snapshot) or answered locally.
    Pause,
}

/// Shared-data keys of one plugin configuration (its hash names the namespace, so
/// two configurations in one Envoy never share a snapshot).
pub struct Keys {
    pub lease: String,
    pub snapshot: Vec<String>,
    pub version: Vec<String>,
    pub outliers: Vec<String>,
    /// The last refresh error per service (`<unix ms> <text>`), for the status view.
    pub error: Vec<String>,
}

impl Keys {
    fn of(cfg: &PluginConfig, bytes: &[u8]) -> Keys {
        let mut h = fnv::FnvHasher::default();
        h.write(bytes);
        let ns = format!("registry_lb.{:016x}", h.finish());
        let per = |what: &str| -> Vec<String> {
            cfg.services
                .iter()
                .map(|s| format!("{ns}.{}.{what}", s.name))
                .collect()
        };
        Keys {
            lease: format!("{ns}.lease"),
            snapshot: per("snapshot"),
            version: per("version"),
            outliers: per("outliers"),
            error: per("last_error"),
        }
    }
}

pub struct Plugin<H: Envoy> {
    pub host: H,
    pub cfg: Rc<PluginConfig>,
    keys: Keys,
    rng: SplitMix64,
    /// The shadow policies' randomness (apart, so routing draws what it would
    /// without them).
    shadow_rng: SplitMix64,
    stats: Stats,
    /// This root's lease identity.
    me: u64,
    /// This VM has served requests (a worker with traffic): it yields the lease to
    /// a root that has not (see `lease`).
    serving: bool,
    tables: tables::Tables,
    requests: request::Requests,
    leader: leader::Leader,
}

impl<H: Envoy> Plugin<H> {
    /// Reads the plugin configuration. `seed` gives this VM its own random stream and
    /// lease identity.
    pub fn configure(host: H, bytes: &[u8], seed: u64) -> Result<Plugin<H>, String> {
        let cfg = PluginConfig::parse(bytes).map_err(|e| e.to_string())?;
        let keys = Keys::of(&cfg, bytes);
        let lease_ttl_ms = (cfg.tick.0 * 20).max(1000);
        Ok(Plugin {
            host,
            tables: tables::Tables::new(&cfg),
            requests: request::Requests::new(&cfg),
            leader: leader::Leader::new(lease_ttl_ms),
            cfg: Rc::new(cfg),
            keys,
            rng: SplitMix64(seed),
            shadow_rng: SplitMix64(seed ^ 0x5ad0_5ad0_5ad0_5ad0),
            stats: Stats::default(),
            me: seed | 1,
            serving: false,
        })
    }

    /// The timer period.
    pub fn tick_ms(&self) -> u64 {
        self.cfg.tick.0
    }

    /// A request context was created in this VM: it serves traffic.
    pub fn mark_serving(&mut self) {
        self.serving = true;
    }

    /// Timer: tables current, lease and polling, held requests, pending stats.
    pub fn on_tick(&mut self) {
        let now = self.host.now_ms();
        self.refresh_all(now);
        self.lead_and_poll(now);
        self.refresh_all(now);
        self.reweigh(now);
        self.release_held(now);
        self.flush_shadow();
        self.stats.flush(&self.host);
    }

    /// Whether this root polls the registries now (for tests: the host never asks).
    #[cfg(test)]
    pub fn is_leader(&self) -> bool {
        self.leader.active()
    }
}

#[cfg(test)]
mod tests;
