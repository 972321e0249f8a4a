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
//! **What counts against an instance** ([`judge`]), from `response.code` and
//! `response.flags` (Envoy's `StreamInfo::legacyResponseFlags()`: bit
//! `1 << CoreResponseFlag`, `envoy/stream_info/stream_info.h`), as Envoy's router
//! reports to its outlier detector (`source/common/router/router.cc`,
//! `source/common/upstream/outlier_detection_impl.cc`):
//! - failure, whatever the code: UT (upstream timeout: `LocalOriginTimeout`), and
//!   the upstream stream resets LR, UR, UF, UC, UPE (`onUpstreamReset` reports
//!   `LocalOriginConnectFailed` for every reset reason but `Overflow`; LR is a
//!   reset of the *upstream* stream by this proxy's codec: refused stream,
//!   premature half-close of an HTTP/1 upstream);
//! - nothing (the answer was this proxy's own, the host was not asked or not
//!   to blame): LH, UH, NR, NC, FI, RL, UAEX, RLSE, IH, OM, DF, DO, UDO and UO —
//!   UO is the circuit breaker of *this* proxy (or its retry budget), a cluster-wide
//!   state that ejecting hosts would make worse (Envoy issue 25487: overflow
//!   resets are not reported); the 5xx that goes with these flags is local;
//! - the response code decides (5xx = failure, else success): DI (delay only), URX
//!   (each try was judged when it ended), and the downstream flags DC, DR, DT,
//!   DPE, SI; with no response code (0) and no host-failure flag — the client
//!   left before an answer — nothing is said about the instance;
//! - other flags (cache, filter-config, max stream duration) leave it to the code.
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

/// Envoy `response.flags` bits: `1 << StreamInfo::CoreResponseFlag`.
pub mod flags {
    /// LH: local server health check failed.
    pub const FAILED_LOCAL_HEALTH_CHECK: u64 = 1 << 0;
    /// UH: no healthy upstream.
    pub const NO_HEALTHY_UPSTREAM: u64 = 1 << 1;
    /// UT: upstream request timeout.
    pub const UPSTREAM_REQUEST_TIMEOUT: u64 = 1 << 2;
    /// LR: local codec-level reset of the upstream stream.
    pub const LOCAL_RESET: u64 = 1 << 3;
    /// UR: upstream remote reset.
    pub const UPSTREAM_REMOTE_RESET: u64 = 1 << 4;
    /// UF: upstream connection failure.
    pub const UPSTREAM_CONNECTION_FAILURE: u64 = 1 << 5;
    /// UC: upstream connection termination.
    pub const UPSTREAM_CONNECTION_TERMINATION: u64 = 1 << 6;
    /// UO: upstream overflow (this proxy's circuit breaker).
    pub const UPSTREAM_OVERFLOW: u64 = 1 << 7;
    /// NR: no route.
    pub const NO_ROUTE_FOUND: u64 = 1 << 8;
    /// DI: delay injected.
    pub const DELAY_INJECTED: u64 = 1 << 9;
    /// FI: fault injected.
    pub const FAULT_INJECTED: u64 = 1 << 10;
    /// RL: rate limited locally.
    pub const RATE_LIMITED: u64 = 1 << 11;
    /// UAEX: unauthorized by the external authorization service.
    pub const UNAUTHORIZED_EXTERNAL_SERVICE: u64 = 1 << 12;
    /// RLSE: rate limit service error.
    pub const RATE_LIMIT_SERVICE_ERROR: u64 = 1 << 13;
    /// DC: downstream connection termination.
    pub const DOWNSTREAM_CONNECTION_TERMINATION: u64 = 1 << 14;
    /// URX: upstream retry limit exceeded.
    pub const UPSTREAM_RETRY_LIMIT_EXCEEDED: u64 = 1 << 15;
    /// SI: stream idle timeout.
    pub const STREAM_IDLE_TIMEOUT: u64 = 1 << 16;
    /// IH: invalid `x-envoy-*` request headers.
    pub const INVALID_ENVOY_REQUEST_HEADERS: u64 = 1 << 17;
    /// DPE: downstream protocol error.
    pub const DOWNSTREAM_PROTOCOL_ERROR: u64 = 1 << 18;
    /// UMSDR: upstream max stream duration reached.
    pub const UPSTREAM_MAX_STREAM_DURATION_REACHED: u64 = 1 << 19;
    /// RFCF: response from the cache filter.
    pub const RESPONSE_FROM_CACHE_FILTER: u64 = 1 << 20;
    /// NFCF: no filter config found.
    pub const NO_FILTER_CONFIG_FOUND: u64 = 1 << 21;
    /// DT: downstream connection duration timeout.
    pub const DURATION_TIMEOUT: u64 = 1 << 22;
    /// UPE: upstream protocol error.
    pub const UPSTREAM_PROTOCOL_ERROR: u64 = 1 << 23;
    /// NC: no cluster found.
    pub const NO_CLUSTER_FOUND: u64 = 1 << 24;
    /// OM: overload manager terminated the stream.
    pub const OVERLOAD_MANAGER: u64 = 1 << 25;
    /// DF: DNS resolution failed.
    pub const DNS_RESOLUTION_FAILED: u64 = 1 << 26;
    /// DO: dropped by `drop_overload`.
    pub const DROP_OVERLOAD: u64 = 1 << 27;
    /// DR: downstream remote reset.
    pub const DOWNSTREAM_REMOTE_RESET: u64 = 1 << 28;
    /// UDO: dropped unconditionally by `drop_overload` at 100 %.
    pub const UNCONDITIONAL_DROP_OVERLOAD: u64 = 1 << 29;
}

