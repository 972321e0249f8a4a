//! What a pick looked at, for the decision header: the candidates a policy compared
//! and the cost it compared them on, kept in a small fixed array while a request
//! asked for it (no allocation, nothing recorded otherwise), and the header text.
//!
//! Costs are each policy's own: `least_request` and bounded loads compare in-flight
//! requests (shared by all workers), `peak_ewma` the latency estimate × (pending + 1)
//! per unit of weight in nanoseconds, `round_robin` and `random` look at no cost (the
//! chosen instance's effective weight is shown), `ring_hash` / `maglev` the request's
//! key hash. Left out: the zone and subset steps before the policy (the status view
//! shows zone shares).

use crate::config::Policy;

/// Candidates kept per request; further ones are counted in `more`.
pub const MAX_SEEN: usize = 8;

/// The candidates a pick looked at: (slot, cost), in the order it looked.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Trace {
    pub seen: [(u32, f64); MAX_SEEN],
    /// `peak_ewma` `hot_cold`: per entry of `seen`, (in flight, hot, in the fast band);
    /// `seen`'s cost is then the latency floor (NaN: no answer yet).
    pub marks: [Option<(i64, bool, bool)>; MAX_SEEN],
    pub len: usize,
    /// Candidates past `MAX_SEEN`.
    pub more: u32,
    /// The key hash of a hash policy (`None`: no key, a random point).
    pub hash: Option<u64>,
}

impl Trace {
    /// Records `slot` at `cost`; a slot seen again keeps its latest cost.
    pub fn note(&mut self, slot: u32, cost: f64) {
        if let Some(e) = self.seen[..self.len].iter_mut().find(|e| e.0 == slot) {
            e.1 = cost;
            return;
        }
        match self.seen.get_mut(self.len) {
            Some(e) => {
                *e = (slot, cost);
                self.len += 1;
            }
            None => self.more = self.more.saturating_add(1),
        }
    }

    /// Marks `slot` (already noted) with what `hot_cold` compared.
    pub fn mark(&mut self, slot: u32, in_flight: i64, hot: bool, in_band: bool) {
        if let Some(k) = self.seen[..self.len].iter().position(|e| e.0 == slot) {
            if let Some(m) = self.marks.get_mut(k) {
                *m = Some((in_flight, hot, in_band));
            }
        }
    }

    pub fn has(&self, slot: u32) -> bool {
        self.seen[..self.len].iter().any(|e| e.0 == slot)
    }

    pub fn seen(&self) -> &[(u32, f64)] {
        &self.seen[..self.len]
    }
}

/// What the costs of `policy` are.
pub fn cost_name(policy: Policy, bounded: bool) -> &'static str {
    match policy {
        Policy::LeastRequest => "in_flight",
        Policy::PeakEwma => "latency_ns_x_pending_per_weight",
        Policy::RoundRobin | Policy::Random => "weight",
        Policy::RingHash | Policy::Maglev if bounded => "in_flight",
        Policy::RingHash | Policy::Maglev => "weight",
    }
}

pub fn policy_name(policy: Policy) -> &'static str {
    match policy {
        Policy::RoundRobin => "round_robin",
        Policy::LeastRequest => "least_request",
        Policy::Random => "random",
        Policy::PeakEwma => "peak_ewma",
        Policy::RingHash => "ring_hash",
        Policy::Maglev => "maglev",
    }
}

