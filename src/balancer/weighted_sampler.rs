//! Weighted random choice in O(1): Vose's alias method (M. D. Vose, "A linear
//! algorithm for generating random numbers with a given distribution", 1991), in
//! integer arithmetic only, so a table built natively and one built inside Envoy's
//! wasm engine draw identically. P(i) = w_i / Σw exactly.

use crate::rng::Rng;

#[derive(Debug, Clone, Default)]
pub struct WeightedSampler {
    /// Threshold of column i, in units where Σw is a whole column.
    threshold: Vec<u64>,
    alias: Vec<u32>,
    total: u64,
}

impl WeightedSampler {
    pub fn new(weights: &[u32]) -> WeightedSampler {
        let n = weights.len();
        if n == 0 {
            return WeightedSampler::default();
        }
        let total: u64 = weights.iter().map(|&w| u64::from(w)).sum();
        // Scaled so one column holds exactly `total`: p_i = w_i * n.
        let mut p: Vec<u64> = weights.iter().map(|&w| u64::from(w) * n as u64).collect();
        let mut threshold = vec![total; n];
        let mut alias: Vec<u32> = (0..n as u32).collect();
        let (mut small, mut large): (Vec<usize>, Vec<usize>) = (0..n).partition(|&i| p[i] < total);
        while let (Some(s), Some(&l)) = (small.pop(), large.last()) {
            threshold[s] = p[s];
            alias[s] = l as u32;
            p[l] -= total - p[s];
            if p[l] < total {
                large.pop();
                small.push(l);
            }
        }
        WeightedSampler {
            threshold,
            alias,
            total: total.max(1),
        }
    }

    pub fn len(&self) -> usize {
        self.threshold.len()
    }

    pub fn is_empty(&self) -> bool {
        self.threshold.is_empty()
    }

    /// Two distinct indexes, each drawn in proportion to weight (the second by
    /// rejection, a few tries, then uniformly among the others so a dominant weight
    /// cannot make it loop). `None` for the second when there is one index.
    pub fn sample_pair(&self, rng: &mut impl Rng) -> Option<(usize, Option<usize>)> {
        const DISTINCT_TRIES: u32 = 4;
        let n = self.threshold.len();
        let a = self.sample(rng)?;
        if n == 1 {
            return Some((a, None));
        }
        for _ in 0..DISTINCT_TRIES {
            let b = self.sample(rng)?;
            if b != a {
                return Some((a, Some(b)));
            }
        }
        Some((a, Some((a + 1 + rng.below(n as u64 - 1) as usize) % n)))
    }

    /// Up to `out.len()` distinct indexes, each drawn in proportion to weight (by
    /// rejection, a few tries per draw, then the next unused index after a uniform
    /// one, so a dominant weight cannot make it loop); all of them, in index order,
    /// when there are no more than that. Returns how many were written.
    pub fn sample_distinct(&self, rng: &mut impl Rng, out: &mut [usize]) -> usize {
        const DISTINCT_TRIES: u32 = 4;
        let n = self.threshold.len();
        if n <= out.len() {
            for (i, o) in out.iter_mut().take(n).enumerate() {
                *o = i;
            }
            return n;
        }
        let mut len = 0;
        while len < out.len() {
            let taken = |i: usize, out: &[usize]| out.iter().take(len).any(|&x| x == i);
            let mut got = None;
            for _ in 0..DISTINCT_TRIES {
                match self.sample(rng) {
                    Some(i) if !taken(i, out) => {
                        got = Some(i);
                        break;
                    }
                    Some(_) => {}
                    None => return len,
                }
            }
            let i = match got {
                Some(i) => i,
                None => {
                    let mut i = rng.below(n as u64) as usize;
                    while taken(i, out) {
                        i = (i + 1) % n;
                    }
                    i
                }
            };
            if let Some(o) = out.get_mut(len) {
                *o = i;
            }
            len += 1;
        }
        len
    }

    pub fn sample(&self, rng: &mut impl Rng) -> Option<usize> {
        let n = self.threshold.len();
        if n == 0 {
            return None;
        }
        let col = rng.below(n as u64) as usize;
        let r = rng.below(self.total);
        if r < self.threshold[col] {
            Some(col)
        } else {
            self.alias.get(col).map(|&a| a as usize)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SplitMix64;
    use wasm_bindgen_test::wasm_bindgen_test;

    /// The table's exact distribution: column mass plus alias mass, per index.
    fn exact(ws: &WeightedSampler) -> Vec<u64> {
        let mut mass = vec![0u64; ws.len()];
        for col in 0..ws.len() {
            mass[col] += ws.threshold[col];
            mass[ws.alias[col] as usize] += ws.total - ws.threshold[col];
        }
        mass
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn table_is_exactly_proportional() {
        for weights in [
            vec![5u32, 1, 1],
            vec![1, 2, 3, 4, 5, 6, 7],
            vec![100_000, 1],
            vec![7],
            vec![3, 3, 3],
        ] {
            let ws = WeightedSampler::new(&weights);
            let n = weights.len() as u64;
            let mass = exact(&ws);
            for (i, &w) in weights.iter().enumerate() {
                assert_eq!(mass[i], u64::from(w) * n, "weights {weights:?} index {i}");
            }
        }
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn distinct_samples_are_distinct_and_follow_weights() {
        let ws = WeightedSampler::new(&[6, 3, 1, 1, 1]);
        let mut r = SplitMix64(5);
        let mut first = [0u32; 5];
        let mut seen = [0u32; 5];
        let mut out = [0usize; 3];
        for _ in 0..10_000 {
            assert_eq!(ws.sample_distinct(&mut r, &mut out), 3);
            assert!(
                out[0] != out[1] && out[1] != out[2] && out[0] != out[2],
                "{out:?}"
            );
            first[out[0]] += 1;
            for &i in &out {
                seen[i] += 1;
            }
        }
        // The first draw is plain weighted; every index shows up in some triples.
        assert!((4_700..5_300).contains(&first[0]), "{first:?}");
        assert!(seen.iter().all(|&c| c > 1_000), "{seen:?}");
        // A dominant weight still yields distinct others; few indexes: all of them.
        let ws = WeightedSampler::new(&[1_000_000, 1, 1, 1]);
        assert_eq!(ws.sample_distinct(&mut r, &mut out), 3);
        assert!(
            out[0] != out[1] && out[1] != out[2] && out[0] != out[2],
            "{out:?}"
        );
        let mut four = [9usize; 4];
        assert_eq!(ws.sample_distinct(&mut r, &mut four), 4);
        assert_eq!(four, [0, 1, 2, 3]);
        assert_eq!(
            WeightedSampler::new(&[]).sample_distinct(&mut r, &mut out),
            0
        );
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn samples_follow_weights() {
        let ws = WeightedSampler::new(&[6, 3, 1]);
        let mut r = SplitMix64(11);
        let mut c = [0u32; 3];
        for _ in 0..20_000 {
            c[ws.sample(&mut r).unwrap()] += 1;
        }
        assert!((11_500..12_500).contains(&c[0]), "{c:?}");
        assert!((5_600..6_400).contains(&c[1]), "{c:?}");
        assert!((1_700..2_300).contains(&c[2]), "{c:?}");
        assert_eq!(WeightedSampler::new(&[]).sample(&mut r), None);
    }
}
