//! Slow start: a new instance's weight ramps up over a window.
//!
//! Reference: Envoy's `slow_start_config` (round_robin, least_request). While an
//! instance is younger than `slow_start_window`, its weight is multiplied by
//!
//! ```text
//! factor = max(min_weight_percent / 100, (max(age, 1 ms) / window) ^ (1 / aggression))
//! ```
//!
//! and from `window` on by 1. `aggression` 1 is a linear ramp; above 1 the weight
//! rises fast at first, below 1 slowly (a value ≤ 0 or NaN means 1, as in Envoy).
//! `min_weight_percent` defaults to 10, as Envoy's.
//!
//! **Age.** Envoy counts from when it created the host, so a restarted Envoy treats
//! every host as new — except that hosts present when the cluster initialises are
//! not in slow start. Here [`age_ms`] prefers a registration time from the registry
//! (then `now_ms` and `registered_ms` must be the same clock, Unix milliseconds):
//! a proxy restart does not re-ramp an instance registered an hour ago, and a
//! genuinely new one ramps even if the proxy just started. Without one, the time the
//! proxy first saw the instance is used ([`FirstSeen`]), and instances in the first
//! list the proxy sees count as old (Envoy's rule), so a restart does not put the
//! whole fleet back to 10%. An instance that leaves the list and comes back ramps
//! again. A registration time in the future (clock skew) counts as age 0.
//!
//! The power is computed with [`crate::detmath`], so native and wasm builds give the
//! same weights. Weights change with time: the table has to be rebuilt while any
//! instance is [`ramping`](SlowStart::ramping). Left out: Envoy's runtime-keyed
//! aggression and the "only while healthy" condition (unhealthy instances are not
//! routed at all).

use crate::detmath;
use std::collections::HashMap;
use std::hash::Hash;

pub const DEFAULT_MIN_WEIGHT_PERCENT: u32 = 10;
const PPM: u64 = 1_000_000;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SlowStart {
    window_ms: u64,
    aggression: f64,
    min_weight_percent: u32,
}

impl SlowStart {
    /// `window_ms` 0 disables the ramp; `min_weight_percent` is clamped to 0..=100.
    pub fn new(window_ms: u64, aggression: f64, min_weight_percent: u32) -> SlowStart {
        let aggression = if aggression.is_nan() || aggression <= 0.0 {
            1.0
        } else {
            aggression
        };
        SlowStart {
            window_ms,
            aggression,
            min_weight_percent: min_weight_percent.min(100),
        }
    }

    /// True while an instance of this age is below full weight.
    pub fn ramping(&self, age_ms: Option<u64>) -> bool {
        matches!(age_ms, Some(a) if a < self.window_ms)
    }

    /// The weight multiplier in millionths (1,000,000 = full weight). `None` (an
    /// instance known to be old) is full weight.
    pub fn factor_ppm(&self, age_ms: Option<u64>) -> u32 {
        let Some(age) = age_ms else { return PPM as u32 };
        if age >= self.window_ms {
            return PPM as u32;
        }
        let t = age.max(1) as f64 / self.window_ms as f64;
        let ramp = if self.aggression == 1.0 {
            t
        } else {
            detmath::powf(t, 1.0 / self.aggression)
        };
        let floor = f64::from(self.min_weight_percent) / 100.0;
        let f = ramp.max(floor).clamp(0.0, 1.0);
        (f * PPM as f64) as u32
    }

    /// `weight` × factor, at least 1.
    pub fn weight(&self, weight: u32, age_ms: Option<u64>) -> u32 {
        let w = u64::from(weight) * u64::from(self.factor_ppm(age_ms)) / PPM;
        u32::try_from(w).unwrap_or(u32::MAX).max(1)
    }
}

/// When the proxy first saw an instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FirstSeen {
    /// In the first list after the proxy started: treated as old.
    Initial,
    /// First seen at this time (ms).
    At(u64),
}

/// An instance's age: from its registration time when the registry gives one, else
/// from when this proxy first saw it; `None` when it is old (no ramp).
pub fn age_ms(now_ms: u64, registered_ms: Option<u64>, first_seen: FirstSeen) -> Option<u64> {
    match (registered_ms, first_seen) {
        (Some(r), _) => Some(now_ms.saturating_sub(r)),
        (None, FirstSeen::At(t)) => Some(now_ms.saturating_sub(t)),
        (None, FirstSeen::Initial) => None,
    }
}

/// First-seen times of the instances of one service, keyed by e.g. `ip:port`.
#[derive(Debug, Clone)]
pub struct FirstSeenTracker<K> {
    seen: HashMap<K, FirstSeen>,
    started: bool,
}

impl<K: Hash + Eq + Clone> Default for FirstSeenTracker<K> {
    fn default() -> Self {
        FirstSeenTracker {
            seen: HashMap::new(),
            started: false,
        }
    }
}

impl<K: Hash + Eq + Clone> FirstSeenTracker<K> {
    pub fn new() -> Self {
        Self::default()
    }

    /// Records the current list: the first call marks everything [`FirstSeen::Initial`];
    /// later, new keys are stamped `now_ms` and keys no longer listed are forgotten.
    pub fn update(&mut self, keys: impl IntoIterator<Item = K>, now_ms: u64) {
        let stamp = if self.started {
            FirstSeen::At(now_ms)
        } else {
            FirstSeen::Initial
        };
        let mut next = HashMap::with_capacity(self.seen.len());
        for k in keys {
            let v = self.seen.get(&k).copied().unwrap_or(stamp);
            next.insert(k, v);
        }
        self.seen = next;
        self.started = true;
    }

