//! `outlier`: passive health — instances that keep failing are ejected, as a
//! circuit breaker: closed → open (ejected) → half-open (one trial request) → closed.
//!
//! Reference: Envoy's outlier detection (`consecutive_5xx`, `base_ejection_time`,
//! `max_ejection_time`, `max_ejection_percent`; locally generated connect failures,
//! resets and timeouts count as 5xx, as Envoy does without
//! `split_external_local_origin_errors`). The n-th ejection of an instance lasts
//! `base × n`, capped at `max_ejection_time`. Unlike Envoy, an instance whose
//! ejection has run out gets exactly one trial request (half-open); its result
//! closes the breaker or re-opens it for longer. At most `max_ejection_percent` of
//! the known instances are out at once, but always at least one may be.
//! Left out: success-rate and failure-percentage ejection.
//!
//! The state is shared by all workers of an Envoy through one small value in shared
//! data, changed by compare-and-swap on transitions only (rare events).

use std::collections::{BTreeMap, BTreeSet};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Breaker {
    /// Ejected until `until_ms`.
    Open = 1,
    /// Ejection over: the next request is a trial.
    HalfOpen = 2,
    /// The trial request is in flight (since `until_ms`, reused as its start time).
    Trial = 3,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SlotState {
    pub breaker: Breaker,
    pub until_ms: u64,
    /// Ejections so far (the next lasts `base × (times + 1)`).
    pub times: u16,
}

/// Outlier state of one service: slots not listed are closed (healthy).
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Outliers {
    /// Bumped on every change, so workers notice cheaply.
    pub generation: u64,
    pub slots: BTreeMap<u32, SlotState>,
    /// Slots failing their active health checks (`health_check`).
    pub hc_down: BTreeSet<u32>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Policy {
    pub consecutive_5xx: u32,
    pub base_ejection_ms: u64,
    pub max_ejection_ms: u64,
    pub max_ejection_percent: u32,
}

/// What a finished request says about its instance.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Result_ {
    Success,
    Failure,
}

/// Response flags (Envoy `StreamInfo::CoreResponseFlag` bits) that mean the
/// upstream host failed: connection failure, reset, timeout, overflow.
const HOST_FAILURE_FLAGS: u64 = 4 /* UT */ | 16 /* LR */ | 32 /* UF */ | 64 /* UO */ | 8 /* UR */;

/// Classifies a finished request from `response.code` and `response.flags`.
pub fn classify(code: u64, flags: u64) -> Result_ {
    if (500..600).contains(&code) || flags & HOST_FAILURE_FLAGS != 0 {
        Result_::Failure
    } else {
        Result_::Success
    }
}

impl Outliers {
    pub fn is_out(&self, slot: u32) -> bool {
        self.hc_down.contains(&slot)
            || matches!(self.slots.get(&slot), Some(s) if s.breaker != Breaker::HalfOpen)
    }

    /// Records an active health-check verdict; returns whether it changed anything.
    pub fn set_hc(&mut self, slot: u32, healthy: bool) -> bool {
        let changed = if healthy {
            self.hc_down.remove(&slot)
        } else {
            self.hc_down.insert(slot)
        };
        if changed {
            self.generation += 1;
        }
        changed
    }

    pub fn is_half_open(&self, slot: u32) -> bool {
        matches!(self.slots.get(&slot), Some(s) if s.breaker == Breaker::HalfOpen)
    }

    /// Ejects `slot` after `consecutive` failures, if the policy and the cap allow.
    /// Returns whether the state changed.
    pub fn eject(
        &mut self,
        slot: u32,
        consecutive: u32,
        known: usize,
        p: &Policy,
        now_ms: u64,
    ) -> bool {
        if p.consecutive_5xx == 0 || consecutive < p.consecutive_5xx {
            return false;
        }
        let times = match self.slots.get(&slot) {
            Some(s) if s.breaker == Breaker::Open => return false,
            Some(s) => s.times,
            None => 0,
        };
        let out = self
            .slots
            .values()
            .filter(|s| s.breaker != Breaker::HalfOpen)
            .count();
        let cap = (known as u64 * u64::from(p.max_ejection_percent) / 100).max(1) as usize;
        if out >= cap {
            return false;
        }
        self.open(slot, times, p, now_ms);
        true
    }

    fn open(&mut self, slot: u32, times: u16, p: &Policy, now_ms: u64) {
        let times = times.saturating_add(1);
        let span = p
            .base_ejection_ms
            .saturating_mul(u64::from(times))
            .min(p.max_ejection_ms.max(p.base_ejection_ms));
        self.slots.insert(
            slot,
            SlotState {
                breaker: Breaker::Open,
                until_ms: now_ms + span,
                times,
            },
        );
        self.generation += 1;
    }

    /// Open breakers whose time is over become half-open; trials that never
    /// reported back (their request vanished) are offered again. Returns whether
    /// anything changed.
    pub fn expire(&mut self, now_ms: u64, trial_timeout_ms: u64) -> bool {
        let mut changed = false;
        for s in self.slots.values_mut() {
            let due = match s.breaker {
                Breaker::Open => now_ms >= s.until_ms,
                Breaker::Trial => now_ms >= s.until_ms + trial_timeout_ms,
                Breaker::HalfOpen => false,
            };
            if due {
                s.breaker = Breaker::HalfOpen;
                changed = true;
            }
        }
        if changed {
            self.generation += 1;
        }
        changed
    }

    /// A worker picked a half-open slot: claim the one trial. False if already taken.
    pub fn start_trial(&mut self, slot: u32, now_ms: u64) -> bool {
        match self.slots.get_mut(&slot) {
            Some(s) if s.breaker == Breaker::HalfOpen => {
                s.breaker = Breaker::Trial;
                s.until_ms = now_ms;
                self.generation += 1;
                true
            }
            _ => false,
        }
    }

    /// The trial request finished.
    pub fn end_trial(&mut self, slot: u32, result: Result_, p: &Policy, now_ms: u64) -> bool {
        let Some(s) = self.slots.get(&slot).copied() else {
            return false;
        };
        if s.breaker != Breaker::Trial {
            return false;
        }
        match result {
            Result_::Success => {
                self.slots.remove(&slot);
                self.generation += 1;
            }
            Result_::Failure => self.open(slot, s.times, p, now_ms),
        }
        true
    }

    /// Forgets slots no longer in the snapshot.
    pub fn retain(&mut self, live: impl Fn(u32) -> bool) -> bool {
        let before = self.slots.len() + self.hc_down.len();
        self.slots.retain(|slot, _| live(*slot));
        self.hc_down.retain(|slot| live(*slot));
        let changed = self.slots.len() + self.hc_down.len() != before;
        if changed {
            self.generation += 1;
        }
        changed
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(12 + self.slots.len() * 15);
        b.extend_from_slice(&self.generation.to_le_bytes());
        b.extend_from_slice(&(self.slots.len() as u32).to_le_bytes());
        for (slot, s) in &self.slots {
            b.extend_from_slice(&slot.to_le_bytes());
            b.push(s.breaker as u8);
            b.extend_from_slice(&s.until_ms.to_le_bytes());
            b.extend_from_slice(&s.times.to_le_bytes());
        }
        b.extend_from_slice(&(self.hc_down.len() as u32).to_le_bytes());
        for slot in &self.hc_down {
            b.extend_from_slice(&slot.to_le_bytes());
        }
        b
    }

    pub fn decode(b: &[u8]) -> Option<Outliers> {
        let generation = u64::from_le_bytes(b.get(0..8)?.try_into().ok()?);
        let n = u32::from_le_bytes(b.get(8..12)?.try_into().ok()?) as usize;
        let end = 12usize.checked_add(n.checked_mul(15)?)?;
        let m = u32::from_le_bytes(b.get(end..end + 4)?.try_into().ok()?) as usize;
        if b.len() != end + 4 + m.checked_mul(4)? {
            return None;
        }
        let mut slots = BTreeMap::new();
        for k in 0..n {
            let r = b.get(12 + k * 15..12 + (k + 1) * 15)?;
            let slot = u32::from_le_bytes(r.get(0..4)?.try_into().ok()?);
            let breaker = match r[4] {
                1 => Breaker::Open,
                2 => Breaker::HalfOpen,
                3 => Breaker::Trial,
                _ => return None,
            };
            let until_ms = u64::from_le_bytes(r.get(5..13)?.try_into().ok()?);
            let times = u16::from_le_bytes(r.get(13..15)?.try_into().ok()?);
            slots.insert(
                slot,
                SlotState {
                    breaker,
                    until_ms,
                    times,
                },
            );
        }
        let mut hc_down = BTreeSet::new();
        for k in 0..m {
            let at = end + 4 + k * 4;
            hc_down.insert(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?));
        }
        Some(Outliers {
            generation,
            slots,
            hc_down,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wasm_bindgen_test::wasm_bindgen_test;

    const P: Policy = Policy {
        consecutive_5xx: 5,
        base_ejection_ms: 30_000,
        max_ejection_ms: 300_000,
        max_ejection_percent: 10,
    };

    #[wasm_bindgen_test(unsupported = test)]
    fn classifies_codes_and_flags() {
        assert_eq!(classify(200, 0), Result_::Success);
        assert_eq!(classify(404, 0), Result_::Success);
        assert_eq!(classify(503, 0), Result_::Failure);
        assert_eq!(classify(503, 32), Result_::Failure); // UF: connect failure
        assert_eq!(classify(0, 8), Result_::Failure); // UR: reset before a response
        assert_eq!(classify(200, 2), Result_::Success); // UH alone is not the host's fault
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn breaker_cycle_with_growing_ejections() {
        let mut o = Outliers::default();
        assert!(!o.eject(3, 4, 10, &P, 0), "below the threshold");
        assert!(o.eject(3, 5, 10, &P, 0));
        assert!(o.is_out(3));
        assert!(!o.expire(29_999, 5000));
        assert!(o.expire(30_000, 5000));
        assert!(o.is_half_open(3) && !o.is_out(3));
        assert!(o.start_trial(3, 30_001));
        assert!(!o.start_trial(3, 30_002), "one trial at a time");
        assert!(o.is_out(3), "others keep away during the trial");
        // Trial fails: second ejection lasts twice as long.
        assert!(o.end_trial(3, Result_::Failure, &P, 30_010));
        assert_eq!(o.slots[&3].until_ms, 30_010 + 60_000);
        o.expire(90_010, 5000);
        o.start_trial(3, 90_011);
        assert!(o.end_trial(3, Result_::Success, &P, 90_020));
        assert!(!o.is_out(3) && o.slots.is_empty());
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn ejection_time_is_capped() {
        let mut o = Outliers::default();
        o.slots.insert(
            1,
            SlotState {
                breaker: Breaker::Trial,
                until_ms: 0,
                times: 40,
            },
        );
        o.end_trial(1, Result_::Failure, &P, 0);
        assert_eq!(o.slots[&1].until_ms, 300_000);
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn max_ejection_percent_with_at_least_one() {
        let mut o = Outliers::default();
        assert!(
            o.eject(0, 5, 4, &P, 0),
            "10 % of 4 rounds down, but one may always go"
        );
        assert!(!o.eject(1, 5, 4, &P, 0));
        let all = Policy {
            max_ejection_percent: 100,
            ..P
        };
        assert!(o.eject(1, 5, 4, &all, 0));
        assert!(o.eject(2, 5, 4, &all, 0));
        assert!(o.eject(3, 5, 4, &all, 0));
        assert_eq!(o.slots.len(), 4);
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn lost_trials_are_offered_again() {
        let mut o = Outliers::default();
        o.eject(7, 5, 1, &P, 0);
        o.expire(30_000, 5000);
        o.start_trial(7, 30_000);
        assert!(!o.expire(34_999, 5000));
        assert!(o.expire(35_000, 5000));
        assert!(o.is_half_open(7));
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn codec_round_trip_and_garbage() {
        let mut o = Outliers::default();
        o.eject(1, 5, 10, &P, 5);
        o.eject(9, 5, 100, &P, 6);
        o.set_hc(4, false);
        let b = o.encode();
        assert_eq!(Outliers::decode(&b), Some(o));
        for n in 0..b.len() {
            assert_eq!(Outliers::decode(&b[..n]), None);
        }
        assert_eq!(
            Outliers::decode(&Outliers::default().encode()),
            Some(Outliers::default())
        );
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn failed_health_checks_take_an_instance_out() {
        let mut o = Outliers::default();
        assert!(o.set_hc(2, false));
        assert!(!o.set_hc(2, false), "no change, no new generation");
        assert!(o.is_out(2));
        assert_eq!(o.generation, 1);
        assert!(o.set_hc(2, true));
        assert!(!o.is_out(2));
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn removed_slots_are_forgotten() {
        let mut o = Outliers::default();
        o.eject(1, 5, 10, &P, 0);
        assert!(o.retain(|s| s != 1));
        assert!(o.slots.is_empty());
    }
}
