//! `peak_ewma`: power of two choices over a peak-sensitive moving average of latency.
//!
//! Reference: Finagle's `PeakEwma` load metric (Twitter, 2017), as ported by tower's
//! `load::peak_ewma` and used by Linkerd's `p2c` balancer. Each endpoint keeps
//! `{ewma_ns, stamp_ms, pending}`:
//!
//! - `observe(i, rtt, now)`: a latency above the estimate replaces it at once (the
//!   peak); a lower one is blended in as `ewma·d + rtt·(1 − d)` with
//!   `d = exp(−Δt/τ)`, Δt the time since the last observation, τ the decay window.
//! - cost of `i` now: `ewma · exp(−Δt/τ) · (pending + 1)`: as in Finagle and tower,
//!   the estimate decays toward zero while no response comes back, so an endpoint
//!   that was slow and is now avoided is tried again after a few τ instead of never.
//!   The read does not change the state (tower's does), so costs do not depend on
//!   how often they are read.
//! - `cheaper(a, b, rng, now)`: of two candidates, the one with the lower cost per
//!   unit of weight (`cost_a·w_b < cost_b·w_a`); exact ties are broken at random.
//!   The two distinct candidates are drawn in proportion to weight by the routing
//!   table (`picker`), from the alias table of the pool being picked in (all
//!   endpoints, a zone, a subset); this state is per endpoint of the table, fed
//!   by `Table::peak_start` / `Table::peak_end` as requests start and end.
//!
//! **No samples yet.** A new endpoint starts with `ewma = default_rtt` stamped at
//! its creation (tower's choice; Linkerd's defaults: 30 ms, τ = 10 s), and its first
//! response *replaces* the default rather than blending with it (tower blends, which
//! keeps a default above the real latency for about τ). It is not flooded: a default
//! above typical latencies makes it the expensive choice at first, and its cost
//! grows with `pending` like any other's. It is not starved: the default decays
//! toward zero like any estimate, so even if the others are much faster it wins pairs
//! within about τ·ln(default / their cost), and one answer makes it a peer.
//!
//! `exp` comes from [`crate::detmath`] (basic IEEE operations only), so costs and
//! picks are bit-identical natively and in wasm. Time is `now_ms`, latencies are
//! nanoseconds. Left out: Finagle's penalty for failed requests and its
//! `maxEffort` retries; tower's mutating read.

use crate::detmath;
use crate::rng::Rng;

/// Linkerd's defaults: 30 ms before the first response, 10 s decay window.
pub const DEFAULT_RTT_NS: u64 = 30_000_000;
pub const DEFAULT_DECAY_MS: u64 = 10_000;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EndpointState {
    /// Peak-EWMA latency estimate, nanoseconds.
    pub ewma_ns: f64,
    /// When the estimate was last updated.
    pub stamp_ms: u64,
    /// Requests started and not yet ended.
    pub pending: u32,
    /// False until the first response: `ewma_ns` is still the default.
    pub sampled: bool,
}

#[derive(Debug, Clone, Default)]
pub struct PeakEwma {
    weights: Vec<u32>,
    state: Vec<EndpointState>,
    decay_ms: u64,
}

impl PeakEwma {
    /// `decay_ms` is τ (raised to at least 1 ms); every endpoint starts at
    /// `default_rtt_ns`, stamped `now_ms`.
    pub fn new(weights: &[u32], decay_ms: u64, default_rtt_ns: u64, now_ms: u64) -> PeakEwma {
        let fresh = EndpointState {
            ewma_ns: default_rtt_ns as f64,
            stamp_ms: now_ms,
            pending: 0,
            sampled: false,
        };
        PeakEwma {
            weights: weights.iter().map(|&w| w.max(1)).collect(),
            state: vec![fresh; weights.len()],
            decay_ms: decay_ms.max(1),
        }
    }

    /// An endpoint's state, to carry it into a table rebuilt for a new snapshot.
    pub fn state(&self, i: usize) -> Option<EndpointState> {
        self.state.get(i).copied()
    }

    /// Replaces an endpoint's state (see [`state`](Self::state)).
    pub fn set_state(&mut self, i: usize, s: EndpointState) {
        if let Some(x) = self.state.get_mut(i) {
            *x = s;
        }
    }

    /// A request to `i` started.
    pub fn start(&mut self, i: usize) {
        if let Some(s) = self.state.get_mut(i) {
            s.pending = s.pending.saturating_add(1);
        }
    }

