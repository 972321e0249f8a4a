//! Consistent hashing with bounded loads, over `ring_hash` or `maglev`.
//!
//! Reference: V. Mirrokni, M. Thorup, M. Zadimoghaddam, "Consistent Hashing with
//! Bounded Loads" (SODA 2018), as Envoy applies it with `hash_balance_factor`.
//! With L requests in flight in total and the new one making L + 1, endpoint i may
//! hold at most
//!
//! ```text
//! cap_i = max(1, ⌈c · (L + 1) · w_i / Σw⌉)      (= ⌈c · (L + 1) / n⌉ for equal weights)
//! ```
//!
//! where c = `balance_factor_percent` / 100 (Envoy's `hash_balance_factor`, ≥ 100;
//! e.g. 125). The request goes to the first endpoint of its hash-ordered preference
//! walk whose in-flight load is below its cap, so after the pick it carries at most
//! cap_i. The walk is the consistent-hash order: the ring's next entries
//! ([`RingHash::walk`](super::ring_hash::RingHash::walk)) or Maglev's rehash per attempt
//! ([`Maglev::walk`](super::maglev::Maglev::walk)). Keys therefore stay on their
//! endpoint until it is full, and spill to the same next choices every time.
//!
//! Always a pick when any endpoint exists: Σ cap_i ≥ c·(L + 1) > L, so some endpoint
//! is below its cap. The walk is tried for up to `2n + 16` steps; if it has not
//! found one (long runs of full endpoints), endpoints are scanned in index order
//! starting from the walk's first choice; if the loads given are inconsistent with L
//! and all are full, the one with the lowest load/cap ratio wins. Everything is
//! deterministic: no randomness, integer arithmetic only.
//!
//! Left out: Envoy's random-jump probing (it follows the paper's order instead; the
//! jump avoids cascades on a ring, the Maglev walk already jumps).

#[derive(Debug, Clone, Default)]
pub struct BoundedLoad {
    weights: Vec<u32>,
    total_weight: u64,
    balance_factor_percent: u32,
}

/// A common choice: 25% above the average.
pub const DEFAULT_BALANCE_FACTOR_PERCENT: u32 = 125;

impl BoundedLoad {
    /// `weights[i]` of endpoint i (0 counts as 1); `balance_factor_percent` is kept
    /// within 100..=10,000.
    pub fn new(weights: &[u32], balance_factor_percent: u32) -> BoundedLoad {
        let weights: Vec<u32> = weights.iter().map(|&w| w.max(1)).collect();
        let total_weight = weights.iter().map(|&w| u64::from(w)).sum();
        BoundedLoad {
            weights,
            total_weight,
            balance_factor_percent: balance_factor_percent.clamp(100, 10_000),
        }
    }

    pub fn len(&self) -> usize {
        self.weights.len()
    }

    pub fn is_empty(&self) -> bool {
        self.weights.is_empty()
    }

    /// cap_i for a new request when `total_load` are already in flight.
    pub fn capacity(&self, i: usize, total_load: u64) -> u64 {
        let Some(&w) = self.weights.get(i) else {
            return 0;
        };
        let num =
            u128::from(self.balance_factor_percent) * (u128::from(total_load) + 1) * u128::from(w);
        let den = 100 * u128::from(self.total_weight.max(1));
        u64::try_from(num.div_ceil(den)).unwrap_or(u64::MAX).max(1)
    }

    /// The first endpoint of `walk` below its cap. `total_load` is the requests in
    /// flight over all endpoints (without this one), `load(i)` endpoint i's. Walk
    /// items out of range are skipped.
    pub fn pick(
        &self,
        walk: impl IntoIterator<Item = usize>,
        total_load: u64,
        mut load: impl FnMut(usize) -> u64,
    ) -> Option<usize> {
        let n = self.weights.len();
        if n == 0 {
            return None;
        }
        let mut first = None;
        let mut previous = usize::MAX;
        for i in walk.into_iter().take(2 * n + 16) {
            if i >= n || i == previous {
                continue;
            }
            previous = i;
            first.get_or_insert(i);
            if load(i) < self.capacity(i, total_load) {
                return Some(i);
            }
        }
        let start = first.unwrap_or(0);
        // Lowest load/cap ratio seen, compared as load_a·cap_b < load_b·cap_a.
        let mut best: Option<(usize, u128, u128)> = None;
        for k in 0..n {
            let i = (start + k) % n;
            let (l, c) = (load(i), self.capacity(i, total_load));
            if l < c {
                return Some(i);
            }
            let (l, c) = (u128::from(l), u128::from(c));
            if best.map_or(true, |(_, bl, bc)| l * bc < bl * c) {
                best = Some((i, l, c));
            }
        }
        best.map(|(i, _, _)| i)
    }
}

#[cfg(test)]
mod tests {
    use super::super::{maglev::Maglev, ring_hash::RingHash};
    use super::*;
    use crate::rng::{Rng, SplitMix64};
    use wasm_bindgen_test::wasm_bindgen_test;
    use xxhash_rust::xxh64::xxh64;

