//! The per-worker routing table of one service: the instances of the current
//! snapshot, their `ip:port` text prepared once, which of them are routable now
//! (registry health, outlier ejection, panic mode), and the policy state.
//! Rebuilt when a worker sees a new snapshot or a new ejection state, never per request.
//!
//! Panic mode follows Envoy's `healthy_panic_threshold`: when fewer than
//! `panic_threshold` percent of the non-draining instances are routable, traffic is
//! spread over all of them (health and ejections ignored) rather than crushing the
//! few that are left. Draining instances never get new requests.

use crate::balancer::{LeastRequest, RoundRobin};
use crate::config::Policy;
use crate::instance::State;
use crate::outlier::Outliers;
use crate::rng::Rng;
use crate::snapshot::Snapshot;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// `ip:port` (`[v6]:port`), as handed to Envoy.
    pub host: String,
    pub weight: u32,
    /// Slot of the instance's shared in-flight gauge and outlier state.
    pub slot: u32,
}

#[derive(Debug)]
enum PolicyState {
    RoundRobin(RoundRobin),
    LeastRequest(LeastRequest),
}

/// How a table picks.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    pub policy: Policy,
    pub choice_count: u32,
    /// Percent; 0 disables panic mode.
    pub panic_threshold: u32,
}

#[derive(Debug)]
pub struct Table {
    pub version: u64,
    pub published_ms: u64,
    /// Instances in the snapshot, routable or not.
    pub known: usize,
    /// Non-draining instances with their registry health.
    candidates: Vec<(Endpoint, bool)>,
    /// What the policy picks from now.
    pub endpoints: Vec<Endpoint>,
    /// Routing over all candidates because too few are routable.
    pub panic: bool,
    /// Generation of the outlier state applied.
    pub outlier_generation: u64,
    options: Options,
    policy: PolicyState,
}

impl Table {
    pub fn build(snap: &Snapshot, options: Options, rng: &mut impl Rng) -> Table {
        let candidates: Vec<(Endpoint, bool)> = snap
            .entries
            .iter()
            .filter(|e| e.instance.state != State::Draining)
            .map(|e| {
                let ep = Endpoint { host: e.instance.addr.to_string(), weight: e.instance.weight, slot: e.slot };
                (ep, e.instance.state == State::Healthy)
            })
            .collect();
        let mut t = Table {
            version: snap.version,
            published_ms: snap.published_ms,
            known: snap.entries.len(),
            candidates,
            endpoints: Vec::new(),
            panic: false,
            outlier_generation: 0,
            options,
            policy: PolicyState::RoundRobin(RoundRobin::Empty),
        };
        t.apply(&Outliers::default(), rng);
        t
    }

    /// Recomputes the routable set with this ejection state.
    pub fn apply(&mut self, outliers: &Outliers, rng: &mut impl Rng) {
        let routable: Vec<Endpoint> = self
            .candidates
            .iter()
            .filter(|(e, healthy)| *healthy && !outliers.is_out(e.slot))
            .map(|(e, _)| e.clone())
            .collect();
        let threshold = u64::from(self.options.panic_threshold.min(100));
        self.panic = !self.candidates.is_empty() && (routable.len() as u64) * 100 < threshold * self.candidates.len() as u64;
        self.endpoints = if self.panic { self.candidates.iter().map(|(e, _)| e.clone()).collect() } else { routable };
        self.outlier_generation = outliers.generation;
        let weights: Vec<u32> = self.endpoints.iter().map(|e| e.weight).collect();
        self.policy = match self.options.policy {
            Policy::RoundRobin => PolicyState::RoundRobin(RoundRobin::new(&weights, rng)),
            Policy::LeastRequest => PolicyState::LeastRequest(LeastRequest::new(&weights, self.options.choice_count)),
        };
    }

    /// Index (into `endpoints`) of the next pick. `active(slot)` gives the shared
    /// in-flight count of a slot.
    pub fn pick_index(&mut self, rng: &mut impl Rng, mut active: impl FnMut(u32) -> i64) -> Option<usize> {
        match &mut self.policy {
            PolicyState::RoundRobin(rr) => rr.pick(),
            PolicyState::LeastRequest(lr) => {
                let eps = &self.endpoints;
                lr.pick(rng, |i| eps.get(i).map(|e| active(e.slot)).unwrap_or(i64::MAX))
            }
        }
    }

    /// Picks an endpoint.
    pub fn pick(&mut self, rng: &mut impl Rng, active: impl FnMut(u32) -> i64) -> Option<&Endpoint> {
        let i = self.pick_index(rng, active)?;
        self.endpoints.get(i)
    }

