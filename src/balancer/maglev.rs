//! `maglev`: consistent hashing through a Maglev lookup table.
//!
//! Reference: D. E. Eisenbud et al., "Maglev: A Fast and Reliable Software Network
//! Load Balancer" (NSDI 2016), pseudocode listing 1, with Envoy's `maglev` policy's
//! choices: table size 65537 by default (must be prime), hosts sorted by hash key
//! before the table is filled (so the input order does not matter), offset =
//! xxHash64(key, seed 0) mod M, skip = xxHash64(key, seed 1) mod (M − 1) + 1, and
//! weights by turns: in round r a host of weight w takes its k-th slot only once
//! r·w ≥ k·w_max, so slots are in proportion to weight. The turns are replayed in
//! the same order Envoy's loop gives them, from a heap keyed by (round, host), so a
//! skewed pool costs O(M log n) to build rather than O(M·n); all of it is u64
//! integer arithmetic (Envoy's weights are doubles), so native and wasm builds give
//! the same table.
//!
//! A pick is one table read, `table[hash mod M]`, reduced in u64 before it becomes an
//! index. When one of n equal hosts leaves, about 1/n of keys move, plus a little
//! more (the paper's "minimal disruption" is approximate). [`Maglev::walk`] gives a
//! deterministic probe sequence for bounded loads: the pick, then
//! `table[mix(hash, a) mod M]` for attempt a = 1, 2, … with a SplitMix64 finaliser.
//!
//! The table holds `u32` host indexes: 256 KiB at the default size. Choose M well
//! above n (the paper suggests M > 100·n) for an even split. Left out: Envoy's
//! compact bit-packed table, `use_hostname_for_hashing`, locality weighting.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use xxhash_rust::xxh64::xxh64;

/// Envoy's default `table_size`.
pub const DEFAULT_TABLE_SIZE: u64 = 65_537;
/// Envoy's upper bound for `table_size`; larger requests are clamped to it.
pub const MAX_TABLE_SIZE: u64 = 5_000_011;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Maglev {
    table: Vec<u32>,
    hosts: usize,
}

impl Maglev {
    /// Builds the table. `keys[i]` is host i's hash key (its `ip:port` text),
    /// `weights[i]` its weight (0 counts as 1); extra keys or weights are ignored.
    /// `table_size` is rounded up to a prime (and clamped to 2..=MAX_TABLE_SIZE);
    /// [`table_size`](Self::table_size) tells what was used.
    pub fn new<K: AsRef<[u8]>>(keys: &[K], weights: &[u32], table_size: u64) -> Maglev {
        let n = keys.len().min(weights.len());
        if n == 0 {
            return Maglev::default();
        }
        let m = next_prime(table_size.clamp(2, MAX_TABLE_SIZE));
        // Stable order: by key bytes, then by index for duplicate keys.
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by(|&a, &b| {
            let ka = keys.get(a).map(|k| k.as_ref()).unwrap_or_default();
            let kb = keys.get(b).map(|k| k.as_ref()).unwrap_or_default();
            ka.cmp(kb).then(a.cmp(&b))
        });
        struct Build {
            host: u32,
            pos: u64,
            skip: u64,
            weight: u64,
            count: u64,
        }
        let mut build: Vec<Build> = order
            .iter()
            .map(|&i| {
                let key = keys.get(i).map(|k| k.as_ref()).unwrap_or_default();
                Build {
                    host: i as u32,
                    pos: xxh64(key, 0) % m,
                    skip: xxh64(key, 1) % (m - 1) + 1,
                    weight: u64::from(weights.get(i).copied().unwrap_or(1).max(1)),
                    count: 0,
                }
            })
            .collect();
        let w_max = build.iter().map(|b| b.weight).max().unwrap_or(1);
        const EMPTY: u32 = u32::MAX;
        let mut table = vec![EMPTY; m as usize];
        // (round, position in sorted order): every host's first turn is in round 1.
        let mut turns: BinaryHeap<Reverse<(u64, usize)>> =
            (0..build.len()).map(|s| Reverse((1, s))).collect();
        let mut filled: u64 = 0;
        while filled < m {
            let Some(Reverse((_, s))) = turns.pop() else {
                break;
            };
            let Some(b) = build.get_mut(s) else { break };
            // The permutation (pos + k·skip) mod m visits every slot once: m is prime.
            let mut probes = 0;
            while table.get(b.pos as usize).is_some_and(|&t| t != EMPTY) && probes < m {
                b.pos = (b.pos + b.skip) % m;
                probes += 1;
            }
            if let Some(slot) = table.get_mut(b.pos as usize) {
                *slot = b.host;
            }
            b.pos = (b.pos + b.skip) % m;
            b.count += 1;
            filled += 1;
            // Next turn: the first round r ≥ 1 with r·w ≥ count·w_max.
            let next = (b.count * w_max).div_ceil(b.weight).max(1);
            turns.push(Reverse((next, s)));
        }
        Maglev { table, hosts: n }
    }