/// Flags that mean the instance failed: timeout, and resets of the upstream
/// stream other than overflow (module doc).
const HOST_FAILURE_FLAGS: u64 = flags::UPSTREAM_REQUEST_TIMEOUT
    | flags::LOCAL_RESET
    | flags::UPSTREAM_REMOTE_RESET
    | flags::UPSTREAM_CONNECTION_FAILURE
    | flags::UPSTREAM_CONNECTION_TERMINATION
    | flags::UPSTREAM_PROTOCOL_ERROR;

/// Flags that mean this proxy answered by itself: the code is not the instance's.
const LOCAL_REPLY_FLAGS: u64 = flags::FAILED_LOCAL_HEALTH_CHECK
    | flags::NO_HEALTHY_UPSTREAM
    | flags::UPSTREAM_OVERFLOW
    | flags::NO_ROUTE_FOUND
    | flags::FAULT_INJECTED
    | flags::RATE_LIMITED
    | flags::UNAUTHORIZED_EXTERNAL_SERVICE
    | flags::RATE_LIMIT_SERVICE_ERROR
    | flags::INVALID_ENVOY_REQUEST_HEADERS
    | flags::NO_CLUSTER_FOUND
    | flags::OVERLOAD_MANAGER
    | flags::DNS_RESOLUTION_FAILED
    | flags::DROP_OVERLOAD
    | flags::UNCONDITIONAL_DROP_OVERLOAD;

/// What a finished request says about its instance, from `response.code` and
/// `response.flags`; `None`: nothing (a local reply, or no answer because the
/// client left), so neither the consecutive-failure count nor a trial moves.
pub fn judge(code: u64, flags: u64) -> Option<Result_> {
    if flags & HOST_FAILURE_FLAGS != 0 {
        Some(Result_::Failure)
    } else if flags & LOCAL_REPLY_FLAGS != 0 || code == 0 {
        None
    } else if (500..600).contains(&code) {
        Some(Result_::Failure)
    } else {
        Some(Result_::Success)
    }
}

