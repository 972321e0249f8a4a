//! `ring_hash`: consistent hashing on a Ketama-style ring.
//!
//! Reference: D. Karger et al., "Consistent Hashing and Random Trees" (STOC 1997),
//! libketama's ring and lookup, and Envoy's `ring_hash` policy, whose construction
//! this follows: every host puts `key_0`, `key_1`, … on the ring (its hash key — the
//! `ip:port` text — plus `_` and a counter), hashed with **xxHash64, seed 0** (Envoy's
//! default `hash_function: XX_HASH`; the `xxhash-rust` crate, `xxh64` only). The number
//! of entries follows Envoy's `minimum_ring_size` / `maximum_ring_size`: the lightest
//! host gets a whole number of entries, enough for the ring to reach
//! `minimum_ring_size`; heavier hosts get entries in proportion to weight through
//! running sums; the ring is capped at `maximum_ring_size` (then the scale is
//! `maximum_ring_size` exactly, as Envoy's). The sums are exact rationals in integer
//! arithmetic (Envoy uses doubles), so a ring built natively and one built inside a
//! wasm engine are identical.
//!
//! One deliberate difference: the lightest host's entry count, ⌈min_ring · w_min/Σw⌉
//! in Envoy, is rounded **up to a power of two** (so the ring holds between 1× and 2×
//! `minimum_ring_size`, still capped by the maximum). In Envoy every host's count
//! changes whenever a host joins or leaves (1024/10 → 103 each, 1024/9 → 114 each),
//! and the new entries of the remaining hosts move about another 1/n of the keys
//! between hosts that stayed. With the rounding, counts change only when n crosses
//! a power-of-two boundary, so one host leaving moves only the keys it owned (1/n).
//! Entries are the same strings Envoy hashes (`key_0`, `key_1`, …), so a host keeps
//! its points across rebuilds.
//!
//! A pick is a binary search for the first entry whose hash is ≥ the request's
//! (wrapping to the first entry): O(log ring size). [`RingHash::walk`] yields the
//! owners clockwise from the key, for bounded-load probing (see `bounded_load`).
//!
//! Left out: Murmur2 hashing, `use_hostname_for_hashing` (the caller chooses the
//! key text), Envoy's retry `attempt` offset (use `walk`), locality weighting.

use xxhash_rust::xxh64::xxh64;

/// Envoy's defaults for `minimum_ring_size` and `maximum_ring_size`.
pub const DEFAULT_MIN_RING_SIZE: u64 = 1024;
pub const DEFAULT_MAX_RING_SIZE: u64 = 8 * 1024 * 1024;
/// Envoy's upper bound for `maximum_ring_size`; larger requests are clamped to it.
pub const RING_SIZE_LIMIT: u64 = 8 * 1024 * 1024;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RingHash {
    /// Entry hashes, ascending.
    hashes: Vec<u64>,
    /// Host index owning the entry at the same position.
    owners: Vec<u32>,
    hosts: usize,
}

