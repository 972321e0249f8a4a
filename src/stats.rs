//! Every Envoy stat registry-lb defines, in one list, and the per-VM cache of their
//! ids.
//!
//! Stats live under `wasmcustom.registry_lb.`: global ones by name, per-service ones
//! as `<service>.<name>`, per-slot ones as `<service>.slot_<n>.<name>`, and the
//! per-instance pick counters as `<service>.instance.<ip>_<port>.picks` (capped by
//! `max_instance_stats`, then `<service>.instance.overflow.picks`). A stat cannot be
//! deleted once defined, so every name here is bounded: per service, per slot
//! (slots are reused as instances churn), or capped per instance. `docs/metrics.md`
//! lists the same names; a test checks that the two agree.

use crate::envoy::{Envoy, MetricKind};
use std::collections::HashMap;

/// Defines the stat enums: variant, name, kind, one line of meaning per stat.
macro_rules! stats {
    ($(#[$m:meta])* $ty:ident { $($v:ident = $name:literal, $kind:ident;)* }) => {
        $(#[$m])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum $ty { $($v,)* }

        impl $ty {
            /// Every stat of this kind.
            pub const ALL: &'static [$ty] = &[$($ty::$v,)*];

            /// Name under its prefix.
            pub fn name(self) -> &'static str {
                match self { $($ty::$v => $name,)* }
            }

            pub fn kind(self) -> MetricKind {
                match self { $($ty::$v => MetricKind::$kind,)* }
            }

            /// The stat of this name, if it is one.
            pub fn named(name: &str) -> Option<$ty> {
                Self::ALL.iter().copied().find(|s| s.name() == name)
            }
        }
    };
}

stats! {
    /// Per-service stats, `<service>.<name>`.
    Stat {
        InstancesKnown = "instances_known", Gauge;
        InstancesHealthy = "instances_healthy", Gauge;
        SnapshotVersion = "snapshot_version", Gauge;
        SnapshotBytes = "snapshot_bytes", Gauge;
        SnapshotAgeMs = "snapshot_age_ms", Gauge;
        SnapshotPublished = "snapshot_published", Counter;
        SnapshotDecodeFailed = "snapshot_decode_failed", Counter;
        RefreshOk = "refresh_ok", Counter;
        RefreshUnchanged = "refresh_unchanged", Counter;
        RefreshLastUs = "refresh_last_us", Gauge;
        RefreshTotalUs = "refresh_total_us", Counter;
        RefreshFailed = "refresh_failed", Counter;
        RefreshFailedUnreachable = "refresh_failed_unreachable", Counter;
        RefreshFailedAuth = "refresh_failed_auth", Counter;
        RefreshFailedStatus = "refresh_failed_status", Counter;
        RefreshFailedMalformed = "refresh_failed_malformed", Counter;
        RefreshFailedTooLarge = "refresh_failed_too_large", Counter;
        RegistryLogin = "registry_login", Counter;
        RegistryTokenExpired = "registry_token_expired", Counter;
        RegistryWarning = "registry_warning", Counter;
        InstancesRejected = "instances_rejected", Counter;
        RqNoInstance = "rq_no_instance", Counter;
        RqWaitedForFirstSnapshot = "rq_waited_for_first_snapshot", Counter;
        RqPanic = "rq_panic", Counter;
        RqStale = "rq_stale", Counter;
        RqHashKeyMissing = "rq_hash_key_missing", Counter;
        SubsetHeaderInvalid = "subset_header_invalid", Counter;
        LoadReportInvalid = "load_report_invalid", Counter;
        HandoffFailed = "handoff_failed", Counter;
        OutlierEjections = "outlier_ejections", Counter;
        OutlierTrialOk = "outlier_trial_ok", Counter;
        OutlierTrialFailed = "outlier_trial_failed", Counter;
        InstancesEjected = "instances_ejected", Gauge;
        OutlierGeneration = "outlier_generation", Gauge;
        GuardHeld = "guard_held", Counter;
        GuardReleased = "guard_released", Counter;
        HealthCheckDown = "health_check_down", Counter;
        HealthCheckUp = "health_check_up", Counter;
        InstancesHcFailed = "instances_hc_failed", Gauge;
        RqActive = "rq_active", Gauge;
        ShadowPicks = "shadow_picks", Counter;
        ShadowDisagreements = "shadow_disagreements", Counter;
        ShadowCompared = "shadow_compared", Counter;
        ShadowLatencyLowerUs = "shadow_latency_lower_us", Counter;
        ShadowLatencyHigherUs = "shadow_latency_higher_us", Counter;
    }
}

stats! {
    /// Per-slot stats, `<service>.slot_<n>.<name>`.
    SlotStat {
        RqActive = "rq_active", Gauge;
        Consecutive5xx = "consecutive_5xx", Gauge;
    }
}

stats! {
    /// Stats of the whole plugin.
    GlobalStat {
        ClientHandoffHeaderRemoved = "client_handoff_header_removed", Counter;
        UnknownService = "unknown_service", Counter;
        RegisterAppHealthy = "register_app_healthy", Gauge;
        RegisterRegistered = "register_registered", Counter;
        RegisterHeartbeatOk = "register_heartbeat_ok", Counter;
        RegisterFailed = "register_failed", Counter;
        RegisterForgotten = "register_forgotten", Counter;
        RegisterMarkedDown = "register_marked_down", Counter;
        RegisterMarkedUp = "register_marked_up", Counter;
        RegisterDeregistered = "register_deregistered", Counter;
        StatusServed = "status_served", Counter;
        StatusForbidden = "status_forbidden", Counter;
        ExplainServed = "explain_served", Counter;
        ExplainRefused = "explain_refused", Counter;
    }
}

impl Stat {
    /// `refresh_failed_<kind>` for a registry error kind.
    pub fn refresh_failed(kind: &str) -> Option<Stat> {
        Stat::named(&format!("refresh_failed_{kind}"))
    }

    /// `registry_<why>` for a registry client's extra step (`login`, `token_expired`).
    pub fn registry(why: &str) -> Option<Stat> {
        Stat::named(&format!("registry_{why}"))
    }
}

/// Prefix of every registry-lb stat.
pub const PREFIX: &str = "registry_lb";

/// The per-instance pick counter's name part: `instance.<ip>_<port>.picks`.
pub fn instance_picks(host: &str) -> String {
    format!("instance.{}.picks", stat_safe(host))
}

/// The pick counter of instances over the cap.
pub const INSTANCE_OVERFLOW_PICKS: &str = "instance.overflow.picks";

/// `10.0.0.1:8080` → `10_0_0_1_8080` (dots and colons would split Envoy stat names).
pub fn stat_safe(host: &str) -> String {
    host.chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect::<String>()
        .trim_matches('_')
        .to_string()
}

/// Stat ids of one VM, defined on first use and cached (a failed definition is
/// logged once and remembered as `None`).
#[derive(Default)]
pub struct Stats {
    ids: HashMap<String, Option<u32>>,
    instance_names: HashMap<String, usize>,
    /// Per-instance pick counts not yet added to Envoy's counters (flushed on tick,
    /// so a request costs no host call for them).
    pending_picks: fnv::FnvHashMap<u32, i64>,
}

impl Stats {
    fn id_of(&mut self, host: &impl Envoy, kind: MetricKind, name: String) -> Option<u32> {
        if let Some(id) = self.ids.get(&name) {
            return *id;
        }
        let full = format!("{PREFIX}.{name}");
        let id = match host.define_metric(kind, &full) {
            Ok(id) => Some(id),
            Err(e) => {
                log::error!("registry-lb: cannot define metric {full}: {e}");
                None
            }
        };
        self.ids.insert(name, id);
        id
    }

    /// Id of `<service>.<stat>`.
    pub fn id(&mut self, host: &impl Envoy, service: &str, s: Stat) -> Option<u32> {
        self.id_of(host, s.kind(), format!("{service}.{}", s.name()))
    }

    /// Id of `<service>.slot_<slot>.<stat>`.
    pub fn slot_id(
        &mut self,
        host: &impl Envoy,
        service: &str,
        slot: u32,
        s: SlotStat,
    ) -> Option<u32> {
        self.id_of(
            host,
            s.kind(),
            format!("{service}.slot_{slot}.{}", s.name()),
        )
    }

    pub fn inc(&mut self, host: &impl Envoy, service: &str, s: Stat) {
        self.add(host, service, s, 1);
    }

    pub fn add(&mut self, host: &impl Envoy, service: &str, s: Stat, by: i64) {
        if let Some(id) = self.id(host, service, s) {
            host.metric_add(id, by);
        }
    }

    /// Sets gauge `<service>.<stat>`.
    pub fn set(&mut self, host: &impl Envoy, service: &str, s: Stat, v: u64) {
        if let Some(id) = self.id(host, service, s) {
            host.metric_record(id, v);
        }
    }

    /// Sets global gauge `<stat>`.
    pub fn set_global(&mut self, host: &impl Envoy, s: GlobalStat, v: u64) {
        if let Some(id) = self.id_of(host, s.kind(), s.name().to_string()) {
            host.metric_record(id, v);
        }
    }

    pub fn inc_global(&mut self, host: &impl Envoy, s: GlobalStat) {
        if let Some(id) = self.id_of(host, s.kind(), s.name().to_string()) {
            host.metric_add(id, 1);
        }
    }

    /// Counts a pick of `instance` (`ip:port`) in `service`, by instance while under
    /// the cap; returns the counter id for the caller to cache.
    pub fn pick(
        &mut self,
        host: &impl Envoy,
        service: &str,
        instance: &str,
        cap: usize,
    ) -> Option<u32> {
        let name = format!("{service}.{}", instance_picks(instance));
        let id = if self.ids.contains_key(&name) {
            self.id_of(host, MetricKind::Counter, name)
        } else {
            let used = self.instance_names.entry(service.to_string()).or_insert(0);
            if *used >= cap {
                self.id_of(
                    host,
                    MetricKind::Counter,
                    format!("{service}.{INSTANCE_OVERFLOW_PICKS}"),
                )
            } else {
                *used += 1;
                self.id_of(host, MetricKind::Counter, name)
            }
        };
        if let Some(id) = id {
            self.count_pick(id);
        }
        id
    }

    /// Counts a pick on a known counter id (no host call: flushed on tick).
    pub fn count_pick(&mut self, id: u32) {
        *self.pending_picks.entry(id).or_insert(0) += 1;
    }

    /// Adds the pending pick counts to Envoy's counters.
    pub fn flush(&mut self, host: &impl Envoy) {
        for (id, n) in self.pending_picks.drain() {
            host.metric_add(id, n);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envoy::fake::FakeEnvoy;
    use std::collections::HashSet;
    use wasm_bindgen_test::wasm_bindgen_test;

    #[wasm_bindgen_test(unsupported = test)]
    fn names_are_unique_and_stat_safe() {
        let mut seen = HashSet::new();
        for n in Stat::ALL.iter().map(|s| s.name()) {
            assert!(seen.insert(n), "duplicate {n}");
            assert!(
                n.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'),
                "{n}"
            );
        }
        for n in GlobalStat::ALL.iter().map(|s| s.name()) {
            assert!(seen.insert(n), "duplicate {n}");
        }
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn every_registry_error_and_extra_step_has_a_stat() {
        for kind in ["unreachable", "auth", "status", "malformed", "too_large"] {
            assert!(Stat::refresh_failed(kind).is_some(), "{kind}");
        }
        for why in ["login", "token_expired"] {
            assert!(Stat::registry(why).is_some(), "{why}");
        }
        assert_eq!(Stat::refresh_failed("nonsense"), None);
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn picks_are_capped_per_service_and_flushed_on_demand() {
        let host = FakeEnvoy::new();
        let mut s = Stats::default();
        for i in 0..5 {
            s.pick(&host, "web", &format!("10.0.0.{i}:80"), 3);
        }
        s.pick(&host, "web", "10.0.0.0:80", 3);
        assert_eq!(
            host.stat("web.instance.10_0_0_0_80.picks"),
            0,
            "not flushed yet"
        );
        s.flush(&host);
        assert_eq!(host.stat("web.instance.10_0_0_0_80.picks"), 2);
        assert_eq!(host.stat("web.instance.overflow.picks"), 2);
        assert_eq!(host.stat_names().len(), 4, "{:?}", host.stat_names());
    }

    /// The stats of one `| stat | type | meaning |` table of `docs/metrics.md`
    /// under `heading`, as (name, kind); `<kind>` placeholders are expanded with
    /// the backticked words of the meaning column.
    fn documented(heading: &str) -> Vec<(String, MetricKind)> {
        let doc = include_str!("../docs/metrics.md");
        let Some(start) = doc.find(heading) else {
            panic!("docs/metrics.md has no {heading}");
        };
        let section = &doc[start + heading.len()..];
        let section = &section[..section.find("\n## ").unwrap_or(section.len())];
        let ticked = |cell: &str| -> Vec<String> {
            cell.split('`')
                .skip(1)
                .step_by(2)
                .map(str::to_string)
                .collect()
        };
        let mut out = Vec::new();
        for row in section.lines().filter(|l| l.starts_with("| `")) {
            let cells: Vec<&str> = row.trim_matches('|').split('|').map(str::trim).collect();
            let [names, kind, meaning] = cells[..] else {
                panic!("row {row}");
            };
            let kind = match kind {
                "counter" => MetricKind::Counter,
                "gauge" => MetricKind::Gauge,
                other => panic!("type `{other}` in {row}"),
            };
            for name in ticked(names) {
                if name.contains("<kind>") {
                    for k in ticked(meaning) {
                        out.push((name.replace("<kind>", &k), kind));
                    }
                } else {
                    out.push((name, kind));
                }
            }
        }
        out
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn the_metrics_doc_lists_exactly_the_stats_of_the_code() {
        let mut code: Vec<(String, MetricKind)> = Stat::ALL
            .iter()
            .map(|s| (s.name().to_string(), s.kind()))
            .chain(
                SlotStat::ALL
                    .iter()
                    .map(|s| (format!("slot_<n>.{}", s.name()), s.kind())),
            )
            .chain([
                (
                    "instance.<ip>_<port>.picks".to_string(),
                    MetricKind::Counter,
                ),
                (INSTANCE_OVERFLOW_PICKS.to_string(), MetricKind::Counter),
            ])
            .collect();
        let mut doc = documented("## Per-service stats");
        code.sort_by(|a, b| a.0.cmp(&b.0));
        doc.sort_by(|a, b| a.0.cmp(&b.0));
        let missing: Vec<_> = code.iter().filter(|c| !doc.contains(c)).collect();
        let extra: Vec<_> = doc.iter().filter(|d| !code.contains(d)).collect();
        assert!(
            missing.is_empty() && extra.is_empty(),
            "per-service stats: not in docs/metrics.md (or another type): {missing:?}; documented but not in the code: {extra:?}"
        );
        assert_eq!(
            instance_picks("10.0.0.1:80").replace("10_0_0_1_80", "<ip>_<port>"),
            "instance.<ip>_<port>.picks"
        );
        let mut code: Vec<(String, MetricKind)> = GlobalStat::ALL
            .iter()
            .map(|s| (s.name().to_string(), s.kind()))
            .collect();
        let mut doc = documented("## Global stats");
        code.sort_by(|a, b| a.0.cmp(&b.0));
        doc.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(code, doc, "global stats");
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn stat_safe_replaces_separators() {
        assert_eq!(stat_safe("10.0.0.1:8080"), "10_0_0_1_8080");
        assert_eq!(stat_safe("[::1]:80"), "1__80");
    }
}
