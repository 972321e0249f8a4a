//! Per-VM state shared by a worker's root context and its HTTP contexts: the
//! routing tables, kept current from shared data, and the routing of one request.

use super::handoff;
use super::metrics::{gauge_add, gauge_get, Metrics};
use super::shared;
use crate::config::{Handoff, PluginConfig, Policy, ServiceConfig};
use crate::instance::truncate;
use crate::load_report::{self, UtilizationWeights, WeightConfig};
use crate::outlier::{self, Outliers};
use crate::picker::{Options, Request, Table};
use crate::rng::SplitMix64;
use crate::slow_start::{self, FirstSeen, FirstSeenTracker, SlowStart};
use crate::snapshot::Snapshot;
use proxy_wasm::hostcalls;
use proxy_wasm::types::Status;
use std::collections::HashMap;
use std::rc::Rc;

/// Shared-data keys of one plugin configuration.
pub struct Keys {
    pub lease: String,
    pub snapshot: Vec<String>,
    pub version: Vec<String>,
    pub outliers: Vec<String>,
}

/// Service gauges of the request path.
#[derive(Clone, Copy, Debug)]
enum ServiceGauge {
    RqActive,
    OutlierGeneration,
}

impl ServiceGauge {
    fn name(self) -> &'static str {
        match self {
            ServiceGauge::RqActive => "rq_active",
            ServiceGauge::OutlierGeneration => "outlier_generation",
        }
    }
}

/// Per-slot gauges of the request path.
#[derive(Clone, Copy, Debug)]
enum SlotGauge {
    RqActive,
    Consecutive5xx,
}

impl SlotGauge {
    fn name(self) -> &'static str {
        match self {
            SlotGauge::RqActive => "rq_active",
            SlotGauge::Consecutive5xx => "consecutive_5xx",
        }
    }
}

/// What the filter must remember about a routed request until it ends.
#[derive(Clone, Debug, Default)]
pub struct Routed {
    pub service: usize,
    pub slot: u32,
    /// In-flight gauge to decrement.
    pub gauge: Option<u32>,
    /// This request is the half-open trial of its instance.
    pub trial: bool,
    /// `override_host`: slots of the ranked list after the first (attempt k+1 → entry k).
    pub fallbacks: Vec<u32>,
    /// Service-wide in-flight gauge (bounded load) to decrement.
    pub total_gauge: Option<u32>,
}

/// What the HTTP context read from the request for the policy.
#[derive(Debug, Default)]
pub struct RequestKey {
    /// Hash of the request's key (`ring_hash`, `maglev`).
    pub hash: Option<u64>,
    /// Subset selector from the request header.
    pub subset: Option<Vec<(String, String)>>,
}

/// Per-service state of effective weights: slow start and load reports.
pub struct Weights {
    first_seen: FirstSeenTracker<std::net::SocketAddr>,
    slow: Option<SlowStart>,
    load: Option<UtilizationWeights>,
    /// Next time the table's weights are recomputed while they move.
    next_ms: u64,
}

/// What the request path needs about one slot of one service, resolved once:
/// gauge and counter ids, and the bytes that hand its instance to Envoy.
#[derive(Clone, Debug, Default)]
struct SlotCache {
    /// `<service>.slot_<n>.rq_active` (`None` until resolved).
    active: Option<Option<u32>>,
    /// `<service>.slot_<n>.consecutive_5xx`.
    consecutive: Option<Option<u32>>,
    /// Pick counter of the instance now in the slot; forgotten with a new snapshot.
    pick: Option<u32>,
    /// Hand-off payload (filter-state arguments or header value) of the instance
    /// now in the slot; forgotten with a new snapshot.
    handoff: Option<Vec<u8>>,
}

impl SlotCache {
    fn gauge(&mut self, what: SlotGauge) -> &mut Option<Option<u32>> {
        match what {
            SlotGauge::RqActive => &mut self.active,
            SlotGauge::Consecutive5xx => &mut self.consecutive,
        }
    }
}

