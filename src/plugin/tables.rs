//! The worker's routing tables, kept current from shared data: a table per service
//! rebuilt when a newer snapshot is published, the shared ejection state applied when
//! its generation moves, and effective weights (slow start, load reports) recomputed
//! while they change.

use super::Plugin;
use crate::config::{PluginConfig, ServiceConfig};
use crate::envoy::Envoy;
use crate::load_report::{self, UtilizationWeights, WeightConfig};
use crate::outlier::{self, Outliers};
use crate::picker::{Options, Table};
use crate::slow_start::{self, FirstSeen, FirstSeenTracker, SlowStart};
use crate::snapshot::Snapshot;
use crate::stats::{SlotStat, Stat};
use std::collections::HashMap;

/// Per-service state of effective weights: slow start and load reports.
pub(super) struct Weights {
    pub first_seen: FirstSeenTracker<std::net::SocketAddr>,
    pub slow: Option<SlowStart>,
    pub load: Option<UtilizationWeights>,
    /// Next time the table's weights are recomputed while they move.
    next_ms: u64,
}

impl Weights {
    fn of(s: &ServiceConfig) -> Weights {
        Weights {
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
        }
    }

    fn moving(&self) -> bool {
        self.slow.is_some() || self.load.is_some()
    }
}

/// What the request path needs about one slot of one service, resolved once:
/// stat ids, and the bytes that hand its instance to Envoy.
#[derive(Clone, Debug, Default)]
pub(super) struct SlotCache {
    /// `<service>.slot_<n>.rq_active` (`None` until resolved).
    pub active: Option<Option<u32>>,
    /// `<service>.slot_<n>.consecutive_5xx`.
    pub consecutive: Option<Option<u32>>,
    /// Pick counter of the instance now in the slot; forgotten with a new snapshot.
    pub pick: Option<u32>,
    /// Hand-off payload (filter-state arguments or header value) of the instance
    /// now in the slot; forgotten with a new snapshot.
    pub handoff: Option<Vec<u8>>,
    /// `ip:port` of the instance now in the slot (access log); forgotten with a new
    /// snapshot.
    pub text: Option<Vec<u8>>,
    /// Latency this worker observed from the instance now in the slot, as a moving
    /// average (kept for `peak_ewma` and shadowed services); nanoseconds.
    pub latency_ns: Option<f64>,
}

/// Per service: the worker's view.
pub(super) struct Service {
    pub table: Option<Table>,
    /// Last ejection state seen.
    pub outliers: Outliers,
    /// Served stale beyond `max_stale`.
    pub stale: bool,
    pub weights: Weights,
    /// Per slot: ids and hand-off bytes (index = slot).
    pub slots: Vec<SlotCache>,
    /// `<service>.rq_active` and `<service>.outlier_generation` ids, once resolved.
    pub rq_active: Option<Option<u32>>,
    pub outlier_generation: Option<Option<u32>>,
    /// When the request path last looked for other workers' ejections.
    pub outliers_seen_ms: u64,
    /// The `shadow_policy` table: same instances and weights, never routed by.
    pub shadow: Option<Table>,
    /// Shadow counts not yet added to Envoy's stats (flushed on tick).
    pub shadow_pending: ShadowCounts,
}

/// What the shadow policy did since the last flush.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct ShadowCounts {
    pub picks: i64,
    pub disagreements: i64,
    /// Disagreements where both instances had a latency estimate.
    pub compared: i64,
    /// Over those: how much lower / higher the shadow's instance estimate was, µs.
    pub lower_us: i64,
    pub higher_us: i64,
}

pub(super) struct Tables {
    pub services: Vec<Service>,
}