impl RingHash {
    /// Builds the ring. `keys[i]` is host i's hash key (its `ip:port` text),
    /// `weights[i]` its weight (0 counts as 1); extra keys or weights are ignored.
    /// Sizes are clamped to `1..=RING_SIZE_LIMIT` and `min ≤ max`.
    pub fn new<K: AsRef<[u8]>>(
        keys: &[K],
        weights: &[u32],
        min_ring_size: u64,
        max_ring_size: u64,
    ) -> RingHash {
        let n = keys.len().min(weights.len());
        if n == 0 {
            return RingHash::default();
        }
        let max_ring = max_ring_size.clamp(1, RING_SIZE_LIMIT);
        let min_ring = min_ring_size.clamp(1, max_ring);
        let w: Vec<u128> = weights
            .iter()
            .take(n)
            .map(|&x| u128::from(x.max(1)))
            .collect();
        let total: u128 = w.iter().sum();
        let w_min = w.iter().copied().min().unwrap_or(1);
        // Envoy: scale = min(ceil(w_min/Σw · min_ring) / (w_min/Σw), max_ring), here
        // with the lightest host's count rounded up to a power of two (see above).
        // As a rational num/den: uncapped, per_min·Σw / w_min; capped, max_ring.
        let per_min = (w_min * u128::from(min_ring))
            .div_ceil(total)
            .next_power_of_two();
        let (num, den) = if per_min * total > u128::from(max_ring) * w_min {
            (u128::from(max_ring), total)
        } else {
            (per_min, w_min)
        };
        // Host i's cumulative target is num·(w_0+…+w_i)/(den·Σw)·Σw = num·cum_i/den.
        let size = (num * total).div_ceil(den) as usize;
        let mut entries: Vec<(u64, u32)> = Vec::with_capacity(size);
        let mut buf: Vec<u8> = Vec::with_capacity(64);
        let mut current: u128 = 0;
        let mut cum: u128 = 0;
        for (i, (key, &wi)) in keys.iter().zip(w.iter()).enumerate() {
            cum += wi;
            let target = num * cum;
            buf.clear();
            buf.extend_from_slice(key.as_ref());
            buf.push(b'_');
            let stem = buf.len();
            let mut k: u64 = 0;
            while current * den < target {
                buf.truncate(stem);
                push_decimal(&mut buf, k);
                entries.push((xxh64(&buf, 0), i as u32));
                k += 1;
                current += 1;
            }
        }
        // Ties (64-bit collisions) are ordered by host index so every build agrees.
        entries.sort_unstable();
        let (hashes, owners) = entries.into_iter().unzip();
        RingHash {
            hashes,
            owners,
            hosts: n,
        }
    }

    /// Number of hosts the ring was built for.
    pub fn hosts(&self) -> usize {
        self.hosts
    }

    /// Number of entries on the ring.
    pub fn ring_size(&self) -> usize {
        self.hashes.len()
    }

    /// Host owning `hash`: the first entry clockwise (hash ≥ `hash`), wrapping.
    pub fn pick(&self, hash: u64) -> Option<usize> {
        let pos = self.position(hash)?;
        self.owners.get(pos).map(|&o| o as usize)
    }

    /// Owners of the ring entries clockwise from `hash`, one full turn. The first
    /// item is [`pick`](Self::pick)'s answer; a host appears once per entry it owns.
    pub fn walk(&self, hash: u64) -> impl Iterator<Item = usize> + '_ {
        let len = self.owners.len();
        let start = self.position(hash).unwrap_or(0);
        (0..len).filter_map(move |k| self.owners.get((start + k) % len).map(|&o| o as usize))
    }

    /// Entries per host (Envoy's `min_hashes_per_host`/`max_hashes_per_host` stats).
    pub fn entries_per_host(&self) -> Vec<u32> {
        let mut c = vec![0u32; self.hosts];
        for &o in &self.owners {
            if let Some(x) = c.get_mut(o as usize) {
                *x += 1;
            }
        }
        c
    }

    fn position(&self, hash: u64) -> Option<usize> {
        if self.hashes.is_empty() {
            return None;
        }
        let pos = self.hashes.partition_point(|&h| h < hash);
        Some(if pos == self.hashes.len() { 0 } else { pos })
    }
}

