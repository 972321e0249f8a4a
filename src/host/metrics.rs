//! Envoy stats (`wasmcustom.registry_lb.*`), defined lazily and cached per VM.
//! Names are bounded: per service, per source, per slot, and per instance only up to
//! `max_instance_stats` distinct instances.

use proxy_wasm::hostcalls;
use proxy_wasm::types::MetricType;
use std::collections::HashMap;

#[derive(Default)]
pub struct Metrics {
    ids: HashMap<String, Option<u32>>,
    instance_names: HashMap<String, usize>,
    /// Per-instance pick counts not yet added to Envoy's counters (flushed on tick,
    /// so a request costs no host call for them).
    pending_picks: fnv::FnvHashMap<u32, i64>,
}

impl Metrics {
    fn id(&mut self, kind: MetricType, name: &str) -> Option<u32> {
        if let Some(id) = self.ids.get(name) {
            return *id;
        }
        let full = format!("registry_lb.{name}");
        let id = match hostcalls::define_metric(kind, &full) {
            Ok(id) => Some(id),
            Err(e) => {
                log::error!("registry-lb: cannot define metric {full}: {e:?}");
                None
            }
        };
        self.ids.insert(name.to_string(), id);
        id
    }

    pub fn inc(&mut self, name: &str) {
        self.add(name, 1);
    }

    pub fn add(&mut self, name: &str, by: i64) {
        if let Some(id) = self.id(MetricType::Counter, name) {
            let _ = hostcalls::increment_metric(id, by);
        }
    }

    pub fn gauge_set(&mut self, name: &str, v: u64) {
        if let Some(id) = self.id(MetricType::Gauge, name) {
            let _ = hostcalls::record_metric(id, v);
        }
    }

    /// Gauge id for repeated use on the request path.
    pub fn gauge_id(&mut self, name: &str) -> Option<u32> {
        self.id(MetricType::Gauge, name)
    }

    /// Counts a pick of `host` in `service`, by instance while under the cap.
    /// `id_hint` caches the counter id per endpoint so the request path does not
    /// format names.
    pub fn pick(&mut self, service: &str, host: &str, cap: usize) -> Option<u32> {
        let name = format!("{service}.instance.{}.picks", stat_safe(host));
        let id = if self.ids.contains_key(&name) {
            self.id(MetricType::Counter, &name)
        } else {
            let used = self.instance_names.entry(service.to_string()).or_insert(0);
            if *used >= cap {
                self.id(
                    MetricType::Counter,
                    &format!("{service}.instance.overflow.picks"),
                )
            } else {
                *used += 1;
                self.id(MetricType::Counter, &name)
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
    pub fn flush(&mut self) {
        for (id, n) in self.pending_picks.drain() {
            let _ = hostcalls::increment_metric(id, n);
        }
    }
}

pub fn gauge_add(id: u32, by: i64) {
    let _ = hostcalls::increment_metric(id, by);
}

pub fn gauge_get(id: u32) -> i64 {
    hostcalls::get_metric(id).map(|v| v as i64).unwrap_or(0)
}

/// `10.0.0.1:8080` → `10_0_0_1_8080` (dots and colons would split Envoy stat names).
pub fn stat_safe(host: &str) -> String {
    host.chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect::<String>()
        .trim_matches('_')
        .to_string()
}