    /// Number of hosts the table was built for.
    pub fn hosts(&self) -> usize {
        self.hosts
    }

    /// The prime table size in use (0 when empty).
    pub fn table_size(&self) -> u64 {
        self.table.len() as u64
    }

    /// Host for `hash`: `table[hash mod M]`.
    pub fn pick(&self, hash: u64) -> Option<usize> {
        let m = self.table.len() as u64;
        if m == 0 {
            return None;
        }
        self.table.get((hash % m) as usize).map(|&h| h as usize)
    }

    /// Envoy's retry variant: attempt a > 0 looks up `hash XOR (2^64 − a)`.
    pub fn pick_attempt(&self, hash: u64, attempt: u32) -> Option<usize> {
        if attempt == 0 {
            return self.pick(hash);
        }
        self.pick(hash ^ u64::from(attempt).wrapping_neg())
    }

    /// Probe sequence for bounded loads: the pick, then one slot per attempt,
    /// `table[mix(hash, a) mod M]`. Endless and deterministic; hosts may repeat.
    pub fn walk(&self, hash: u64) -> impl Iterator<Item = usize> + '_ {
        let empty = self.table.is_empty();
        (0u64..)
            .take_while(move |_| !empty)
            .filter_map(move |a| self.pick(if a == 0 { hash } else { mix(hash, a) }))
    }

    /// Slots per host (Envoy's `min_entries_per_host`/`max_entries_per_host` stats).
    pub fn entries_per_host(&self) -> Vec<u32> {
        let mut c = vec![0u32; self.hosts];
        for &h in &self.table {
            if let Some(x) = c.get_mut(h as usize) {
                *x += 1;
            }
        }
        c
    }
}