impl Tables {
    pub fn new(cfg: &PluginConfig) -> Tables {
        Tables {
            services: cfg
                .services
                .iter()
                .map(|s| Service {
                    table: None,
                    outliers: Outliers::default(),
                    stale: false,
                    weights: Weights::of(s),
                    slots: Vec::new(),
                    rq_active: None,
                    outlier_generation: None,
                    outliers_seen_ms: u64::MAX,
                    shadow: None,
                    shadow_pending: ShadowCounts::default(),
                })
                .collect(),
        }
    }
}

impl<H: Envoy> Plugin<H> {
    /// Rebuilds the table of service `i` if a newer snapshot was published.
    pub(super) fn refresh(&mut self, i: usize, now: u64) {
        let (Some(vkey), Some(skey)) = (self.keys.version.get(i), self.keys.snapshot.get(i)) else {
            return;
        };
        let Some(v) = shared_u64(&self.host, vkey) else {
            return;
        };
        let Some(state) = self.tables.services.get_mut(i) else {
            return;
        };
        if v <= state.table.as_ref().map(|t| t.version).unwrap_or(0) {
            return;
        }
        let (Some(bytes), _) = self.host.shared_get(skey) else {
            return;
        };
        let cfg = self.cfg.clone();
        let svc = &cfg.services[i];
        let snap = match Snapshot::decode(&bytes) {
            Ok(snap) => snap,
            Err(e) => {
                log::error!(
                    "registry-lb: service {}: {e}; keeping the previous table",
                    svc.name
                );
                self.stats
                    .inc(&self.host, &svc.name, Stat::SnapshotDecodeFailed);
                return;
            }
        };
        let w = &mut state.weights;
        w.first_seen
            .update(snap.entries.iter().map(|e| e.instance.addr), now);
        if let Some(l) = w.load.as_mut() {
            l.resize(
                snap.entries
                    .iter()
                    .map(|e| e.slot as usize + 1)
                    .max()
                    .unwrap_or(0),
            );
        }
        // The shadow table draws from its own stream: routing's stays as it would
        // be without it.
        state.shadow = svc.shadow_policy.map(|p| {
            let mut o = Options::of(svc);
            o.policy = p;
            Table::build(snap.clone(), o, &mut self.shadow_rng)
        });
        let table = Table::build(snap, Options::of(svc), &mut self.rng);
        log::debug!(
            "registry-lb: service {}: worker table at version {} with {} routable of {} instance(s)",
            svc.name,
            table.version,
            table.endpoints.len(),
            table.known
        );
        state.table = Some(table);
        // Slots may now belong to other instances: re-resolve what is per instance.
        for c in state.slots.iter_mut() {
            c.pick = None;
            c.handoff = None;
            c.text = None;
            c.latency_ns = None;
        }
        self.reapply(i, now);
    }

    /// Tick duty: every table current, ejections applied, staleness judged.
    pub(super) fn refresh_all(&mut self, now: u64) {
        self.requests.expire_route_cache(now);
        for i in 0..self.tables.services.len() {
            self.refresh(i, now);
            self.sync_outliers(i, now);
            self.judge_staleness(i);
        }
    }

    /// Service `i` is stale when the registry has not confirmed its data for longer
    /// than `max_stale` (the leader's `snapshot_age_ms` gauge, shared by all VMs).
    fn judge_staleness(&mut self, i: usize) {
        let cfg = self.cfg.clone();
        let svc = &cfg.services[i];
        let max = svc.max_stale.0;
        if max == 0 {
            return;
        }
        let age = self
            .stats
            .id(&self.host, &svc.name, Stat::SnapshotAgeMs)
            .map(|id| self.host.metric_get(id))
            .unwrap_or(0);
        let stale = age as u64 > max;
        let Some(state) = self.tables.services.get_mut(i) else {
            return;
        };
        if stale != state.stale {
            if stale {
                log::error!("registry-lb: service {}: no registry confirmation for {age} ms (max_stale {max} ms): answering 503", svc.name);
            } else {
                log::info!(
                    "registry-lb: service {}: registry data fresh again",
                    svc.name
                );
            }
        }
        state.stale = stale;
    }