    fn hosts(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("10.1.0.{}:80", i + 1)).collect()
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn capacity_formula() {
        let b = BoundedLoad::new(&[1; 4], 125);
        // ceil(1.25 · 1 / 4) = 1, ceil(1.25 · 100 / 4) = 32 (31.25 rounded up).
        assert_eq!(b.capacity(0, 0), 1);
        assert_eq!(b.capacity(0, 99), 32);
        // Weighted: 1.5 · 10 · 3/4 = 11.25 → 12; 1.5 · 10 · 1/4 = 3.75 → 4.
        let b = BoundedLoad::new(&[3, 1], 150);
        assert_eq!(b.capacity(0, 9), 12);
        assert_eq!(b.capacity(1, 9), 4);
        assert_eq!(b.capacity(2, 9), 0);
        // A factor below 100% is raised to 100%.
        assert_eq!(BoundedLoad::new(&[1, 1], 50).capacity(0, 9), 5);
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn first_walk_entry_under_cap_wins() {
        let b = BoundedLoad::new(&[1; 4], 125);
        let load = [10u64, 10, 0, 0];
        // total 20 → cap ceil(1.25·21/4) = 7: 0 and 1 are full, 3 is next in the walk.
        assert_eq!(b.pick([0, 1, 3, 2], 20, |i| load[i]), Some(3));
        assert_eq!(b.pick([2, 0], 20, |i| load[i]), Some(2));
        // Walk exhausted on full endpoints: scan from the walk's first choice.
        assert_eq!(b.pick([1, 0, 1], 20, |i| load[i]), Some(2));
        // Inconsistent loads (all full for the given total): lowest load/cap wins.
        assert_eq!(b.pick([0], 0, |i| [5u64, 3, 9, 4][i]), Some(1));
        assert_eq!(BoundedLoad::new(&[], 125).pick([0], 0, |_| 0), None);
    }

    /// Requests that stay in flight: caps only grow, so no endpoint may ever exceed
    /// the cap of the current total.
    fn skewed_run(pick: impl Fn(u64, &BoundedLoad, u64, &[u64]) -> usize, n: usize) {
        let b = BoundedLoad::new(&vec![1; n], 125);
        let mut rng = SplitMix64(17);
        let mut load = vec![0u64; n];
        let mut total = 0u64;
        for _ in 0..5_000 {
            // 70% of requests carry one hot key, the rest 20 warm keys.
            let key = if rng.below(10) < 7 {
                0
            } else {
                1 + rng.below(20)
            };
            let h = xxh64(&key.to_le_bytes(), 0);
            let i = pick(h, &b, total, &load);
            assert!(load[i] < b.capacity(i, total), "picked a full endpoint");
            load[i] += 1;
            total += 1;
            let cap_now = b.capacity(0, total - 1);
            assert!(
                load.iter().all(|&l| l <= cap_now),
                "over cap {cap_now}: {load:?}"
            );
        }
        let max = *load.iter().max().unwrap();
        assert!(max <= (5_000u64 * 125 / 100).div_ceil(n as u64), "{load:?}");
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn ring_walk_keeps_every_endpoint_under_the_cap_with_skewed_keys() {
        let n = 8;
        let ring = RingHash::new(&hosts(n), &vec![1; n], 1024, 1 << 20);
        skewed_run(
            |h, b, total, load| b.pick(ring.walk(h), total, |i| load[i]).unwrap(),
            n,
        );
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn maglev_walk_keeps_every_endpoint_under_the_cap_with_skewed_keys() {
        let n = 8;
        let m = Maglev::new(&hosts(n), &vec![1; n], 65_537);
        skewed_run(
            |h, b, total, load| b.pick(m.walk(h), total, |i| load[i]).unwrap(),
            n,
        );
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn light_load_keeps_keys_on_their_hash_choice() {
        let n = 10;
        let ring = RingHash::new(&hosts(n), &vec![1; n], 1024, 1 << 20);
        let b = BoundedLoad::new(&vec![1; n], 125);
        let load = vec![3u64; n];
        for k in 0..500u64 {
            let h = xxh64(&k.to_le_bytes(), 0);
            assert_eq!(b.pick(ring.walk(h), 30, |i| load[i]), ring.pick(h));
        }
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn completions_and_arrivals_keep_the_chosen_endpoint_under_its_cap() {
        // Requests finish at random; each pick still lands below its cap.
        let n = 6;
        let m = Maglev::new(&hosts(n), &[1, 1, 2, 2, 3, 3], 65_537);
        let b = BoundedLoad::new(&[1, 1, 2, 2, 3, 3], 150);
        let mut rng = SplitMix64(5);
        let mut load = vec![0u64; n];
        let mut inflight: Vec<usize> = Vec::new();
        for _ in 0..20_000 {
            if !inflight.is_empty() && rng.below(2) == 0 {
                let j = rng.below(inflight.len() as u64) as usize;
                load[inflight.swap_remove(j)] -= 1;
            }
            let key = if rng.below(2) == 0 {
                42
            } else {
                rng.below(1000)
            };
            let h = xxh64(&key.to_le_bytes(), 0);
            let total = inflight.len() as u64;
            let i = b.pick(m.walk(h), total, |i| load[i]).unwrap();
            assert!(load[i] < b.capacity(i, total));
            load[i] += 1;
            inflight.push(i);
        }
    }
}