/// [`judge`] for callers that must record something: a request that says nothing
/// about its instance is a success (it never counts towards an ejection).
pub fn classify(code: u64, flags: u64) -> Result_ {
    judge(code, flags).unwrap_or(Result_::Success)
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

    /// The trial request never reached its instance (its hand-off to Envoy failed):
    /// the slot is half-open again, so the next request to pick it is the trial.
    pub fn abandon_trial(&mut self, slot: u32) -> bool {
        match self.slots.get_mut(&slot) {
            Some(s) if s.breaker == Breaker::Trial => {
                s.breaker = Breaker::HalfOpen;
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
        assert_eq!(classify(0, 8), Result_::Failure); // LR: upstream stream reset locally
        assert_eq!(classify(0, 16), Result_::Failure); // UR: reset before a response
        assert_eq!(classify(200, 2), Result_::Success); // UH alone is not the host's fault
    }

    /// Envoy's `response.flags` bits (`1 << CoreResponseFlag`), written out here
    /// rather than taken from the module, so a wrong constant there fails here.
    /// Each: (name, bit, whether it alone marks a failure of the instance).
    const FLAG_TABLE: &[(&str, u64, bool)] = &[
        ("LH", 0x1, false),
        ("UH", 0x2, false),
        ("UT", 0x4, true),
        ("LR", 0x8, true),
        ("UR", 0x10, true),
        ("UF", 0x20, true),
        ("UC", 0x40, true),
        ("UO", 0x80, false),
        ("NR", 0x100, false),
        ("DI", 0x200, false),
        ("FI", 0x400, false),
        ("RL", 0x800, false),
        ("UAEX", 0x1000, false),
        ("RLSE", 0x2000, false),
        ("DC", 0x4000, false),
        ("URX", 0x8000, false),
        ("SI", 0x1_0000, false),
        ("IH", 0x2_0000, false),
        ("DPE", 0x4_0000, false),
        ("UMSDR", 0x8_0000, false),
        ("RFCF", 0x10_0000, false),
        ("NFCF", 0x20_0000, false),
        ("DT", 0x40_0000, false),
        ("UPE", 0x80_0000, true),
        ("NC", 0x100_0000, false),
        ("OM", 0x200_0000, false),
        ("DF", 0x400_0000, false),
        ("DO", 0x800_0000, false),
        ("DR", 0x1000_0000, false),
        ("UDO", 0x2000_0000, false),
    ];

    #[wasm_bindgen_test(unsupported = test)]
    fn each_response_flag_counts_or_not() {
        for &(name, bit, counts) in FLAG_TABLE {
            // No response code: only a host-failure flag makes it a failure.
            let want = if counts {
                Result_::Failure
            } else {
                Result_::Success
            };
            assert_eq!(classify(0, bit), want, "{name} with code 0");
            // An answer of 200 from the host with the flag: the flag alone decides.
            assert_eq!(classify(200, bit), want, "{name} with code 200");
        }
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn a_local_5xx_reply_does_not_count_against_the_instance() {
        // These flags mean this proxy answered by itself (its own circuit breaker,
        // no healthy host, no route, fault injection, rate limits, overload...): the
        // 5xx that goes with them is not the instance's.
        for (name, bit, code) in [
            ("LH", 0x1, 503),
            ("UH", 0x2, 503),
            ("UO", 0x80, 503),
            ("NR", 0x100, 503),
            ("FI", 0x400, 503),
            ("RL", 0x800, 503),
            ("UAEX", 0x1000, 503),
            ("RLSE", 0x2000, 500),
            ("IH", 0x2_0000, 503),
            ("NC", 0x100_0000, 503),
            ("OM", 0x200_0000, 503),
            ("DF", 0x400_0000, 503),
            ("DO", 0x800_0000, 503),
            ("UDO", 0x2000_0000, 503),
        ] {
            assert_eq!(classify(code, bit), Result_::Success, "{name} with {code}");
        }
        // A 5xx next to a flag that only says something about the client or the
        // delay is the instance's own answer.
        for (name, bit) in [
            ("DC", 0x4000),
            ("DI", 0x200),
            ("DR", 0x1000_0000),
            ("URX", 0x8000),
        ] {
            assert_eq!(classify(503, bit), Result_::Failure, "{name} with 503");
        }
        // A host failure wins over a local flag set by a later attempt (a connect
        // failure, then the retry overflowed this proxy's circuit breaker).
        assert_eq!(classify(503, 0x20 | 0x80), Result_::Failure);
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn a_downstream_disconnect_does_not_count() {
        assert_eq!(classify(0, 0x4000), Result_::Success);
        assert_eq!(classify(200, 0x4000), Result_::Success);
        assert_eq!(classify(0, 0x1000_0000), Result_::Success);
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn judge_says_nothing_about_local_replies_and_missing_answers() {
        assert_eq!(judge(0, 0), None, "no answer, no flag");
        assert_eq!(judge(0, 0x4000), None, "DC alone");
        assert_eq!(judge(503, 0x80), None, "UO: this proxy's circuit breaker");
        assert_eq!(judge(503, 0x2), None, "UH");
        assert_eq!(judge(0, 0x20), Some(Result_::Failure), "UF");
        assert_eq!(judge(503, 0x4000), Some(Result_::Failure), "the host's 503");
        assert_eq!(judge(200, 0), Some(Result_::Success));
        assert_eq!(judge(404, 0), Some(Result_::Success));
        // The constants are Envoy's bits.
        assert_eq!(flags::UPSTREAM_OVERFLOW, 0x80);
        assert_eq!(flags::DOWNSTREAM_CONNECTION_TERMINATION, 0x4000);
        assert_eq!(flags::UPSTREAM_RETRY_LIMIT_EXCEEDED, 0x8000);
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