    /// Whether service `si` has shared ejection state (passive or active health).
    pub(super) fn outliers_on(&self, si: usize) -> bool {
        self.cfg
            .services
            .get(si)
            .is_some_and(|s| s.outlier_detection.consecutive_5xx > 0 || s.health_check.is_some())
    }

    /// Whether service `si` counts request outcomes against its instances.
    pub(super) fn passive_on(&self, si: usize) -> bool {
        self.cfg
            .services
            .get(si)
            .is_some_and(|s| s.outlier_detection.consecutive_5xx > 0)
    }

    /// Id of the gauge `<service>.outlier_generation`, cached.
    fn generation_gauge(&mut self, si: usize) -> Option<u32> {
        let state = self.tables.services.get_mut(si)?;
        if let Some(id) = state.outlier_generation {
            return id;
        }
        let id = self.stats.id(
            &self.host,
            &self.cfg.services.get(si)?.name,
            Stat::OutlierGeneration,
        );
        self.tables.services.get_mut(si)?.outlier_generation = Some(id);
        id
    }

    /// Id of the gauge `<service>.rq_active` (bounded load), cached.
    pub(super) fn service_active_gauge(&mut self, si: usize) -> Option<u32> {
        let state = self.tables.services.get_mut(si)?;
        if let Some(id) = state.rq_active {
            return id;
        }
        let id = self
            .stats
            .id(&self.host, &self.cfg.services.get(si)?.name, Stat::RqActive);
        self.tables.services.get_mut(si)?.rq_active = Some(id);
        id
    }

    /// The cache entry of `slot` of service `si`, grown on first use.
    pub(super) fn slot_cache(&mut self, si: usize, slot: u32) -> Option<&mut SlotCache> {
        let slots = &mut self.tables.services.get_mut(si)?.slots;
        let k = slot as usize;
        if k >= slots.len() {
            // Slots are dense and bounded by the snapshot's instance count.
            slots.resize(k + 1, SlotCache::default());
        }
        slots.get_mut(k)
    }

    /// Id of the gauge `<service>.slot_<n>.<what>`, cached so the request path does
    /// not format names.
    pub(super) fn slot_gauge(&mut self, si: usize, slot: u32, what: SlotStat) -> Option<u32> {
        let cached = {
            let c = self.slot_cache(si, slot)?;
            match what {
                SlotStat::RqActive => c.active,
                SlotStat::Consecutive5xx => c.consecutive,
            }
        };
        if let Some(id) = cached {
            return id;
        }
        let name = self.cfg.services.get(si)?.name.clone();
        let id = self.stats.slot_id(&self.host, &name, slot, what);
        let c = self.slot_cache(si, slot)?;
        match what {
            SlotStat::RqActive => c.active = Some(id),
            SlotStat::Consecutive5xx => c.consecutive = Some(id),
        }
        id
    }

    /// Re-reads the ejection state of service `si` if its generation moved.
    pub(super) fn sync_outliers(&mut self, si: usize, now: u64) {
        if !self.outliers_on(si) {
            return;
        }
        let Some(id) = self.generation_gauge(si) else {
            return;
        };
        let g = self.host.metric_get(id) as u64;
        let Some(state) = self.tables.services.get_mut(si) else {
            return;
        };
        let have = state.table.as_ref().map(|t| t.outlier_generation);
        if have == Some(g) && state.outliers.generation == g {
            return;
        }
        if state.outliers.generation != g {
            if let Some(key) = self.keys.outliers.get(si) {
                let (bytes, _) = self.host.shared_get(key);
                if let Some(o) = bytes.as_deref().and_then(Outliers::decode) {
                    state.outliers = o;
                }
            }
        }
        self.reapply(si, now);
    }