/// Service gauges read on the request path (`None` until resolved).
#[derive(Clone, Copy, Debug, Default)]
struct ServiceGauges {
    rq_active: Option<Option<u32>>,
    outlier_generation: Option<Option<u32>>,
}

impl ServiceGauges {
    fn gauge(&mut self, what: ServiceGauge) -> &mut Option<Option<u32>> {
        match what {
            ServiceGauge::RqActive => &mut self.rq_active,
            ServiceGauge::OutlierGeneration => &mut self.outlier_generation,
        }
    }
}

/// What a route's name resolved to.
#[derive(Clone, Debug)]
pub enum RouteTarget {
    /// No registry-lb metadata: not ours.
    None,
    /// A configured service, by index.
    Service(usize),
    /// Metadata names a service that is not configured.
    Unknown(String),
}

/// A local reply instead of routing: (response code details, body).
pub struct Reply(pub &'static str, pub String);

pub struct Worker {
    pub cfg: Rc<PluginConfig>,
    pub keys: Keys,
    pub tables: Vec<Option<Table>>,
    pub rng: SplitMix64,
    pub metrics: Metrics,
    /// Requests paused until their service's first snapshot: (context, service, deadline).
    pub waiting: Vec<(u32, usize, u64)>,
    /// Requests routed while paused, by context id.
    pub deferred: HashMap<u32, Routed>,
    /// Per service: last ejection state seen.
    pub outliers: Vec<Outliers>,
    /// Per service: served stale beyond `max_stale`.
    pub stale: Vec<bool>,
    /// Per service: effective-weight state.
    pub weights: Vec<Weights>,
    /// Per service, per slot: ids and hand-off bytes (index = slot).
    slots: Vec<Vec<SlotCache>>,
    /// Per service: gauge ids of the request path.
    gauges: Vec<ServiceGauges>,
    /// Per service: when the request path last looked for other workers' ejections.
    outliers_seen_ms: Vec<u64>,
    /// Route name → what its metadata names; forgotten every 10 s so a route
    /// changed by RDS under the same name is picked up.
    pub route_cache: fnv::FnvHashMap<Vec<u8>, RouteTarget>,
    route_cache_until: u64,
}

fn cfg_weights(services: &[ServiceConfig]) -> Vec<Weights> {
    services
        .iter()
        .map(|s| Weights {
            first_seen: FirstSeenTracker::new(),
            slow: s
                .slow_start
                .as_ref()
                .map(|ss| SlowStart::new(ss.window.0, ss.aggression, ss.min_weight_percent)),
            load: s.load_report.as_ref().map(|lr| {
                UtilizationWeights::new(
                    0,
                    WeightConfig {
                        smoothing_ms: lr.smoothing.0,
                        min_multiplier: lr.min_multiplier,
                        max_multiplier: lr.max_multiplier,
                        ..WeightConfig::default()
                    },
                )
            }),
            next_ms: 0,
        })
        .collect()
}

impl Worker {
    pub fn new(cfg: PluginConfig, keys: Keys, seed: u64) -> Worker {
        let n = cfg.services.len();
        let weights = cfg_weights(&cfg.services);
        Worker {
            cfg: Rc::new(cfg),
            keys,
            tables: (0..n).map(|_| None).collect(),
            rng: SplitMix64(seed),
            metrics: Metrics::default(),
            waiting: Vec::new(),
            deferred: HashMap::new(),
            outliers: (0..n).map(|_| Outliers::default()).collect(),
            stale: vec![false; n],
            weights,
            slots: vec![Vec::new(); n],
            gauges: vec![ServiceGauges::default(); n],
            outliers_seen_ms: vec![u64::MAX; n],
            route_cache: fnv::FnvHashMap::default(),
            route_cache_until: 0,
        }
    }

    /// Rebuilds the table of service `i` if a newer snapshot was published.
    pub fn refresh(&mut self, i: usize) {
        let Some(vkey) = self.keys.version.get(i) else {
            return;
        };
        let Some(v) = shared::get_u64(vkey) else {
            return;
        };
        let have = self
            .tables
            .get(i)
            .and_then(|t| t.as_ref())
            .map(|t| t.version)
            .unwrap_or(0);
        if v <= have {
            return;
        }
        let (Some(bytes), _) = shared::get(&self.keys.snapshot[i]) else {
            return;
        };
        let cfg = self.cfg.clone();
        let svc = &cfg.services[i];
        match Snapshot::decode(&bytes) {
            Ok(snap) => {
                if let Some(w) = self.weights.get_mut(i) {
                    w.first_seen.update(
                        snap.entries.iter().map(|e| e.instance.addr),
                        super::now_ms(),
                    );
                    if let Some(l) = w.load.as_mut() {
                        l.resize(
                            snap.entries
                                .iter()
                                .map(|e| e.slot as usize + 1)
                                .max()
                                .unwrap_or(0),
                        );
                    }
                }
                self.tables[i] = Some(Table::build(snap, Options::of(svc), &mut self.rng));
                // Slots may now belong to other instances: re-resolve what is per instance.
                if let Some(slots) = self.slots.get_mut(i) {
                    for c in slots.iter_mut() {
                        c.pick = None;
                        c.handoff = None;
                    }
                }
                self.reapply(i, super::now_ms());
                let Some(Some(table)) = self.tables.get_mut(i) else {
                    return;
                };
                let table = &*table;
                log::debug!(
                    "registry-lb: service {}: worker table at version {} with {} routable of {} instance(s)",
                    svc.name,
                    table.version,
                    table.endpoints.len(),
                    table.known
                );
            }
            Err(e) => {
                let name = svc.name.clone();
                log::error!("registry-lb: service {name}: {e}; keeping the previous table");
                self.metrics.inc(&format!("{name}.snapshot_decode_failed"));
            }
        }
    }

    pub fn refresh_all(&mut self) {
        let now = super::now_ms();
        if now >= self.route_cache_until {
            self.route_cache.clear();
            self.route_cache_until = now + 10_000;
        }
        for i in 0..self.tables.len() {
            self.refresh(i);
            self.sync_outliers(i);
            let max = self.cfg.services[i].max_stale.0;
            if max > 0 {
                let name = format!("{}.snapshot_age_ms", self.cfg.services[i].name);
                let age = self.metrics.gauge_id(&name).map(gauge_get).unwrap_or(0);
                let stale = age as u64 > max;
                if stale != self.stale[i] {
                    let svc = &self.cfg.services[i].name;
                    if stale {
                        log::error!("registry-lb: service {svc}: no registry confirmation for {age} ms (max_stale {max} ms): answering 503");
                    } else {
                        log::info!("registry-lb: service {svc}: registry data fresh again");
                    }
                }
                self.stale[i] = stale;
            }
        }
    }

    /// Whether service `si` has shared ejection state (passive or active health).
    fn outliers_on(&self, si: usize) -> bool {
        self.cfg
            .services
            .get(si)
            .map(|s| s.outlier_detection.consecutive_5xx > 0 || s.health_check.is_some())
            .unwrap_or(false)
    }

    fn passive_on(&self, si: usize) -> bool {
        self.cfg
            .services
            .get(si)
            .map(|s| s.outlier_detection.consecutive_5xx > 0)
            .unwrap_or(false)
    }

    /// Id of the service gauge `<service>.<what>`, defined once per VM.
    fn gauge_cached(&mut self, si: usize, what: ServiceGauge) -> Option<u32> {
        if let Some(id) = *self.gauges.get_mut(si)?.gauge(what) {
            return id;
        }
        let name = format!("{}.{}", self.cfg.services.get(si)?.name, what.name());
        let id = self.metrics.gauge_id(&name);
        *self.gauges.get_mut(si)?.gauge(what) = Some(id);
        id
    }

    /// The cache entry of `slot` of service `si`, grown on first use.
    fn slot_cache(&mut self, si: usize, slot: u32) -> Option<&mut SlotCache> {
        let slots = self.slots.get_mut(si)?;
        let k = slot as usize;
        if k >= slots.len() {
            // Slots are dense and bounded by the snapshot's instance count.
            slots.resize(k + 1, SlotCache::default());
        }
        slots.get_mut(k)
    }

    /// Re-reads the ejection state of service `si` if its generation moved.
    pub fn sync_outliers(&mut self, si: usize) {
        if !self.outliers_on(si) {
            return;
        }
        let Some(id) = self.gauge_cached(si, ServiceGauge::OutlierGeneration) else {
            return;
        };
        let g = gauge_get(id) as u64;
        let have = self
            .tables
            .get(si)
            .and_then(|t| t.as_ref())
            .map(|t| t.outlier_generation);
        if have == Some(g) && self.outliers[si].generation == g {
            return;
        }
        if self.outliers[si].generation != g {
            let (bytes, _) = shared::get(&self.keys.outliers[si]);
            if let Some(o) = bytes.as_deref().and_then(Outliers::decode) {
                self.outliers[si] = o;
            }
        }
        self.reapply(si, super::now_ms());
    }

    /// Recomputes routable set and effective weights of service `si`'s table.
    pub fn reapply(&mut self, si: usize, now: u64) {
        let Some(Some(mut table)) = self.tables.get_mut(si).map(Option::take) else {
            return;
        };
        let factors: HashMap<u32, u64> = match self.weights.get(si) {
            Some(w) if w.slow.is_some() || w.load.is_some() => table
                .hosts_by_slot()
                .map(|(slot, host, registered)| {
                    let slow = w.slow.as_ref().map_or(1_000_000u64, |ss| {
                        let seen = w.first_seen.get(&host).unwrap_or(FirstSeen::Initial);
                        u64::from(ss.factor_ppm(slow_start::age_ms(now, registered, seen)))
                    });
                    let load = w
                        .load
                        .as_ref()
                        .and_then(|l| l.multiplier_ppm(slot as usize, now))
                        .map_or(1_000_000u64, u64::from);
                    (slot, slow * load / 1_000_000)
                })
                .collect(),
            _ => HashMap::new(),
        };
        // With factors in play every weight is scaled by 1000, so a 10 % ramp of a
        // weight-1 instance is 100 against 1000, not rounded up to 1 against 1.
        let weight = |slot: u32, w: u32| -> u32 {
            match factors.get(&slot) {
                Some(f) => u32::try_from(u64::from(w) * f / 1_000)
                    .unwrap_or(u32::MAX)
                    .max(1),
                None => w,
            }
        };
        let mut rng = self.rng.clone();
        let empty = Outliers::default();
        let o = self.outliers.get(si).unwrap_or(&empty);
        table.apply(o, &weight, now, &mut rng);
        self.rng = rng;
        if let Some(w) = self.weights.get_mut(si) {
            w.next_ms = now + 1000;
        }
        if let Some(t) = self.tables.get_mut(si) {
            *t = Some(table);
        }
    }

    /// Tick duty: weights that move with time (slow start, load reports) are
    /// recomputed once a second.
    pub fn reweigh(&mut self, now: u64) {
        for si in 0..self.weights.len() {
            let w = &self.weights[si];
            if (w.slow.is_some() || w.load.is_some()) && now >= w.next_ms {
                self.reapply(si, now);
            }
        }
    }

    /// A backend's load report (response header value) for `slot` of service `si`.
    pub fn load_report(&mut self, si: usize, slot: u32, value: &str, now: u64) {
        let util = match load_report::parse_orca(value) {
            Ok(r) => r.utilization(),
            Err(_) => load_report::parse_utilization(value).ok(),
        };
        let Some(u) = util else {
            let name = self
                .cfg
                .services
                .get(si)
                .map(|s| s.name.clone())
                .unwrap_or_default();
            self.metrics.inc(&format!("{name}.load_report_invalid"));
            return;
        };
        if let Some(Weights { load: Some(l), .. }) = self.weights.get_mut(si) {
            l.observe(slot as usize, u, now);
        }
    }

    /// Creates the empty shared ejection state of service `si` if it is absent.
    ///
    /// Envoy's shared data checks no CAS when a key is absent, so two workers
    /// ejecting the same slot at once would both "win" against a missing key
    /// (two ejections, two counts). The leader therefore seeds the key before it
    /// publishes the first snapshot: no worker can pick, fail, or eject before
    /// that, so every later write is a real compare-and-swap.
    /// Returns whether the key exists (or was just created).
    pub fn seed_outliers(&mut self, si: usize) -> bool {
        if !self.outliers_on(si) {
            return false;
        }
        let Some(key) = self.keys.outliers.get(si) else {
            return false;
        };
        if let (None, None) = shared::get(key) {
            if let Err(e) = shared::set(key, &Outliers::default().encode(), None) {
                log::warn!("registry-lb: cannot create the shared ejection state ({e:?}); retrying on the next publication");
                return false;
            }
        }
        true
    }

    /// Changes the shared ejection state of service `si` with compare-and-swap.
    /// `change` returns whether it changed anything. Returns whether it was stored.
    pub fn update_outliers(
        &mut self,
        si: usize,
        mut change: impl FnMut(&mut Outliers) -> bool,
    ) -> bool {
        let Some(key) = self.keys.outliers.get(si).cloned() else {
            return false;
        };
        for _ in 0..8 {
            let (bytes, cas) = shared::get(&key);
            if cas.is_none() {
                // Absent key: a write now would not be a compare-and-swap. Seed
                // the empty state (see `seed_outliers`) and read again.
                if !self.seed_outliers(si) {
                    return false;
                }
                continue;
            }
            let mut o = bytes
                .as_deref()
                .and_then(Outliers::decode)
                .unwrap_or_default();
            if !change(&mut o) {
                return false;
            }
            if shared::set(&key, &o.encode(), cas).is_ok() {
                let name = self.cfg.services[si].name.clone();
                self.metrics
                    .gauge_set(&format!("{name}.outlier_generation"), o.generation);
                let out = o
                    .slots
                    .values()
                    .filter(|s| s.breaker != outlier::Breaker::HalfOpen)
                    .count();
                self.metrics
                    .gauge_set(&format!("{name}.instances_ejected"), out as u64);
                self.outliers[si] = o;
                self.sync_outliers(si);
                return true;
            }
        }
        log::warn!("registry-lb: ejection state update lost to contention; it is retried on the next event");
        false
    }

    /// Accounts for a finished request that took `attempts` tries. With the
    /// `override_host` hand-off, attempt k went to entry k of the ranked list, so
    /// every attempt before the last failed on its host.
    pub fn finished_attempts(&mut self, r: Routed, attempts: u64, code: u64, flags: u64) {
        let mut last = r.clone();
        if attempts > 1 {
            let tried: Vec<u32> = std::iter::once(r.slot)
                .chain(r.fallbacks.iter().copied())
                .collect();
            let n = (attempts as usize).min(tried.len());
            for (k, slot) in tried.iter().take(n - 1).enumerate() {
                let failed = Routed {
                    slot: *slot,
                    trial: r.trial && k == 0,
                    gauge: None,
                    fallbacks: Vec::new(),
                    ..r
                };
                self.finished(failed, 503, 32);
            }
            last = Routed {
                slot: tried[n - 1],
                trial: false,
                gauge: None,
                fallbacks: Vec::new(),
                ..r
            };
        }
        self.finished(last, code, flags);
    }

    /// Accounts for a finished request: consecutive failures, ejection, trials.
    pub fn finished(&mut self, r: Routed, code: u64, flags: u64) {
        if !self.passive_on(r.service) {
            return;
        }
        let cfg = self.cfg.clone();
        let Some(svc) = cfg.services.get(r.service) else {
            return;
        };
        let policy = svc.outlier_detection.policy();
        let result = outlier::classify(code, flags);
        let name = &svc.name;
        // The clock is read only when an ejection state changes (not per success).
        if r.trial {
            let now = super::now_ms();
            if self.update_outliers(r.service, |o| o.end_trial(r.slot, result, &policy, now)) {
                let ok = result == outlier::Result_::Success;
                self.metrics.inc(&format!(
                    "{name}.outlier_trial_{}",
                    if ok { "ok" } else { "failed" }
                ));
                log::info!(
                    "registry-lb: service {name}: slot {} trial request {}",
                    r.slot,
                    if ok {
                        "succeeded: back in rotation"
                    } else {
                        "failed: ejected again"
                    }
                );
            }
            return;
        }
        let Some(counter) = self.slot_gauge(r.service, r.slot, SlotGauge::Consecutive5xx) else {
            return;
        };
        if result == outlier::Result_::Success {
            let _ = hostcalls::record_metric(counter, 0);
            return;
        }
        gauge_add(counter, 1);
        let n = gauge_get(counter).max(0) as u32;
        if n < policy.consecutive_5xx {
            return;
        }
        let known = self
            .tables
            .get(r.service)
            .and_then(|t| t.as_ref())
            .map(|t| t.known)
            .unwrap_or(1);
        let now = super::now_ms();
        if self.update_outliers(r.service, |o| o.eject(r.slot, n, known, &policy, now)) {
            let _ = hostcalls::record_metric(counter, 0);
            self.metrics.inc(&format!("{name}.outlier_ejections"));
            let until = self.outliers[r.service]
                .slots
                .get(&r.slot)
                .map(|s| s.until_ms.saturating_sub(now))
                .unwrap_or(0);
            log::warn!("registry-lb: service {name}: ejecting slot {} for {until} ms after {n} consecutive failures", r.slot);
        }
    }

    /// Whether service `i` has no snapshot at all yet.
    pub fn unknown(&self, i: usize) -> bool {
        self.tables.get(i).map(|t| t.is_none()).unwrap_or(true)
    }

    /// Id of the gauge `<service>.slot_<n>.<what>`, cached so the request path
    /// does not format names.
    fn slot_gauge(&mut self, si: usize, slot: u32, what: SlotGauge) -> Option<u32> {
        if let Some(id) = *self.slot_cache(si, slot)?.gauge(what) {
            return id;
        }
        let name = format!(
            "{}.slot_{slot}.{}",
            self.cfg.services.get(si)?.name,
            what.name()
        );
        let id = self.metrics.gauge_id(&name);
        *self.slot_cache(si, slot)?.gauge(what) = Some(id);
        id
    }

    /// Picks an instance of service `si` for the current request and hands it to
    /// Envoy. Returns what to remember until the request ends.
    pub fn route(&mut self, si: usize, now: u64, key: &RequestKey) -> Result<Routed, Reply> {
        let cfg = self.cfg.clone();
        let Some(svc) = cfg.services.get(si) else {
            return Err(Reply("registry_lb_unknown_service", String::new()));
        };
        let name = &svc.name;
        if self.stale.get(si).copied().unwrap_or(false) {
            self.metrics.inc(&format!("{name}.rq_stale"));
            return Err(Reply(
                "registry_lb_stale",
                format!("registry-lb: registry data for service `{name}` is too old\n"),
            ));
        }
        // Other workers' ejections: their generation gauge is read at most once per
        // millisecond per service (this worker's own apply at once).
        if self.outliers_seen_ms.get(si).copied() != Some(now) {
            self.sync_outliers(si);
            if let Some(t) = self.outliers_seen_ms.get_mut(si) {
                *t = now;
            }
        }
        let shared_load = svc.policy == Policy::LeastRequest || svc.bounded_load_percent.is_some();
        let total_gauge = if svc.bounded_load_percent.is_some() {
            self.gauge_cached(si, ServiceGauge::RqActive)
        } else {
            None
        };
        let total_active = total_gauge.map(gauge_get).unwrap_or(0).max(0) as u64;
        let want = if cfg.handoff == Handoff::OverrideHost {
            svc.override_host_count as usize
        } else {
            1
        };
        // The chosen slot, the further ranked ones (override_host only: no
        // allocation otherwise), and whether it is a half-open trial.
        let mut chosen: Option<(u32, Vec<u32>, bool)> = None;
        for _attempt in 0..3 {
            // Take the table out so the gauge lookup can borrow the rest of `self`.
            let Some(mut table) = self.tables.get_mut(si).and_then(Option::take) else {
                break;
            };
            let mut rng = self.rng.clone();
            let load = |slot: u32| {
                if shared_load {
                    self.slot_gauge(si, slot, SlotGauge::RqActive)
                        .map(gauge_get)
                        .unwrap_or(0)
                } else {
                    0
                }
            };
            let mut req = Request {
                rng: &mut rng,
                now_ms: now,
                hash: key.hash,
                subset: key.subset.as_deref(),
                active: load,
                total_active,
            };
            let picked: Option<(u32, Vec<u32>)> = if want > 1 {
                let ranked: Vec<u32> = table
                    .ranked(want, &mut req)
                    .into_iter()
                    .filter_map(|i| table.endpoints.get(i))
                    .map(|e| e.slot)
                    .collect();
                ranked
                    .split_first()
                    .map(|(first, rest)| (*first, rest.to_vec()))
            } else {
                table.pick(&mut req).map(|e| (e.slot, Vec::new()))
            };
            let panic = table.panic;
            self.rng = rng;
            if let Some(t) = self.tables.get_mut(si) {
                *t = Some(table);
            }
            let Some((slot, rest)) = picked else { break };
            if panic {
                self.metrics.inc(&format!("{name}.rq_panic"));
            }
            if self.outliers[si].is_half_open(slot) {
                // Half-open: this request is the one trial, if no other worker took it.
                if self.update_outliers(si, |o| o.start_trial(slot, now)) {
                    chosen = Some((slot, rest, true));
                    break;
                }
                self.sync_outliers(si);
                continue;
            }
            chosen = Some((slot, rest, false));
            break;
        }
        let Some((slot, fallbacks, trial)) = chosen else {
            self.metrics.inc(&format!("{name}.rq_no_instance"));
            return Err(Reply(
                "registry_lb_no_instance",
                format!("registry-lb: no available instance for service `{name}`\n"),
            ));
        };
        let handed = match cfg.handoff {
            Handoff::FilterState | Handoff::Header => match self.handoff_payload(si, slot) {
                Some(payload) => match cfg.handoff {
                    Handoff::FilterState => handoff::set_filter_state_args(payload),
                    _ => handoff::set_header_bytes(&cfg.handoff_header, payload),
                },
                None => Err(Status::NotFound),
            },
            Handoff::OverrideHost => {
                // The ranked list, from each instance's cached `ip:port` bytes.
                let mut list: Vec<u8> = Vec::new();
                for s in std::iter::once(slot).chain(fallbacks.iter().copied()) {
                    if let Some(p) = self.handoff_payload(si, s) {
                        if !list.is_empty() {
                            list.push(b',');
                        }
                        list.extend_from_slice(p);
                    }
                }
                handoff::set_header_bytes(&cfg.handoff_header, &list)
            }
        };
        if let Err(e) = handed {
            self.metrics.inc(&format!("{name}.handoff_failed"));
            let host = self.host_of(si, slot).unwrap_or_else(|| "?".into());
            log::error!("registry-lb: service {name}: cannot hand {host} to Envoy: {e:?}");
            return Err(Reply(
                "registry_lb_handoff_failed",
                format!("registry-lb: cannot route to service `{name}`\n"),
            ));
        }
        let gauge = if shared_load {
            self.slot_gauge(si, slot, SlotGauge::RqActive)
        } else {
            None
        };
        for id in [gauge, total_gauge].into_iter().flatten() {
            gauge_add(id, 1);
        }
        if svc.policy == Policy::PeakEwma {
            if let Some(Some(t)) = self.tables.get_mut(si) {
                t.peak_start(slot);
            }
        }
        self.count_pick(si, slot, cfg.max_instance_stats);
        Ok(Routed {
            service: si,
            slot,
            gauge,
            trial,
            fallbacks,
            total_gauge,
        })
    }

    /// `ip:port` of the routable instance in `slot` of service `si` (formatted:
    /// the request path uses the per-slot cached bytes of `handoff_payload`).
    fn host_of(&self, si: usize, slot: u32) -> Option<String> {
        let t = self.tables.get(si)?.as_ref()?;
        t.index_of_slot(slot)
            .and_then(|i| t.endpoints.get(i))
            .map(|e| e.host())
    }

    /// The bytes that hand `slot`'s instance to Envoy (filter-state arguments or
    /// header value), built once per instance.
    fn handoff_payload(&mut self, si: usize, slot: u32) -> Option<&[u8]> {
        if self.slot_cache(si, slot)?.handoff.is_none() {
            let host = self.host_of(si, slot)?;
            let payload = match self.cfg.handoff {
                Handoff::FilterState => handoff::filter_state_args(&host),
                _ => host.as_bytes().to_vec(),
            };
            self.slot_cache(si, slot)?.handoff = Some(payload);
        }
        self.slot_cache(si, slot)?.handoff.as_deref()
    }

    /// Counts a pick of `slot`'s instance (per-instance counter while under the cap).
    fn count_pick(&mut self, si: usize, slot: u32, cap: usize) {
        if let Some(id) = self.slot_cache(si, slot).and_then(|c| c.pick) {
            self.metrics.count_pick(id);
            return;
        }
        let (Some(name), Some(host)) = (
            self.cfg.services.get(si).map(|s| s.name.clone()),
            self.host_of(si, slot),
        ) else {
            return;
        };
        if let Some(id) = self.metrics.pick(&name, &host, cap) {
            if let Some(c) = self.slot_cache(si, slot) {
                c.pick = Some(id);
            }
        }
    }

    /// Routes or fails the requests paused for a first snapshot, once it is there
    /// or their wait is over.
    pub fn release_waiting(&mut self, now: u64) {
        if self.waiting.is_empty() {
            return;
        }
        let waiting = std::mem::take(&mut self.waiting);
        for (ctx, si, deadline) in waiting {
            if self.unknown(si) && now < deadline {
                self.waiting.push((ctx, si, deadline));
                continue;
            }
            if hostcalls::set_effective_context(ctx).is_err() {
                continue; // the request is gone
            }
            match self.route(si, now, &RequestKey::default()) {
                Ok(routed) => {
                    self.deferred.insert(ctx, routed);
                    continue_request();
                }
                Err(Reply(details, body)) => local_reply(503, details, &body),
            }
        }
    }

    /// Forgets a request that ended while paused.
    pub fn forget(&mut self, ctx: u32) {
        self.waiting.retain(|(c, _, _)| *c != ctx);
    }

    pub fn service_index(&self, name: &str) -> Option<usize> {
        self.cfg.service(name).map(|(i, _)| i)
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

/// Resumes the current (paused) request; a stream that is gone is ignored.
pub fn continue_request() {
    // SAFETY: plain ABI call with no pointers; 0 = the request stream.
    let _ = unsafe { proxy_continue_stream(0) };
}

/// A local reply with Envoy response-code details (`%RESPONSE_CODE_DETAILS%`).
pub fn local_reply(status: u32, details: &str, body: &str) {
    // proxy-wasm header map: count, (key len, value len)*, then each key\0 value\0.
    let (k, v) = ("content-type", "text/plain");
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
            status,
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

/// Log-safe form of a service name taken from route metadata.
pub fn shown(name: &str) -> String {
    truncate(name, 64)
}