    /// A request to `i` ended (with or without a response).
    pub fn end(&mut self, i: usize) {
        if let Some(s) = self.state.get_mut(i) {
            s.pending = s.pending.saturating_sub(1);
        }
    }

    /// A response from `i` took `rtt_ns`.
    pub fn observe(&mut self, i: usize, rtt_ns: u64, now_ms: u64) {
        let decay_ms = self.decay_ms;
        let Some(s) = self.state.get_mut(i) else {
            return;
        };
        let rtt = rtt_ns as f64;
        if rtt > s.ewma_ns || !s.sampled {
            s.ewma_ns = rtt;
        } else {
            let d = decay(now_ms.saturating_sub(s.stamp_ms), decay_ms);
            s.ewma_ns = s.ewma_ns * d + rtt * (1.0 - d);
        }
        s.stamp_ms = s.stamp_ms.max(now_ms);
        s.sampled = true;
    }

    /// The cheaper per unit of weight of endpoints `a` and `b`
    /// (`cost_a·w_b < cost_b·w_a`); exact ties are broken at random.
    pub fn cheaper(&self, a: usize, b: usize, rng: &mut impl Rng, now_ms: u64) -> usize {
        let (Some(sa), Some(sb)) = (self.state.get(a), self.state.get(b)) else {
            return a;
        };
        let w = |i: usize| f64::from(self.weights.get(i).copied().unwrap_or(1));
        // Both estimates decay by exp(−elapsed/τ); the common factor
        // exp(−min elapsed/τ) cancels, so at most one exp per pick, of the
        // difference — none when the older estimate is already the cheaper one.
        let (ea, eb) = (
            now_ms.saturating_sub(sa.stamp_ms),
            now_ms.saturating_sub(sb.stamp_ms),
        );
        let mut ca = sa.ewma_ns * (f64::from(sa.pending) + 1.0) * w(b);
        let mut cb = sb.ewma_ns * (f64::from(sb.pending) + 1.0) * w(a);
        if ea > eb && ca >= cb {
            ca *= decay(ea - eb, self.decay_ms);
        } else if eb > ea && cb >= ca {
            cb *= decay(eb - ea, self.decay_ms);
        }
        if ca < cb {
            a
        } else if cb < ca {
            b
        } else if rng.below(2) == 0 {
            a
        } else {
            b
        }
    }

    /// For explanations (status view, decision header): endpoint `i`'s cost now per
    /// unit of weight, `ewma·exp(−Δt/τ)·(pending + 1) / w` in nanoseconds — the
    /// quantity [`cheaper`](Self::cheaper) compares — and its pending count.
    pub fn explain_cost(&self, i: usize, now_ms: u64) -> Option<(f64, u32)> {
        let s = self.state.get(i)?;
        let w = f64::from(self.weights.get(i).copied().unwrap_or(1));
        let d = decay(now_ms.saturating_sub(s.stamp_ms), self.decay_ms);
        Some((s.ewma_ns * d * (f64::from(s.pending) + 1.0) / w, s.pending))
    }
}

