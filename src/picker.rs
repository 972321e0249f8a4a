//! The per-worker routing table of one service: the routable instances of the
//! current snapshot, their `ip:port` text prepared once, and the policy state.
//! Built when a worker sees a new snapshot version, never per request.

use crate::balancer::{LeastRequest, RoundRobin};
use crate::config::Policy;
use crate::instance::State;
use crate::rng::Rng;
use crate::snapshot::Snapshot;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// `ip:port` (`[v6]:port`), as handed to Envoy.
    pub host: String,
    pub weight: u32,
    /// Slot of the instance's shared in-flight gauge.
    pub slot: u32,
}

#[derive(Debug)]
enum PolicyState {
    RoundRobin(RoundRobin),
    LeastRequest(LeastRequest),
}

#[derive(Debug)]
pub struct Table {
    pub version: u64,
    pub published_ms: u64,
    pub endpoints: Vec<Endpoint>,
    /// Instances in the snapshot, routable or not.
    pub known: usize,
    policy: PolicyState,
}

impl Table {
    pub fn build(snap: &Snapshot, policy: Policy, choices: u32, rng: &mut impl Rng) -> Table {
        let endpoints: Vec<Endpoint> = snap
            .entries
            .iter()
            .filter(|e| e.instance.state == State::Healthy)
            .map(|e| Endpoint { host: e.instance.addr.to_string(), weight: e.instance.weight, slot: e.slot })
            .collect();
        let weights: Vec<u32> = endpoints.iter().map(|e| e.weight).collect();
        let policy = match policy {
            Policy::RoundRobin => PolicyState::RoundRobin(RoundRobin::new(&weights, rng)),
            Policy::LeastRequest => PolicyState::LeastRequest(LeastRequest::new(&weights, choices)),
        };
        Table { version: snap.version, published_ms: snap.published_ms, endpoints, known: snap.entries.len(), policy }
    }

    /// Picks an endpoint. `active(slot)` gives the shared in-flight count of a slot.
    pub fn pick(&mut self, rng: &mut impl Rng, mut active: impl FnMut(u32) -> i64) -> Option<&Endpoint> {
        let i = match &mut self.policy {
            PolicyState::RoundRobin(rr) => rr.pick()?,
            PolicyState::LeastRequest(lr) => {
                let eps = &self.endpoints;
                lr.pick(rng, |i| eps.get(i).map(|e| active(e.slot)).unwrap_or(i64::MAX))?
            }
        };
        self.endpoints.get(i)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::instance::Instance;
    use crate::rng::SplitMix64;
    use crate::snapshot::Entry;
    use wasm_bindgen_test::wasm_bindgen_test;

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
        let mut t = Table::build(&snap(), Policy::RoundRobin, 2, &mut r);
        assert_eq!(t.known, 4);
        assert_eq!(t.endpoints.len(), 2);
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
        let mut t = Table::build(&snap(), Policy::LeastRequest, 2, &mut r);
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
        let mut t = Table::build(&Snapshot::default(), Policy::LeastRequest, 2, &mut r);
        assert!(t.pick(&mut r, |_| 0).is_none());
        let mut t = Table::build(&Snapshot::default(), Policy::RoundRobin, 2, &mut r);
        assert!(t.pick(&mut r, |_| 0).is_none());
    }
}
