//! `random`: weighted random choice, P(i) = w_i / Σw.
//!
//! Reference: Envoy's `random` load balancing policy, which picks uniformly at random
//! (and in proportion to weight when weights differ). Draws go through
//! [`WeightedSampler`] (Vose's alias method, integer only), so a pick costs O(1)
//! whatever the weights; when every weight is equal one draw of `below(n)` is used,
//! which is uniform and saves the second draw of the alias table. With no memory
//! between picks it suits many independent workers: nothing to keep in step. Left
//! out: Envoy's locality weighting and panic threshold (the host layer decides what
//! is routable).

use super::weighted_sampler::WeightedSampler;
use crate::rng::Rng;

#[derive(Debug, Clone, Default)]
pub struct Random {
    n: usize,
    /// `None` when all weights are equal: a plain uniform draw.
    sampler: Option<WeightedSampler>,
}

impl Random {
    pub fn new(weights: &[u32]) -> Random {
        let n = weights.len();
        let uniform = weights.windows(2).all(|w| w.first() == w.last());
        let sampler = if uniform {
            None
        } else {
            Some(WeightedSampler::new(weights))
        };
        Random { n, sampler }
    }

    pub fn len(&self) -> usize {
        self.n
    }

    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    /// Index of a random instance, `None` when there is none.
    pub fn pick(&self, rng: &mut impl Rng) -> Option<usize> {
        if self.n == 0 {
            return None;
        }
        match &self.sampler {
            None => Some(rng.below(self.n as u64) as usize),
            Some(s) => s.sample(rng),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SplitMix64;
    use wasm_bindgen_test::wasm_bindgen_test;

    #[wasm_bindgen_test(unsupported = test)]
    fn exact_sequence_for_a_fixed_seed() {
        // Pinned: the draws are integer-only, so every target gives this sequence.
        let r = Random::new(&[1, 1, 1, 1]);
        let mut rng = SplitMix64(42);
        let seq: Vec<usize> = (0..12).map(|_| r.pick(&mut rng).unwrap()).collect();
        assert_eq!(seq, PINNED_UNIFORM);
        let r = Random::new(&[5, 1, 1]);
        let mut rng = SplitMix64(42);
        let seq: Vec<usize> = (0..12).map(|_| r.pick(&mut rng).unwrap()).collect();
        assert_eq!(seq, PINNED_WEIGHTED);
    }
    const PINNED_UNIFORM: [usize; 12] = [2, 0, 1, 1, 0, 3, 0, 3, 1, 2, 0, 1];
    const PINNED_WEIGHTED: [usize; 12] = [2, 0, 0, 0, 0, 0, 0, 1, 0, 0, 2, 0];

    #[wasm_bindgen_test(unsupported = test)]
    fn equal_weights_are_uniform() {
        let r = Random::new(&[7, 7, 7, 7, 7]);
        let mut rng = SplitMix64(3);
        let mut c = [0u32; 5];
        for _ in 0..50_000 {
            c[r.pick(&mut rng).unwrap()] += 1;
        }
        assert!(c.iter().all(|&x| (9_500..10_500).contains(&x)), "{c:?}");
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn shares_follow_weights() {
        let r = Random::new(&[6, 3, 1]);
        let mut rng = SplitMix64(9);
        let mut c = [0u32; 3];
        for _ in 0..50_000 {
            c[r.pick(&mut rng).unwrap()] += 1;
        }
        assert!((29_300..30_700).contains(&c[0]), "{c:?}");
        assert!((14_300..15_700).contains(&c[1]), "{c:?}");
        assert!((4_500..5_500).contains(&c[2]), "{c:?}");
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn single_and_empty() {
        let mut rng = SplitMix64(1);
        assert_eq!(Random::new(&[3]).pick(&mut rng), Some(0));
        assert_eq!(Random::new(&[]).pick(&mut rng), None);
        assert!(Random::new(&[]).is_empty());
    }
}