/// exp(−elapsed/τ), the weight left to the old estimate.
fn decay(elapsed_ms: u64, decay_ms: u64) -> f64 {
    if elapsed_ms == 0 {
        return 1.0;
    }
    detmath::exp(-(elapsed_ms as f64) / decay_ms as f64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balancer::weighted_sampler::WeightedSampler;
    use crate::rng::SplitMix64;
    use wasm_bindgen_test::wasm_bindgen_test;

    /// What the tests read and do besides the table's calls: the cost itself, and
    /// a pick over all endpoints the way `picker` does it (a weighted distinct pair
    /// from the alias table, then [`PeakEwma::cheaper`]).
    impl PeakEwma {
        /// Estimated latency of `i` now (decayed toward zero since the last response).
        fn estimate_ns(&self, i: usize, now_ms: u64) -> f64 {
            self.state
                .get(i)
                .map(|s| s.ewma_ns * decay(now_ms.saturating_sub(s.stamp_ms), self.decay_ms))
                .unwrap_or(f64::INFINITY)
        }

        /// Cost of sending one more request to `i`: estimate × (pending + 1).
        fn cost(&self, i: usize, now_ms: u64) -> f64 {
            let pending = self.state.get(i).map(|s| s.pending).unwrap_or(0);
            self.estimate_ns(i, now_ms) * (f64::from(pending) + 1.0)
        }

        /// Picks the cheaper (per unit of weight) of two distinct weighted draws.
        fn pick(&self, rng: &mut impl Rng, now_ms: u64) -> Option<usize> {
            match WeightedSampler::new(&self.weights).sample_pair(rng)? {
                (a, None) => Some(a),
                (a, Some(b)) => Some(self.cheaper(a, b, rng, now_ms)),
            }
        }
    }

    const MS: u64 = 1_000_000;

    fn near(a: f64, b: f64, tol: f64) -> bool {
        (a - b).abs() <= tol * b.abs().max(1.0)
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn default_rtt_decays_toward_zero() {
        // tower's `default_decay`: 10 ms default, τ = 1 s.
        let p = PeakEwma::new(&[1], 1_000, 10 * MS, 0);
        assert_eq!(p.cost(0, 0), 10.0 * MS as f64);
        let c = p.cost(0, 100);
        assert!(9.0 * MS as f64 <= c && c < 10.0 * MS as f64, "{c}");
        let c = p.cost(0, 200);
        assert!(8.0 * MS as f64 <= c && c < 9.0 * MS as f64, "{c}");
        assert!(near(
            p.cost(0, 1_000),
            10.0 * MS as f64 / std::f64::consts::E,
            1e-12
        ));
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn peaks_jump_and_lower_samples_blend() {
        let mut p = PeakEwma::new(&[1], 1_000, 10 * MS, 0);
        p.observe(0, 50 * MS, 10);
        assert_eq!(p.state(0).unwrap().ewma_ns, 50.0 * MS as f64);
        assert_eq!(p.state(0).unwrap().stamp_ms, 10);
        // τ·ln 2 later, a 10 ms sample: halfway, 30 ms.
        let half_life = (1_000.0 * std::f64::consts::LN_2).round() as u64;
        p.observe(0, 10 * MS, 10 + half_life);
        assert!(
            near(p.state(0).unwrap().ewma_ns, 30.0 * MS as f64, 1e-3),
            "{:?}",
            p.state(0)
        );
        // Immediately after, another low sample does not move it (Δt = 0).
        p.observe(0, MS, 10 + half_life);
        assert!(near(p.state(0).unwrap().ewma_ns, 30.0 * MS as f64, 1e-3));
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn cost_counts_pending_requests() {
        let mut p = PeakEwma::new(&[1, 1], 1_000, 10 * MS, 0);
        p.start(0);
        p.start(0);
        assert_eq!(p.cost(0, 0), 30.0 * MS as f64);
        p.end(0);
        p.end(0);
        p.end(0); // extra ends do not underflow
        assert_eq!(p.cost(0, 0), 10.0 * MS as f64);
        assert_eq!(p.cost(9, 0), f64::INFINITY);
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn two_endpoints_always_compare_both() {
        let mut p = PeakEwma::new(&[1, 1], 10_000, 10 * MS, 0);
        p.observe(1, 40 * MS, 0);
        let mut rng = SplitMix64(4);
        for _ in 0..200 {
            assert_eq!(p.pick(&mut rng, 0), Some(0));
        }
        // Even with a dominant weight the second candidate is the other endpoint.
        let mut p = PeakEwma::new(&[100_000, 1], 10_000, 10 * MS, 0);
        p.observe(0, 4_000_000 * MS, 0); // 40 ms per unit of weight
        assert!((0..200).all(|_| p.pick(&mut rng, 0) == Some(1)));
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn weight_divides_cost() {
        // Same latency: the weight-3 endpoint wins until its cost per weight is higher.
        let mut p = PeakEwma::new(&[3, 1], 10_000, 10 * MS, 0);
        let mut rng = SplitMix64(8);
        assert_eq!(p.pick(&mut rng, 0), Some(0));
        p.start(0);
        assert_eq!(p.pick(&mut rng, 0), Some(0)); // 20/3 < 10/1
        p.start(0);
        p.start(0);
        assert_eq!(p.pick(&mut rng, 0), Some(1)); // 40/3 > 10/1
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn pinned_pick_sequence() {
        let mut p = PeakEwma::new(&[1, 2, 3, 4], 1_000, 20 * MS, 0);
        p.observe(0, 5 * MS, 10);
        p.observe(1, 80 * MS, 10);
        p.observe(2, 15 * MS, 10);
        let mut rng = SplitMix64(99);
        let seq: Vec<usize> = (0..16)
            .map(|t| {
                let i = p.pick(&mut rng, 20 + t).unwrap();
                p.start(i);
                i
            })
            .collect();
        assert_eq!(seq, PINNED);
    }
    const PINNED: [usize; 16] = [3, 2, 2, 3, 0, 0, 3, 3, 2, 3, 3, 2, 2, 2, 3, 2];

    /// Discrete-time simulation: one request per ms from `from` to `to`, each
    /// taking `latency(i, t)` ms; `seen(t, i)` is told every pick.
    fn run(
        p: &mut PeakEwma,
        seed: u64,
        to: u64,
        latency: impl Fn(usize, u64) -> u64,
        mut seen: impl FnMut(u64, usize),
    ) {
        let mut rng = SplitMix64(seed);
        let mut finishing: Vec<Vec<(usize, u64)>> = vec![Vec::new(); 1024];
        for t in 0..to {
            for (i, sent) in std::mem::take(&mut finishing[(t % 1024) as usize]) {
                p.end(i);
                p.observe(i, (t - sent) * MS, t);
            }
            let i = p.pick(&mut rng, t).unwrap();
            p.start(i);
            finishing[((t + latency(i, t).min(1023)) % 1024) as usize].push((i, t));
            seen(t, i);
        }
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn avoids_a_slow_endpoint_and_comes_back_after_it_recovers() {
        // Endpoint 0 takes 200 ms until t = 20 s, then 5 ms like the others.
        let mut p = PeakEwma::new(&[1, 1, 1], 2_000, 30 * MS, 0);
        let (mut early, mut late) = ([0u32; 3], [0u32; 3]);
        let latency = |i: usize, t: u64| if i == 0 && t < 20_000 { 200 } else { 5 };
        run(&mut p, 12, 60_000, latency, |t, i| {
            if (2_000..20_000).contains(&t) {
                early[i] += 1;
            } else if t >= 50_000 {
                late[i] += 1;
            }
        });
        // While 40x slower, endpoint 0 gets a small fraction of the traffic.
        assert!(
            early[0] * 10 < early[1] && early[0] * 10 < early[2],
            "{early:?}"
        );
        // After recovery its estimate decays back and it gets its third again.
        let total: u32 = late.iter().sum();
        assert!(late.iter().all(|&c| c * 4 > total), "{late:?}");
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn a_new_endpoint_is_neither_flooded_nor_starved() {
        // Two warm endpoints at 5 ms; a third starts with the default 30 ms.
        let mut p = PeakEwma::new(&[1, 1, 1], 2_000, 30 * MS, 0);
        p.observe(0, 5 * MS, 0);
        p.observe(1, 5 * MS, 0);
        assert_eq!(
            p.estimate_ns(0, 0),
            5.0 * MS as f64,
            "the first sample replaces the default"
        );
        let mut first = None;
        let mut late = [0u32; 3];
        run(
            &mut p,
            21,
            20_000,
            |_, _| 5,
            |t, i| {
                if i == 2 && first.is_none() {
                    first = Some(t);
                }
                if t >= 15_000 {
                    late[i] += 1;
                }
            },
        );
        // Not flooded: at first it is the most expensive and gets nothing. Not
        // starved: its default decays below the warm ones' cost (5 ms × pending)
        // within about τ·ln(30/15) ≈ 1.4 s, and from its first answer it is a peer.
        let first = first.unwrap();
        assert!((200..3_000).contains(&first), "first pick at {first} ms");
        assert!(late.iter().all(|&c| c * 4 > 5_000), "{late:?}");
        // And a new endpoint with requests already pending loses to idle ones.
        let mut q = PeakEwma::new(&[1, 1, 1], 2_000, 30 * MS, 0);
        q.observe(0, 5 * MS, 0);
        q.observe(1, 5 * MS, 0);
        q.start(2);
        let mut rng = SplitMix64(3);
        assert!((0..100).all(|_| q.pick(&mut rng, 0) != Some(2)));
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn single_and_empty() {
        let mut rng = SplitMix64(1);
        assert_eq!(PeakEwma::new(&[2], 1_000, MS, 0).pick(&mut rng, 5), Some(0));
        assert_eq!(PeakEwma::new(&[], 1_000, MS, 0).pick(&mut rng, 5), None);
    }
}
