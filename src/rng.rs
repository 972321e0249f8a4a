//! Randomness is passed in, never taken: algorithms draw from a [`Rng`] so tests can
//! fix the sequence. [`SplitMix64`] is the generator used in Envoy workers (seeded
//! per VM from the host's entropy and clock).

pub trait Rng {
    fn next_u64(&mut self) -> u64;

    /// Uniform in `0..n` (`n > 0`), by Lemire's multiply-shift; 64-bit on every target.
    fn below(&mut self, n: u64) -> u64 {
        if n <= 1 {
            return 0;
        }
        ((self.next_u64() as u128 * n as u128) >> 64) as u64
    }
}

/// SplitMix64 (Steele, Lea, Flood 2014): tiny, fast, passes BigCrush; not for secrets.
#[derive(Clone, Debug)]
pub struct SplitMix64(pub u64);

impl Rng for SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wasm_bindgen_test::wasm_bindgen_test;

    #[wasm_bindgen_test(unsupported = test)]
    fn same_sequence_on_every_target() {
        // Reference values of SplitMix64 seeded with 0.
        let mut r = SplitMix64(0);
        assert_eq!(r.next_u64(), 0xE220_A839_7B1D_CDAF);
        assert_eq!(r.next_u64(), 0x6E78_9E6A_A1B9_65F4);
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn below_stays_in_range_and_covers_it() {
        let mut r = SplitMix64(7);
        let mut seen = [0u32; 5];
        for _ in 0..5000 {
            let v = r.below(5);
            assert!(v < 5);
            seen[v as usize] += 1;
        }
        assert!(seen.iter().all(|&c| c > 800), "{seen:?}");
        assert_eq!(r.below(0), 0);
        assert_eq!(r.below(1), 0);
    }
}