/// Appends `v` in decimal (what Envoy's `absl::StrCat` gives).
fn push_decimal(buf: &mut Vec<u8>, mut v: u64) {
    let mut digits = [0u8; 20];
    let mut n = 0;
    loop {
        if let Some(d) = digits.get_mut(n) {
            *d = b'0' + (v % 10) as u8;
        }
        n += 1;
        v /= 10;
        if v == 0 || n == digits.len() {
            break;
        }
    }
    buf.extend(digits.iter().take(n).rev());
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balancer::fixtures::{hosts, key_hash, without};
    use wasm_bindgen_test::wasm_bindgen_test;

    #[wasm_bindgen_test(unsupported = test)]
    fn xxhash64_reference_values() {
        // Published xxHash64 test vectors (seed 0).
        assert_eq!(xxh64(b"", 0), 0xEF46_DB37_51D8_E999);
        assert_eq!(xxh64(b"a", 0), 0xD24E_C4F1_A98C_6E5B);
        assert_eq!(xxh64(b"abc", 0), 0x44BC_2CF5_AD77_0999);
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn decimal_suffixes() {
        let mut b = Vec::new();
        for v in [0u64, 7, 10, 1234, u64::MAX] {
            b.clear();
            push_decimal(&mut b, v);
            assert_eq!(String::from_utf8(b.clone()).unwrap(), v.to_string());
        }
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn ring_sizes_follow_envoy() {
        // Equal weights: the lightest host needs ceil(1024/3) = 342 entries, rounded
        // up to 512; all get as many.
        let r = RingHash::new(&hosts(3), &[1, 1, 1], 1024, 8 << 20);
        assert_eq!(r.ring_size(), 1536);
        assert_eq!(r.entries_per_host(), vec![512, 512, 512]);
        // Weights 1:2:3 — lightest needs ceil(1024/6) = 171 → 256, the others in proportion.
        let r = RingHash::new(&hosts(3), &[1, 2, 3], 1024, 8 << 20);
        assert_eq!(r.entries_per_host(), vec![256, 512, 768]);
        // 10 and 9 hosts: 103 and 114 entries each in Envoy, 128 for both here.
        let r = RingHash::new(&hosts(10), &[1; 10], 1024, 8 << 20);
        assert_eq!(r.entries_per_host(), vec![128; 10]);
        let r = RingHash::new(&hosts(9), &[1; 9], 1024, 8 << 20);
        assert_eq!(r.entries_per_host(), vec![128; 9]);
        // Capped by the maximum: 6 entries for 4 hosts, Envoy's example (2,1,2,1).
        let r = RingHash::new(&hosts(4), &[1, 1, 1, 1], 1024, 6);
        assert_eq!(r.entries_per_host(), vec![2, 1, 2, 1]);
        // Uneven weights under the cap: running sums, Envoy's 1.5 entries per weight.
        let r = RingHash::new(&hosts(3), &[1, 2, 3], 1024, 9);
        assert_eq!(r.entries_per_host(), vec![2, 3, 4]);
        // Many hosts: at least one entry each.
        let r = RingHash::new(&hosts(2000), &vec![1; 2000], 1024, 8 << 20);
        assert_eq!(r.ring_size(), 2000);
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn lookup_is_first_entry_at_or_after_the_hash() {
        let r = RingHash::new(&hosts(5), &[1; 5], 16, 64);
        for (pos, (&h, &o)) in r.hashes.iter().zip(&r.owners).enumerate() {
            assert_eq!(r.pick(h), Some(o as usize), "exact hit at {pos}");
            if h > 0 && (pos == 0 || r.hashes[pos - 1] < h - 1) {
                assert_eq!(r.pick(h - 1), Some(o as usize));
            }
        }
        // Past the last entry wraps to the first.
        let last = *r.hashes.last().unwrap();
        if last < u64::MAX {
            assert_eq!(r.pick(last + 1), Some(r.owners[0] as usize));
        }
        assert_eq!(r.pick(0), Some(r.owners[0] as usize));
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn pinned_key_to_host_mappings() {
        // Pinned: integer-only build and xxHash64, so native and wasm must agree.
        let r = RingHash::new(
            &hosts(10),
            &[1; 10],
            DEFAULT_MIN_RING_SIZE,
            DEFAULT_MAX_RING_SIZE,
        );
        let got: Vec<usize> = (0..12).map(|k| r.pick(key_hash(k)).unwrap()).collect();
        assert_eq!(got, PINNED);
        assert_eq!(r.hashes[0], PINNED_FIRST_HASH, "{:#x}", r.hashes[0]);
    }
    const PINNED: [usize; 12] = [6, 7, 7, 4, 4, 9, 3, 4, 9, 8, 4, 8];
    const PINNED_FIRST_HASH: u64 = 0x0080_40ED_C7EE_3F9A;

    #[wasm_bindgen_test(unsupported = test)]
    fn independent_builds_agree() {
        let a = RingHash::new(&hosts(50), &(1..=50).collect::<Vec<u32>>(), 1024, 1 << 20);
        let b = RingHash::new(&hosts(50), &(1..=50).collect::<Vec<u32>>(), 1024, 1 << 20);
        assert_eq!(a, b);
        for k in 0..1000 {
            assert_eq!(a.pick(key_hash(k)), b.pick(key_hash(k)));
        }
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn removing_one_of_n_moves_about_one_nth_of_keys() {
        let n = 10;
        let all = hosts(n);
        let before = RingHash::new(
            &all,
            &vec![1; n],
            DEFAULT_MIN_RING_SIZE,
            DEFAULT_MAX_RING_SIZE,
        );
        let gone = 3;
        let rest = without(&all, gone);
        let after = RingHash::new(
            &rest,
            &vec![1; n - 1],
            DEFAULT_MIN_RING_SIZE,
            DEFAULT_MAX_RING_SIZE,
        );
        let keys = 10_000;
        let mut moved = 0;
        let mut owned_by_gone = 0;
        for k in 0..keys {
            let h = key_hash(k);
            let b = all[before.pick(h).unwrap()].as_str();
            let a = rest[after.pick(h).unwrap()].as_str();
            if b == all[gone] {
                owned_by_gone += 1;
            }
            if a != b {
                moved += 1;
            }
        }
        // Only the keys of the host that left move: 1/n of them, give or take the
        // unevenness of 128 points per host.
        let frac = moved as f64 / keys as f64;
        assert!((0.07..0.13).contains(&frac), "moved {moved} of {keys}");
        assert_eq!(moved, owned_by_gone);
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn shares_follow_weights() {
        let r = RingHash::new(&hosts(3), &[1, 2, 5], 4096, DEFAULT_MAX_RING_SIZE);
        let mut c = [0u32; 3];
        for k in 0..40_000 {
            c[r.pick(key_hash(k)).unwrap()] += 1;
        }
        assert!((3_800..6_400).contains(&c[0]), "{c:?}");
        assert!((8_400..11_600).contains(&c[1]), "{c:?}");
        assert!((22_500..27_500).contains(&c[2]), "{c:?}");
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn walk_goes_clockwise_from_the_pick() {
        let r = RingHash::new(&hosts(4), &[1; 4], 8, 8);
        let h = key_hash(1);
        let w: Vec<usize> = r.walk(h).collect();
        assert_eq!(w.len(), r.ring_size());
        assert_eq!(Some(w[0]), r.pick(h));
        let start = r.position(h).unwrap();
        for (k, &o) in w.iter().enumerate() {
            assert_eq!(o, r.owners[(start + k) % r.ring_size()] as usize);
        }
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn empty_and_degenerate_inputs() {
        let none: [&str; 0] = [];
        assert_eq!(RingHash::new(&none, &[], 1024, 2048).pick(5), None);
        assert_eq!(RingHash::new(&none, &[], 1024, 2048).walk(5).count(), 0);
        // Sizes out of range are clamped, zero weights count as one.
        let r = RingHash::new(&["a:1"], &[0], 0, 0);
        assert_eq!(r.ring_size(), 1);
        assert_eq!(r.pick(u64::MAX), Some(0));
        let r = RingHash::new(&["a:1", "b:1"], &[1, 1], 100, 10);
        assert_eq!(r.ring_size(), 10); // the minimum is lowered to the maximum
    }
}