/// SplitMix64's finaliser over hash + attempt·φ: a fresh, well-spread value per attempt.
fn mix(hash: u64, attempt: u64) -> u64 {
    let mut z = hash.wrapping_add(attempt.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// True when `n` is prime (trial division; n ≤ MAX_TABLE_SIZE in practice).
pub fn is_prime(n: u64) -> bool {
    if n < 2 {
        return false;
    }
    if n % 2 == 0 {
        return n == 2;
    }
    let mut d = 3u64;
    while d.saturating_mul(d) <= n {
        if n % d == 0 {
            return false;
        }
        d += 2;
    }
    true
}

/// The smallest prime ≥ `n`.
pub fn next_prime(n: u64) -> u64 {
    let mut p = n.max(2);
    while !is_prime(p) {
        p += 1;
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balancer::fixtures::{hosts, key_hash, without};
    use wasm_bindgen_test::wasm_bindgen_test;

    #[wasm_bindgen_test(unsupported = test)]
    fn primes() {
        assert!(is_prime(65_537) && is_prime(5_000_011) && is_prime(2) && is_prime(251));
        assert!(!is_prime(65_536) && !is_prime(1) && !is_prime(0) && !is_prime(9));
        assert_eq!(next_prime(65_536), 65_537);
        assert_eq!(next_prime(100), 101);
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn small_table_by_hand() {
        // M = 7 with three hosts: every slot filled, turns alternate by sorted key.
        let m = Maglev::new(&hosts(3), &[1, 1, 1], 7);
        assert_eq!(m.table_size(), 7);
        assert!(m.table.iter().all(|&h| h < 3));
        let e = m.entries_per_host();
        assert_eq!(e.iter().sum::<u32>(), 7);
        assert!(e.iter().all(|&c| (2..=3).contains(&c)), "{e:?}");
        assert_eq!(m.table, PINNED_SMALL_TABLE);
    }
    const PINNED_SMALL_TABLE: [u32; 7] = [1, 2, 1, 0, 2, 0, 0];

    #[wasm_bindgen_test(unsupported = test)]
    fn pinned_key_to_host_mappings() {
        let m = Maglev::new(&hosts(10), &[1; 10], DEFAULT_TABLE_SIZE);
        let got: Vec<usize> = (0..12).map(|k| m.pick(key_hash(k)).unwrap()).collect();
        assert_eq!(got, PINNED);
    }
    const PINNED: [usize; 12] = [2, 9, 0, 5, 8, 9, 0, 2, 3, 2, 0, 4];

    #[wasm_bindgen_test(unsupported = test)]
    fn entries_follow_weights() {
        let m = Maglev::new(&hosts(4), &[1, 1, 2, 4], DEFAULT_TABLE_SIZE);
        let e = m.entries_per_host();
        assert_eq!(e.iter().sum::<u32>() as u64, DEFAULT_TABLE_SIZE);
        // Shares 1/8, 1/8, 2/8, 4/8 of 65537, to within one turn.
        for (c, w) in e.iter().zip([1u32, 1, 2, 4]) {
            let want = 65_537 * w / 8;
            assert!(c.abs_diff(want) <= 4, "{e:?}");
        }
        // Equal weights: an even split.
        let e = Maglev::new(&hosts(10), &[3; 10], DEFAULT_TABLE_SIZE).entries_per_host();
        assert!(e.iter().all(|&c| (6553..=6554).contains(&c)), "{e:?}");
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn input_order_does_not_matter() {
        let keys = hosts(6);
        let a = Maglev::new(&keys, &[1, 2, 3, 4, 5, 6], 1009);
        let rev_keys: Vec<String> = keys.iter().rev().cloned().collect();
        let b = Maglev::new(&rev_keys, &[6, 5, 4, 3, 2, 1], 1009);
        for k in 0..2000 {
            let h = key_hash(k);
            assert_eq!(keys[a.pick(h).unwrap()], rev_keys[b.pick(h).unwrap()]);
        }
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn independent_builds_agree() {
        let a = Maglev::new(
            &hosts(100),
            &(1..=100).collect::<Vec<u32>>(),
            DEFAULT_TABLE_SIZE,
        );
        let b = Maglev::new(
            &hosts(100),
            &(1..=100).collect::<Vec<u32>>(),
            DEFAULT_TABLE_SIZE,
        );
        assert_eq!(a, b);
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn removing_one_of_n_moves_about_one_nth_of_keys() {
        let n = 10;
        let all = hosts(n);
        let before = Maglev::new(&all, &vec![1; n], DEFAULT_TABLE_SIZE);
        let gone = 6;
        let rest = without(&all, gone);
        let after = Maglev::new(&rest, &vec![1; n - 1], DEFAULT_TABLE_SIZE);
        let keys = 10_000;
        let mut moved = 0;
        for k in 0..keys {
            let h = key_hash(k);
            if all[before.pick(h).unwrap()] != rest[after.pick(h).unwrap()] {
                moved += 1;
            }
        }
        let frac = moved as f64 / keys as f64;
        assert!((0.08..0.16).contains(&frac), "moved {moved} of {keys}");
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn retry_attempts_and_walk() {
        let m = Maglev::new(&hosts(5), &[1; 5], 251);
        let h = key_hash(7);
        assert_eq!(m.pick_attempt(h, 0), m.pick(h));
        assert_eq!(m.pick_attempt(h, 1), m.pick(!h));
        let w: Vec<usize> = m.walk(h).take(64).collect();
        assert_eq!(Some(w[0]), m.pick(h));
        let mut seen = [false; 5];
        for &i in &w {
            seen[i] = true;
        }
        assert!(
            seen.iter().all(|&s| s),
            "the walk reaches every host: {w:?}"
        );
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn big_skewed_pool_builds_quickly() {
        // 10,000 hosts, one 100,000 times heavier: O(M log n) turns. Every host has a
        // turn in round 1; from then on only the heavy one until round 100,000.
        let mut w = vec![1u32; 10_000];
        w[0] = 100_000;
        let m = Maglev::new(&hosts(10_000), &w, DEFAULT_TABLE_SIZE);
        let e = m.entries_per_host();
        assert_eq!(e.iter().sum::<u32>() as u64, DEFAULT_TABLE_SIZE);
        assert_eq!(e[0], 65_537 - 9_999);
        assert!(e[1..].iter().all(|&c| c == 1));
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn empty() {
        let none: [&str; 0] = [];
        let m = Maglev::new(&none, &[], DEFAULT_TABLE_SIZE);
        assert_eq!(m.pick(3), None);
        assert_eq!(m.walk(3).next(), None);
        assert_eq!(m.table_size(), 0);
    }
}
