//! One registry poller per Envoy: a lease held in shared data.
//!
//! Every root context ticks (one per worker plus the main thread), so each one
//! contends for a lease `owner:expiry` written with compare-and-swap. The holder
//! renews it on every tick; when it stops (VM gone, worker stuck), the lease
//! expires after `ttl` and another root takes over. A root acts as leader only
//! after it has seen its own lease on a read that followed its write: a write to an
//! absent key ignores CAS, so two roots can both "win" the very first race; the
//! loser sees the other's value on its next tick and never polls.
//!
//! Parsing a large registry answer takes tens of milliseconds, and a worker that
//! polls stalls its own requests for that long. So a root that has served requests
//! marks its lease `serving`, and a root that has not (Envoy's main thread, where no
//! request ever runs) takes over a live `serving` lease at once. Roots of one kind
//! never take a live lease from each other, so the lease moves at most once to the
//! main thread and stays there.

/// Decoded lease value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    pub owner: u64,
    pub expires_ms: u64,
    /// The holder serves requests (it is a worker that has had traffic).
    pub serving: bool,
}

impl Lease {
    pub fn encode(&self) -> Vec<u8> {
        let s = if self.serving { ":s" } else { "" };
        format!("{:016x}:{}{s}", self.owner, self.expires_ms).into_bytes()
    }

    pub fn decode(b: &[u8]) -> Option<Lease> {
        let s = std::str::from_utf8(b).ok()?;
        let (o, rest) = s.split_once(':')?;
        let (e, serving) = match rest.split_once(':') {
            Some((e, "s")) => (e, true),
            Some(_) => return None,
            None => (rest, false),
        };
        Some(Lease {
            owner: u64::from_str_radix(o, 16).ok()?,
            expires_ms: e.parse().ok()?,
            serving,
        })
    }
}

/// What a root context should do this tick, given the value it read.
#[derive(Debug, PartialEq, Eq)]
pub enum Decision {
    /// The key does not exist yet: create it empty (then contend on the next tick).
    Seed,
    /// Write this lease with the CAS from the read. `confirmed`: the read already
    /// showed us as owner, so we are the leader for this tick.
    Write { lease: Lease, confirmed: bool },
    /// Someone else holds a live lease.
    Follow,
}

/// `serving`: this root has served requests.
pub fn decide(me: u64, read: Option<&[u8]>, now_ms: u64, ttl_ms: u64, serving: bool) -> Decision {
    let Some(bytes) = read else {
        return Decision::Seed;
    };
    let mine = Lease {
        owner: me,
        expires_ms: now_ms + ttl_ms,
        serving,
    };
    match Lease::decode(bytes) {
        Some(l) if l.owner == me => Decision::Write {
            lease: mine,
            confirmed: true,
        },
        // Live: follow, unless it is held by a serving root and this one serves none.
        Some(l) if l.expires_ms > now_ms && (serving || !l.serving) => Decision::Follow,
        // Expired, empty (seeded) or unreadable: take it.
        _ => Decision::Write {
            lease: mine,
            confirmed: false,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wasm_bindgen_test::wasm_bindgen_test;

    #[wasm_bindgen_test(unsupported = test)]
    fn codec_round_trip_and_garbage() {
        for serving in [false, true] {
            let l = Lease {
                owner: 0xdead_beef,
                expires_ms: 1234,
                serving,
            };
            assert_eq!(Lease::decode(&l.encode()), Some(l));
        }
        assert_eq!(
            Lease::decode(b"00000000deadbeef:1234:x"),
            None,
            "unknown flag"
        );
        assert_eq!(Lease::decode(b""), None);
        assert_eq!(Lease::decode(b"zz:1"), None);
        assert_eq!(Lease::decode(&[0xff, 0x3a]), None);
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn election_sequence() {
        assert_eq!(decide(1, None, 0, 1000, false), Decision::Seed);
        // Seeded (empty): take it, unconfirmed.
        let d = decide(1, Some(b""), 10, 1000, false);
        assert_eq!(
            d,
            Decision::Write {
                lease: Lease {
                    owner: 1,
                    expires_ms: 1010,
                    serving: false
                },
                confirmed: false
            }
        );
        let held = Lease {
            owner: 1,
            expires_ms: 1010,
            serving: false,
        }
        .encode();
        // The owner confirms; others follow while it is live.
        assert!(matches!(
            decide(1, Some(&held), 60, 1000, false),
            Decision::Write {
                confirmed: true,
                ..
            }
        ));
        assert_eq!(decide(2, Some(&held), 60, 1000, false), Decision::Follow);
        assert_eq!(decide(2, Some(&held), 60, 1000, true), Decision::Follow);
        // After expiry another root takes over.
        assert!(matches!(
            decide(2, Some(&held), 1011, 1000, true),
            Decision::Write {
                confirmed: false,
                ..
            }
        ));
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn a_root_without_requests_takes_over_from_a_serving_one_once() {
        let worker = Lease {
            owner: 7,
            expires_ms: 5000,
            serving: true,
        }
        .encode();
        // Another worker follows the live lease; the main thread's root takes it.
        assert_eq!(decide(8, Some(&worker), 100, 1000, true), Decision::Follow);
        let d = decide(1, Some(&worker), 100, 1000, false);
        assert_eq!(
            d,
            Decision::Write {
                lease: Lease {
                    owner: 1,
                    expires_ms: 1100,
                    serving: false
                },
                confirmed: false
            }
        );
        let main = Lease {
            owner: 1,
            expires_ms: 1100,
            serving: false,
        }
        .encode();
        // From then on nobody takes it while it is live: not the old holder, not
        // another root that serves no requests (an idle worker).
        assert_eq!(decide(7, Some(&main), 150, 1000, true), Decision::Follow);
        assert_eq!(decide(9, Some(&main), 150, 1000, false), Decision::Follow);
        assert!(matches!(
            decide(1, Some(&main), 150, 1000, false),
            Decision::Write {
                confirmed: true,
                ..
            }
        ));
    }
}
