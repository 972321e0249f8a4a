//! Host selection. Each policy is built once per snapshot (per worker) from the
//! weights of the routable instances and then answers picks with no allocation.
//! Policies see indexes and weights only; the host layer maps an index to an address.

pub mod bounded_load;
pub mod least_request;
pub mod maglev;
pub mod peak_ewma;
pub mod random;
pub mod ring_hash;
pub mod round_robin;
pub mod weighted_sampler;

pub use least_request::LeastRequest;
pub use round_robin::RoundRobin;

/// Greatest common divisor of all weights (1 for an empty list).
pub(crate) fn gcd_all(weights: &[u32]) -> u32 {
    fn gcd(a: u32, b: u32) -> u32 {
        if b == 0 {
            a
        } else {
            gcd(b, a % b)
        }
    }
    weights.iter().fold(0, |g, &w| gcd(g, w)).max(1)
}

/// Fixtures shared by the consistent-hashing tests (`ring_hash`, `maglev`).
#[cfg(test)]
pub(crate) mod fixtures {
    use xxhash_rust::xxh64::xxh64;

    /// `n` distinct `ip:port` keys.
    pub fn hosts(n: usize) -> Vec<String> {
        (0..n)
            .map(|i| format!("10.0.{}.{}:8080", i / 250, i % 250 + 1))
            .collect()
    }

    /// `hosts` without the one at index `gone`.
    pub fn without(hosts: &[String], gone: usize) -> Vec<String> {
        hosts
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != gone)
            .map(|(_, h)| h.clone())
            .collect()
    }

    /// The hash of request key `user-<k>`.
    pub fn key_hash(k: u64) -> u64 {
        xxh64(format!("user-{k}").as_bytes(), 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wasm_bindgen_test::wasm_bindgen_test;

    #[wasm_bindgen_test(unsupported = test)]
    fn gcd_of_weights() {
        assert_eq!(gcd_all(&[10, 20, 30]), 10);
        assert_eq!(gcd_all(&[5, 1, 1]), 1);
        assert_eq!(gcd_all(&[]), 1);
    }
}
