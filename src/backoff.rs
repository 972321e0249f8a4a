//! Retry delay after failed registry refreshes: exponential with "equal jitter"
//! (half fixed, half random; see the AWS architecture blog "Exponential Backoff And
//! Jitter"), so Envoys that lost their registry together do not return in step.

use crate::rng::Rng;

/// Delay before retry number `failures` (1 = first retry), in milliseconds.
pub fn delay_ms(failures: u32, base_ms: u64, max_ms: u64, rng: &mut impl Rng) -> u64 {
    let exp = failures.saturating_sub(1).min(32);
    let ceiling = base_ms.saturating_mul(1u64 << exp).min(max_ms).max(1);
    let half = ceiling / 2;
    half + rng.below(ceiling - half + 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SplitMix64;
    use wasm_bindgen_test::wasm_bindgen_test;

    #[wasm_bindgen_test(unsupported = test)]
    fn grows_then_caps_with_jitter_in_bounds() {
        let mut r = SplitMix64(1);
        for (n, ceiling) in [
            (1, 500),
            (2, 1000),
            (3, 2000),
            (4, 4000),
            (7, 30_000),
            (60, 30_000),
        ] {
            for _ in 0..200 {
                let d = delay_ms(n, 500, 30_000, &mut r);
                assert!(d >= ceiling / 2 && d <= ceiling, "failures={n} delay={d}");
            }
        }
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn jitter_spreads_retries() {
        let mut r = SplitMix64(9);
        let v: std::collections::HashSet<u64> =
            (0..50).map(|_| delay_ms(3, 500, 30_000, &mut r)).collect();
        assert!(v.len() > 40);
    }
}