    pub fn get(&self, k: &K) -> Option<FirstSeen> {
        self.seen.get(k).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wasm_bindgen_test::wasm_bindgen_test;

    #[wasm_bindgen_test(unsupported = test)]
    fn linear_ramp_follows_the_clock() {
        let s = SlowStart::new(10_000, 1.0, 10);
        let at = |ms: u64| s.factor_ppm(Some(ms));
        assert_eq!(at(0), 100_000); // the floor: 10%
        assert_eq!(at(999), 100_000);
        assert_eq!(at(2_500), 250_000);
        assert_eq!(at(5_000), 500_000);
        assert_eq!(at(9_999), 999_900);
        assert_eq!(at(10_000), 1_000_000);
        assert_eq!(at(1 << 40), 1_000_000);
        assert_eq!(s.factor_ppm(None), 1_000_000);
        assert!(s.ramping(Some(9_999)) && !s.ramping(Some(10_000)) && !s.ramping(None));
        // Weights: 100 → 10, 50, 100; never below 1.
        assert_eq!(s.weight(100, Some(0)), 10);
        assert_eq!(s.weight(100, Some(5_000)), 50);
        assert_eq!(s.weight(100, Some(10_000)), 100);
        assert_eq!(s.weight(1, Some(0)), 1);
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn aggression_shapes_the_curve() {
        // aggression 2: sqrt(t); 0.5: t².
        let fast = SlowStart::new(10_000, 2.0, 0);
        assert!(fast.factor_ppm(Some(2_500)).abs_diff(500_000) <= 1);
        assert!(fast.factor_ppm(Some(400)).abs_diff(200_000) <= 1);
        let slow = SlowStart::new(10_000, 0.5, 0);
        assert!(slow.factor_ppm(Some(5_000)).abs_diff(250_000) <= 1);
        assert!(slow.factor_ppm(Some(1_000)).abs_diff(10_000) <= 1);
        // The floor still applies: t² = 1% < 10%.
        assert_eq!(
            SlowStart::new(10_000, 0.5, 10).factor_ppm(Some(1_000)),
            100_000
        );
        // Bad aggression means 1; a zero window means no ramp.
        assert_eq!(
            SlowStart::new(10_000, -3.0, 0).factor_ppm(Some(5_000)),
            500_000
        );
        assert_eq!(
            SlowStart::new(10_000, f64::NAN, 0).factor_ppm(Some(5_000)),
            500_000
        );
        assert_eq!(SlowStart::new(0, 1.0, 10).factor_ppm(Some(0)), 1_000_000);
        // Pinned: the power is computed the same way on every target.
        assert_eq!(
            SlowStart::new(60_000, 1.7, 5).factor_ppm(Some(12_345)),
            PINNED_PPM
        );
    }
    const PINNED_PPM: u32 = 394_532;

    #[wasm_bindgen_test(unsupported = test)]
    fn registration_time_wins_over_first_seen() {
        assert_eq!(
            age_ms(100_000, Some(95_000), FirstSeen::Initial),
            Some(5_000)
        );
        assert_eq!(
            age_ms(100_000, Some(95_000), FirstSeen::At(99_000)),
            Some(5_000)
        );
        assert_eq!(age_ms(100_000, None, FirstSeen::At(99_000)), Some(1_000));
        assert_eq!(age_ms(100_000, None, FirstSeen::Initial), None);
        assert_eq!(age_ms(100_000, Some(200_000), FirstSeen::Initial), Some(0));
        // skew
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn a_restart_does_not_re_ramp_old_instances() {
        let s = SlowStart::new(30_000, 1.0, 10);
        // Proxy starts at t = 1,000,000 and sees a and b: both old, full weight.
        let mut t = FirstSeenTracker::new();
        t.update(["a", "b"], 1_000_000);
        let w = |t: &FirstSeenTracker<&str>, k: &str, now: u64| {
            s.weight(100, age_ms(now, None, t.get(&k).unwrap()))
        };
        assert_eq!(w(&t, "a", 1_000_000), 100);
        // c joins later and ramps with the clock.
        t.update(["a", "b", "c"], 1_010_000);
        assert_eq!(w(&t, "c", 1_010_000), 10);
        assert_eq!(w(&t, "c", 1_025_000), 50);
        assert_eq!(w(&t, "c", 1_040_000), 100);
        assert_eq!(w(&t, "a", 1_025_000), 100);
        // b leaves and comes back: it ramps again.
        t.update(["a", "c"], 1_050_000);
        assert_eq!(t.get(&"b"), None);
        t.update(["a", "b", "c"], 1_060_000);
        assert_eq!(t.get(&"b"), Some(FirstSeen::At(1_060_000)));
        assert_eq!(t.get(&"c"), Some(FirstSeen::At(1_010_000)));
        // A registry registration time ramps a new instance even at proxy start.
        let mut fresh = FirstSeenTracker::new();
        fresh.update(["d"], 2_000_000);
        let age = age_ms(2_000_000, Some(1_994_000), fresh.get(&"d").unwrap());
        assert_eq!(s.weight(100, age), 20);
    }
}
