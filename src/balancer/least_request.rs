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
    choices: u32,
}

impl LeastRequest {
    /// `choices` candidates per pick (Envoy's `choice_count`, at least 2).
    pub fn new(weights: &[u32], choices: u32) -> LeastRequest {
        LeastRequest {
            sampler: WeightedSampler::new(weights),
            weights: weights.iter().map(|&w| w.max(1)).collect(),
            choices: choices.max(2),
        }
    }

    /// Picks an index; `active(i)` returns instance i's requests in flight.
    ///
    /// Candidates are drawn with replacement, as Envoy does: forcing distinct ones
    /// would skew the split away from the weights when there are few instances.
    pub fn pick(&self, rng: &mut impl Rng, mut active: impl FnMut(usize) -> i64) -> Option<usize> {
        let first = self.sampler.sample(rng)?;
        if self.sampler.len() == 1 {
            return Some(first);
        }
        let w = |i: usize| i128::from(self.weights.get(i).copied().unwrap_or(1));
        let mut best = first;
        let mut best_load = i128::from(active(first).max(0));
        let mut ties = 1u64;
        for _ in 1..self.choices {
            let c = self.sampler.sample(rng)?;
            if c == best {
                continue;
            }
            let load = i128::from(active(c).max(0));
            // Compare load per unit of weight: load_c / w_c against best_load / w_best.
            match (load * w(best)).cmp(&(best_load * w(c))) {
                std::cmp::Ordering::Less => {
                    best = c;
                    best_load = load;
                    ties = 1;
                }
                std::cmp::Ordering::Equal => {
                    // Uniform among equals (reservoir sampling).
                    ties += 1;
                    if rng.below(ties) == 0 {
                        best = c;
                        best_load = load;
                    }
                }
                std::cmp::Ordering::Greater => {}
            }
        }
        Some(best)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SplitMix64;
    use wasm_bindgen_test::wasm_bindgen_test;

    #[wasm_bindgen_test(unsupported = test)]
    fn without_load_the_split_follows_weights() {
        let lr = LeastRequest::new(&[3, 1], 2);
        let mut r = SplitMix64(5);
        let mut c = [0u32; 2];
        for _ in 0..20_000 {
            c[lr.pick(&mut r, |_| 0).unwrap()] += 1;
        }
        assert!((14_500..15_500).contains(&c[0]), "{c:?}");
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn a_loaded_instance_is_avoided() {
        let lr = LeastRequest::new(&[1, 1, 1, 1], 2);
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
        let lr = LeastRequest::new(&[1, 1, 1], 2);
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
    fn more_choices_avoid_a_loaded_instance_more() {
        let mut r = SplitMix64(8);
        let load = [50i64, 0, 0];
        let count = |choices: u32, r: &mut SplitMix64| {
            let lr = LeastRequest::new(&[1, 1, 1], choices);
            (0..9000)
                .filter(|_| lr.pick(r, |i| load[i]) == Some(0))
                .count()
        };
        let two = count(2, &mut r);
        let three = count(3, &mut r);
        // Picked only when every draw is it: (1/3)^2 and (1/3)^3 of the time.
        assert!((800..1200).contains(&two), "{two}");
        assert!((220..450).contains(&three), "{three}");
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn single_and_empty() {
        let mut r = SplitMix64(1);
        assert_eq!(LeastRequest::new(&[4], 2).pick(&mut r, |_| 9), Some(0));
        assert_eq!(LeastRequest::new(&[], 2).pick(&mut r, |_| 0), None);
    }
}
