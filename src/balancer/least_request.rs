//! `least_request`: weighted power of two choices over in-flight requests.
//!
//! Reference: M. Mitzenmacher, "The Power of Two Choices in Randomized Load
//! Balancing" (2001), and Envoy's `least_request` policy (P2C with
//! `choice_count: 2`). Two candidates are drawn (with replacement) with probability
//! proportional to their weight; the one with fewer requests in flight per unit of
//! weight wins (weighted least connections), a tie is broken at random — so with no
//! load the split equals the weights, and under load slow instances (whose requests
//! pile up) are avoided.
//!
//! Unlike Envoy's, the in-flight counts are shared by all workers of an Envoy (the
//! host layer reads them from global gauges), so one worker sees the load the others
//! put on an instance. Left out: Envoy's `active_request_bias` exponent.

use super::weighted_sampler::WeightedSampler;
use crate::rng::Rng;

#[derive(Debug, Clone, Default)]
pub struct LeastRequest {
    sampler: WeightedSampler,
    weights: Vec<u32>,
}

impl LeastRequest {
    pub fn new(weights: &[u32]) -> LeastRequest {
        LeastRequest { sampler: WeightedSampler::new(weights), weights: weights.iter().map(|&w| w.max(1)).collect() }
    }

    /// Picks an index; `active(i)` returns instance i's requests in flight.
    pub fn pick(&self, rng: &mut impl Rng, mut active: impl FnMut(usize) -> i64) -> Option<usize> {
        let a = self.sampler.sample(rng)?;
        if self.sampler.len() == 1 {
            return Some(a);
        }
        // The second draw may repeat the first (sampling with replacement, as
        // Envoy does): forcing two distinct candidates would skew the split away
        // from the weights when there are few instances.
        let b = self.sampler.sample(rng)?;
        if a == b {
            return Some(a);
        }
        // Compare load per unit of weight: active_a / w_a against active_b / w_b.
        let (la, lb) = (active(a).max(0) as i128, active(b).max(0) as i128);
        let w = |i: usize| i128::from(self.weights.get(i).copied().unwrap_or(1));
        let (wa, wb) = (w(a), w(b));
        Some(match (la * wb).cmp(&(lb * wa)) {
            std::cmp::Ordering::Less => a,
            std::cmp::Ordering::Greater => b,
            std::cmp::Ordering::Equal => {
                if rng.next_u64() & 1 == 0 {
                    a
                } else {
                    b
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SplitMix64;
    use wasm_bindgen_test::wasm_bindgen_test;

    #[wasm_bindgen_test(unsupported = test)]
    fn without_load_the_split_follows_weights() {
        let lr = LeastRequest::new(&[3, 1]);
        let mut r = SplitMix64(5);
        let mut c = [0u32; 2];
        for _ in 0..20_000 {
            c[lr.pick(&mut r, |_| 0).unwrap()] += 1;
        }
        assert!((14_500..15_500).contains(&c[0]), "{c:?}");
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn a_loaded_instance_is_avoided() {
        let lr = LeastRequest::new(&[1, 1, 1, 1]);
        let mut r = SplitMix64(8);
        let load = [50i64, 0, 0, 0];
        let mut c = [0u32; 4];
        for _ in 0..4000 {
            c[lr.pick(&mut r, |i| load[i]).unwrap()] += 1;
        }
        // Instance 0 wins only when both draws are instance 0: 1/16 of the time.
        assert!((150..360).contains(&c[0]), "{c:?}");
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn simulated_slow_instance_gets_less() {
        // Requests finish after `latency` picks; instance 0 is 10x slower.
        let lr = LeastRequest::new(&[1, 1, 1]);
        let mut r = SplitMix64(2);
        let latency = [20usize, 2, 2];
        let mut active = [0i64; 3];
        let mut finishing: Vec<Vec<usize>> = vec![Vec::new(); 64];
        let mut c = [0u32; 3];
        for t in 0..3000 {
            for i in std::mem::take(&mut finishing[t % 64]) {
                active[i] -= 1;
            }
            let i = lr.pick(&mut r, |i| active[i]).unwrap();
            c[i] += 1;
            active[i] += 1;
            finishing[(t + latency[i]) % 64].push(i);
        }
        assert!(c[0] < c[1] / 2 && c[0] < c[2] / 2, "{c:?}");
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn single_and_empty() {
        let mut r = SplitMix64(1);
        assert_eq!(LeastRequest::new(&[4]).pick(&mut r, |_| 9), Some(0));
        assert_eq!(LeastRequest::new(&[]).pick(&mut r, |_| 0), None);
    }
}
