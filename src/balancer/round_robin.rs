//! `round_robin`: smooth weighted round robin, per worker.
//!
//! Reference: nginx `ngx_http_upstream_get_peer` (smooth weighted round-robin,
//! nginx 1.3.1): every pick adds each weight to its peer's current value, takes the
//! largest (first on ties) and subtracts the total from it. Weights 5,1,1 give
//! a,a,b,a,c,a,a — heavy peers are interleaved, not sent in bursts.
//!
//! Cost: the cycle (length Σw after dividing by the weights' GCD) is computed once
//! per snapshot when it is short (n·Σw ≤ 4M steps), so a pick is O(1). Equal weights
//! are plain round robin. Larger, uneven pools use earliest-deadline-first
//! scheduling (as Envoy's weighted round robin does): O(log n) per pick, the same
//! long-run shares, a slightly different order. Each worker starts at a random
//! point of the cycle so workers do not move in step. Left out: nginx's
//! `effective_weight` reduction on failures (outlier ejection covers it).

use crate::rng::Rng;
use std::cmp::Reverse;
use std::collections::BinaryHeap;

#[derive(Debug, Clone)]
pub enum RoundRobin {
    Empty,
    /// Equal weights: index cursor over `n`.
    Plain {
        n: usize,
        next: usize,
    },
    /// Precomputed smooth WRR cycle.
    Cycle {
        order: Vec<u32>,
        next: usize,
    },
    /// Earliest deadline first: (deadline, index) with deadline advancing by Σw/w.
    Edf {
        heap: BinaryHeap<Reverse<(u128, u32)>>,
        step: Vec<u128>,
    },
}

const MAX_PRECOMPUTE_STEPS: u64 = 4 << 20;

impl RoundRobin {
    pub fn new(weights: &[u32], rng: &mut impl Rng) -> RoundRobin {
        let n = weights.len();
        if n == 0 {
            return RoundRobin::Empty;
        }
        let g = super::gcd_all(weights);
        let w: Vec<u64> = weights.iter().map(|&x| u64::from(x.max(1) / g)).collect();
        let total: u64 = w.iter().sum();
        if w.iter().all(|&x| x == w[0]) {
            return RoundRobin::Plain {
                n,
                next: rng.below(n as u64) as usize,
            };
        }
        if (n as u64).saturating_mul(total) <= MAX_PRECOMPUTE_STEPS {
            let order = smooth_cycle(&w);
            let next = rng.below(order.len() as u64) as usize;
            return RoundRobin::Cycle { order, next };
        }
        // Deadlines in units of 1/(Σw) so every step is an integer: step_i = Σw·L/w_i
        // with L = lcm-free scaling by 2^20 keeps rounding error negligible.
        let scale: u128 = 1 << 20;
        let step: Vec<u128> = w
            .iter()
            .map(|&x| (u128::from(total) * scale) / u128::from(x))
            .collect();
        let heap = step
            .iter()
            .enumerate()
            .map(|(i, s)| Reverse((*s / 2 + i as u128, i as u32)))
            .collect();
        let mut rr = RoundRobin::Edf { heap, step };
        for _ in 0..rng.below(n as u64) {
            rr.pick();
        }
        rr
    }

    /// The instance `ahead` picks after the next one (0: the next), without moving the cursor
    /// (retry fallbacks of one request). Earliest-deadline-first pools see only the
    /// next deadline: every `ahead` gives the instance after the last pick.
    pub fn peek(&self, ahead: usize) -> Option<usize> {
        match self {
            RoundRobin::Empty => None,
            RoundRobin::Plain { n, next } => Some((next + ahead) % n),
            RoundRobin::Cycle { order, next } => {
                order.get((next + ahead) % order.len()).map(|&i| i as usize)
            }
            RoundRobin::Edf { heap, .. } => heap.peek().map(|Reverse((_, i))| *i as usize),
        }
    }

    /// Index of the next instance, `None` when there is none.
    pub fn pick(&mut self) -> Option<usize> {
        match self {
            RoundRobin::Empty => None,
            RoundRobin::Plain { n, next } => {
                let i = *next;
                *next = (i + 1) % *n;
                Some(i)
            }
            RoundRobin::Cycle { order, next } => {
                let i = *order.get(*next)? as usize;
                *next = (*next + 1) % order.len();
                Some(i)
            }
            RoundRobin::Edf { heap, step } => {
                let Reverse((deadline, i)) = heap.pop()?;
                let s = step.get(i as usize).copied().unwrap_or(1);
                heap.push(Reverse((deadline + s, i)));
                Some(i as usize)
            }
        }
    }
}

/// One full cycle of nginx's smooth weighted round robin.
fn smooth_cycle(w: &[u64]) -> Vec<u32> {
    let total: i64 = w.iter().sum::<u64>() as i64;
    let mut current = vec![0i64; w.len()];
    let mut order = Vec::with_capacity(total as usize);
    for _ in 0..total {
        let mut best = 0usize;
        for (i, c) in current.iter_mut().enumerate() {
            *c += w[i] as i64;
        }
        for i in 1..current.len() {
            if current[i] > current[best] {
                best = i;
            }
        }
        current[best] -= total;
        order.push(best as u32);
    }
    order
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SplitMix64;
    use wasm_bindgen_test::wasm_bindgen_test;

    /// A generator that always draws 0, so cycles start at their beginning.
    struct Zero;
    impl Rng for Zero {
        fn next_u64(&mut self) -> u64 {
            0
        }
    }

    fn names(rr: &mut RoundRobin, k: usize) -> String {
        (0..k)
            .map(|_| (b'a' + rr.pick().unwrap() as u8) as char)
            .collect()
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn nginx_sequence_for_5_1_1() {
        let mut rr = RoundRobin::new(&[5, 1, 1], &mut Zero);
        assert_eq!(names(&mut rr, 14), "aabacaaaabacaa");
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn gcd_is_divided_out() {
        let mut rr = RoundRobin::new(&[50, 10, 10], &mut Zero);
        assert_eq!(names(&mut rr, 7), "aabacaa");
        assert!(matches!(rr, RoundRobin::Cycle { ref order, .. } if order.len() == 7));
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn equal_weights_are_plain_round_robin() {
        let mut rr = RoundRobin::new(&[3, 3, 3, 3], &mut Zero);
        assert_eq!(names(&mut rr, 8), "abcdabcd");
        assert!(RoundRobin::new(&[], &mut Zero).pick().is_none());
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn random_start_keeps_the_shares() {
        let mut r = SplitMix64(3);
        let mut rr = RoundRobin::new(&[5, 1, 1], &mut r);
        let mut c = [0; 3];
        for _ in 0..700 {
            c[rr.pick().unwrap()] += 1;
        }
        assert_eq!(c, [500, 100, 100]);
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn large_uneven_pools_use_edf_with_exact_shares() {
        // 3,000 instances with weights 1..=3: n·Σw is above the precompute budget.
        let weights: Vec<u32> = (0..3000).map(|i| 1 + (i % 3) as u32).collect();
        let total: u32 = weights.iter().sum();
        let mut rr = RoundRobin::new(&weights, &mut SplitMix64(1));
        assert!(matches!(rr, RoundRobin::Edf { .. }));
        let mut c = vec![0u32; weights.len()];
        for _ in 0..(total * 2) {
            c[rr.pick().unwrap()] += 1;
        }
        for (i, &w) in weights.iter().enumerate() {
            assert!(
                (c[i] as i64 - 2 * w as i64).abs() <= 1,
                "instance {i}: weight {w}, picks {}",
                c[i]
            );
        }
    }
}