    /// Up to `n` distinct endpoints in the policy's order of preference: the first
    /// pick, then further picks (for retries that should go elsewhere).
    pub fn ranked(&mut self, n: usize, rng: &mut impl Rng, mut active: impl FnMut(u32) -> i64) -> Vec<usize> {
        let mut out: Vec<usize> = Vec::with_capacity(n);
        let want = n.min(self.endpoints.len());
        // Bounded: a few extra draws, then fill with the remaining in order.
        for _ in 0..want * 4 {
            if out.len() >= want {
                break;
            }
            match self.pick_index(rng, &mut active) {
                Some(i) if !out.contains(&i) => out.push(i),
                Some(_) => {}
                None => break,
            }
        }
        let mut i = 0;
        while out.len() < want && i < self.endpoints.len() {
            if !out.contains(&i) {
                out.push(i);
            }
            i += 1;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::instance::Instance;
    use crate::rng::SplitMix64;
    use crate::snapshot::Entry;
    use wasm_bindgen_test::wasm_bindgen_test;

    fn opts(policy: Policy) -> Options {
        Options { policy, choice_count: 2, panic_threshold: 50 }
    }

    fn snap() -> Snapshot {
        let mk = |ip: &str, w: u32, state: State, slot: u32| {
            let mut i = Instance::new(format!("{ip}:80").parse().unwrap(), w);
            i.state = state;
            Entry { instance: i, source: 0, slot }
        };
        Snapshot {
            version: 3,
            entries: vec![
                mk("10.0.0.1", 5, State::Healthy, 0),
                mk("10.0.0.2", 1, State::Unhealthy, 1),
                mk("10.0.0.3", 1, State::Draining, 2),
                mk("10.0.0.4", 1, State::Healthy, 3),
            ],
            ..Default::default()
        }
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn only_healthy_instances_are_routable() {
        let mut r = SplitMix64(1);
        let mut t = Table::build(&snap(), opts(Policy::RoundRobin), &mut r);
        assert_eq!(t.known, 4);
        assert_eq!(t.endpoints.len(), 2);
        assert!(!t.panic, "2 of 3 non-draining instances are healthy");
        let mut c = std::collections::HashMap::new();
        for _ in 0..60 {
            *c.entry(t.pick(&mut r, |_| 0).unwrap().host.clone()).or_insert(0) += 1;
        }
        assert_eq!(c["10.0.0.1:80"], 50);
        assert_eq!(c["10.0.0.4:80"], 10);
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn least_request_reads_load_by_slot() {
        let mut r = SplitMix64(1);
        let mut t = Table::build(&snap(), opts(Policy::LeastRequest), &mut r);
        // Slot 3 (10.0.0.4, weight 1) is busy: it loses every pair it is in, so it
        // is chosen only when both draws are it, (1/6)^2 of the time.
        let mut busy = 0;
        for _ in 0..1000 {
            if t.pick(&mut r, |slot| if slot == 3 { 10 } else { 0 }).unwrap().host == "10.0.0.4:80" {
                busy += 1;
            }
        }
        assert!((10..60).contains(&busy), "{busy}");
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn empty_table_picks_nothing() {
        let mut r = SplitMix64(1);
        let mut t = Table::build(&Snapshot::default(), opts(Policy::LeastRequest), &mut r);
        assert!(t.pick(&mut r, |_| 0).is_none());
        let mut t = Table::build(&Snapshot::default(), opts(Policy::RoundRobin), &mut r);
        assert!(t.pick(&mut r, |_| 0).is_none());
    }

    fn hosts(t: &Table) -> Vec<&str> {
        t.endpoints.iter().map(|e| e.host.as_str()).collect()
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn ejected_instances_leave_and_half_open_ones_return() {
        use crate::outlier::{Breaker, SlotState};
        let mut r = SplitMix64(1);
        let mut t = Table::build(&snap(), Options { panic_threshold: 0, ..opts(Policy::RoundRobin) }, &mut r);
        let mut o = Outliers { generation: 4, ..Default::default() };
        o.slots.insert(0, SlotState { breaker: Breaker::Open, until_ms: 9, times: 1 });
        t.apply(&o, &mut r);
        assert_eq!(hosts(&t), ["10.0.0.4:80"]);
        assert_eq!(t.outlier_generation, 4);
        o.slots.insert(0, SlotState { breaker: Breaker::HalfOpen, until_ms: 9, times: 1 });
        t.apply(&o, &mut r);
        assert_eq!(hosts(&t), ["10.0.0.1:80", "10.0.0.4:80"]);
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn panic_mode_spreads_over_all_non_draining() {
        use crate::outlier::{Breaker, SlotState};
        let mut r = SplitMix64(1);
        let mut t = Table::build(&snap(), opts(Policy::RoundRobin), &mut r);
        let mut o = Outliers::default();
        o.slots.insert(0, SlotState { breaker: Breaker::Open, until_ms: 9, times: 1 });
        t.apply(&o, &mut r);
        // 1 routable of 3 non-draining (33 % < 50 %): panic, the draining one stays out.
        assert!(t.panic);
        assert_eq!(hosts(&t), ["10.0.0.1:80", "10.0.0.2:80", "10.0.0.4:80"]);
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn ranked_lists_distinct_endpoints() {
        let mut r = SplitMix64(1);
        let mut t = Table::build(&snap(), opts(Policy::RoundRobin), &mut r);
        let ranked = t.ranked(3, &mut r, |_| 0);
        assert_eq!(ranked.len(), 2, "only two routable");
        assert_ne!(ranked[0], ranked[1]);
        let mut t = Table::build(&Snapshot::default(), opts(Policy::LeastRequest), &mut r);
        assert!(t.ranked(3, &mut r, |_| 0).is_empty());
    }
}