/// One decision as header text, e.g.
/// `policy=least_request; chosen=10.0.0.2:80; cost=in_flight; candidates=10.0.0.2:80=0,10.0.0.7:80=3`.
/// `peak_ewma` with the `hot_cold` rule (`hot_cold` true) shows each candidate as
/// `latency_ns/in_flight` with `:hot` and `:band` when they apply (`new`: no answer
/// yet), e.g. `cost=hot_cold(latency_ns/in_flight); candidates=10.0.0.1:80=2100000/3:band,…`.
/// `addr(slot)` names a candidate; `flags` are appended (`panic`, `trial`, `shadow=…`).
pub fn header(
    policy: Policy,
    bounded: bool,
    hot_cold: bool,
    chosen: &str,
    trace: &Trace,
    addr: impl Fn(u32) -> Option<String>,
    flags: &[String],
) -> String {
    use std::fmt::Write;
    let mut s = format!(
        "policy={}; chosen={chosen}; cost={}; candidates=",
        policy_name(policy),
        if hot_cold {
            "hot_cold(latency_ns/in_flight)"
        } else {
            cost_name(policy, bounded)
        }
    );
    for (k, (slot, cost)) in trace.seen().iter().enumerate() {
        if k > 0 {
            s.push(',');
        }
        let a = addr(*slot).unwrap_or_else(|| format!("slot_{slot}"));
        if let Some(Some((in_flight, hot, band))) = trace.marks.get(k).filter(|_| hot_cold) {
            if cost.is_nan() {
                let _ = write!(s, "{a}=new/{in_flight}");
            } else {
                let _ = write!(s, "{a}={cost:.0}/{in_flight}");
            }
            if *hot {
                s.push_str(":hot");
            }
            if *band {
                s.push_str(":band");
            }
        } else if cost.fract() == 0.0 && cost.abs() < 1e15 {
            let _ = write!(s, "{a}={}", *cost as i64);
        } else {
            let _ = write!(s, "{a}={cost:.0}");
        }
    }
    if trace.more > 0 {
        let _ = write!(s, ",+{}", trace.more);
    }
    if let Some(h) = trace.hash {
        let _ = write!(s, "; hash={h:016x}");
    }
    for f in flags {
        let _ = write!(s, "; {f}");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use wasm_bindgen_test::wasm_bindgen_test;

    #[wasm_bindgen_test(unsupported = test)]
    fn trace_keeps_eight_counts_the_rest_and_updates_repeats() {
        let mut t = Trace::default();
        for s in 0..10u32 {
            t.note(s, f64::from(s));
        }
        t.note(3, 30.0);
        assert_eq!(t.len, MAX_SEEN);
        assert_eq!(t.more, 2);
        assert_eq!(t.seen()[3], (3, 30.0));
        assert!(t.has(7) && !t.has(8));
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn header_names_policy_chosen_and_every_candidate_cost() {
        let mut t = Trace::default();
        t.note(0, 2.0);
        t.note(4, 0.0);
        let h = header(
            Policy::LeastRequest,
            false,
            false,
            "10.0.0.5:80",
            &t,
            |s| Some(format!("10.0.0.{}:80", s + 1)),
            &["panic".to_string()],
        );
        assert_eq!(
            h,
            "policy=least_request; chosen=10.0.0.5:80; cost=in_flight; candidates=10.0.0.1:80=2,10.0.0.5:80=0; panic"
        );
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn hot_cold_header_shows_latency_in_flight_hot_and_band() {
        let mut t = Trace::default();
        t.note(0, 2_100_000.0);
        t.mark(0, 3, false, true);
        t.note(1, 52_000_000.0);
        t.mark(1, 0, false, false);
        t.note(2, f64::NAN);
        t.mark(2, 9, true, true);
        t.mark(7, 1, true, true); // never noted: ignored
        let h = header(
            Policy::PeakEwma,
            false,
            true,
            "10.0.0.1:80",
            &t,
            |s| Some(format!("10.0.0.{}:80", s + 1)),
            &[],
        );
        assert_eq!(
            h,
            "policy=peak_ewma; chosen=10.0.0.1:80; cost=hot_cold(latency_ns/in_flight); candidates=10.0.0.1:80=2100000/3:band,10.0.0.2:80=52000000/0,10.0.0.3:80=new/9:hot:band"
        );
        // The `cost` rule keeps the single cost per weight.
        let h = header(
            Policy::PeakEwma,
            false,
            false,
            "10.0.0.1:80",
            &t,
            |s| Some(format!("10.0.0.{}:80", s + 1)),
            &[],
        );
        assert!(
            h.contains("cost=latency_ns_x_pending_per_weight; candidates=10.0.0.1:80=2100000,"),
            "{h}"
        );
    }
}