    /// Recomputes routable set and effective weights of service `si`'s table.
    pub(super) fn reapply(&mut self, si: usize, now: u64) {
        let Some(state) = self.tables.services.get_mut(si) else {
            return;
        };
        let Some(table) = state.table.as_mut() else {
            return;
        };
        let w = &mut state.weights;
        let factors: HashMap<u32, u64> = if w.moving() {
            table
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
                .collect()
        } else {
            HashMap::new()
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
        table.apply(&state.outliers, &weight, now, &mut self.rng);
        if let Some(t) = state.shadow.as_mut() {
            t.apply(&state.outliers, &weight, now, &mut self.shadow_rng);
        }
        w.next_ms = now + 1000;
    }

    /// Tick duty: weights that move with time (slow start, load reports) are
    /// recomputed once a second.
    pub(super) fn reweigh(&mut self, now: u64) {
        for si in 0..self.tables.services.len() {
            let w = &self.tables.services[si].weights;
            if w.moving() && now >= w.next_ms {
                self.reapply(si, now);
            }
        }
    }

    /// A backend's load report (response header value) for `slot` of service `si`.
    pub(super) fn load_report(&mut self, si: usize, slot: u32, value: &str, now: u64) {
        let util = match load_report::parse_orca(value) {
            Ok(r) => r.utilization(),
            Err(_) => load_report::parse_utilization(value).ok(),
        };
        let Some(u) = util else {
            if let Some(svc) = self.cfg.services.get(si) {
                self.stats
                    .inc(&self.host, &svc.name, Stat::LoadReportInvalid);
            }
            return;
        };
        if let Some(l) = self
            .tables
            .services
            .get_mut(si)
            .and_then(|s| s.weights.load.as_mut())
        {
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
    pub(super) fn seed_outliers(&mut self, si: usize) -> bool {
        if !self.outliers_on(si) {
            return false;
        }
        let Some(key) = self.keys.outliers.get(si) else {
            return false;
        };
        if let (None, None) = self.host.shared_get(key) {
            if let Err(e) = self
                .host
                .shared_set(key, &Outliers::default().encode(), None)
            {
                log::warn!("registry-lb: cannot create the shared ejection state ({e}); retrying on the next publication");
                return false;
            }
        }
        true
    }

    /// Changes the shared ejection state of service `si` with compare-and-swap.
    /// `change` returns whether it changed anything. Returns whether it was stored.
    pub(super) fn update_outliers(
        &mut self,
        si: usize,
        now: u64,
        mut change: impl FnMut(&mut Outliers) -> bool,
    ) -> bool {
        let Some(key) = self.keys.outliers.get(si).cloned() else {
            return false;
        };
        for _ in 0..8 {
            let (bytes, cas) = self.host.shared_get(&key);
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
            if self.host.shared_set(&key, &o.encode(), cas).is_ok() {
                let name = self.cfg.services[si].name.clone();
                self.stats
                    .set(&self.host, &name, Stat::OutlierGeneration, o.generation);
                let out = o
                    .slots
                    .values()
                    .filter(|s| s.breaker != outlier::Breaker::HalfOpen)
                    .count();
                self.stats
                    .set(&self.host, &name, Stat::InstancesEjected, out as u64);
                if let Some(state) = self.tables.services.get_mut(si) {
                    state.outliers = o;
                }
                self.sync_outliers(si, now);
                return true;
            }
        }
        log::warn!("registry-lb: ejection state update lost to contention; it is retried on the next event");
        false
    }

    /// Whether service `i` has no snapshot at all yet.
    pub(super) fn unknown(&self, i: usize) -> bool {
        self.tables
            .services
            .get(i)
            .map(|s| s.table.is_none())
            .unwrap_or(true)
    }
}

/// A little-endian u64 stored in shared data.
fn shared_u64(host: &impl Envoy, key: &str) -> Option<u64> {
    let (v, _) = host.shared_get(key);
    let a: [u8; 8] = v?.get(..8)?.try_into().ok()?;
    Some(u64::from_le_bytes(a))
}
