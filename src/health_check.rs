//! `health_check`: active HTTP health checks of every instance, from the one poller
//! per Envoy.
//!
//! Reference: Envoy's HTTP health checker (`interval`, `timeout`,
//! `healthy_threshold`, `unhealthy_threshold`, expected statuses 200–399 here).
//! Instances start healthy — the registry already vouches for them — and turn
//! unhealthy after `unhealthy_threshold` failed checks in a row, healthy again after
//! `healthy_threshold` good ones. Checks of one round are spread over the interval
//! and at most `max_in_flight` run at once, so 10,000 instances do not burst.
//! Left out: TCP/gRPC checks, jitter per host, `no_traffic_interval`.

use crate::http_call::HttpRequest;
use std::collections::HashMap;

#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    pub cluster: String,
    pub authority: String,
    pub path: String,
    pub header: String,
    pub interval_ms: u64,
    pub timeout_ms: u64,
    pub healthy_threshold: u32,
    pub unhealthy_threshold: u32,
    pub max_in_flight: usize,
}

#[derive(Debug, Clone, Default)]
struct Host {
    healthy: bool,
    run: u32,
    next_due_ms: u64,
    in_flight: bool,
}

#[derive(Debug)]
pub struct HealthChecker {
    s: Settings,
    hosts: HashMap<u32, (String, Host)>,
    in_flight: usize,
}

/// A change of an instance's active health.
#[derive(Debug, PartialEq, Eq)]
pub enum Transition {
    Down(u32),
    Up(u32),
}

impl HealthChecker {
    pub fn new(s: Settings) -> HealthChecker {
        HealthChecker {
            s,
            hosts: HashMap::new(),
            in_flight: 0,
        }
    }

    /// Follows the snapshot: new instances are checked soon (spread over one
    /// interval by slot), removed ones forgotten.
    pub fn set_hosts(&mut self, hosts: &[(u32, String)], now_ms: u64) {
        let interval = self.s.interval_ms.max(1);
        let mut next: HashMap<u32, (String, Host)> = HashMap::with_capacity(hosts.len());
        for (slot, addr) in hosts {
            let entry = match self.hosts.remove(slot) {
                Some((old, h)) if &old == addr => (old, h),
                _ => {
                    let offset = (u64::from(*slot) * 7919) % interval;
                    (
                        addr.clone(),
                        Host {
                            healthy: true,
                            run: 0,
                            next_due_ms: now_ms + offset,
                            in_flight: false,
                        },
                    )
                }
            };
            next.insert(*slot, entry);
        }
        self.in_flight = next.values().filter(|(_, h)| h.in_flight).count();
        self.hosts = next;
    }

    /// Checks to start now: (slot, call).
    pub fn due(&mut self, now_ms: u64) -> Vec<(u32, HttpRequest)> {
        let mut out = Vec::new();
        let mut due: Vec<u32> = self
            .hosts
            .iter()
            .filter(|(_, (_, h))| !h.in_flight && h.next_due_ms <= now_ms)
            .map(|(s, _)| *s)
            .collect();
        due.sort_unstable();
        for slot in due {
            if self.in_flight >= self.s.max_in_flight {
                break;
            }
            let Some((addr, h)) = self.hosts.get_mut(&slot) else {
                continue;
            };
            h.in_flight = true;
            self.in_flight += 1;
            out.push((
                slot,
                HttpRequest {
                    cluster: self.s.cluster.clone(),
                    method: "GET",
                    authority: self.s.authority.clone(),
                    path: self.s.path.clone(),
                    headers: vec![(self.s.header.clone(), addr.clone())],
                    body: Vec::new(),
                    timeout_ms: self.s.timeout_ms,
                },
            ));
        }
        out
    }

    /// Result of a check: `status` 0 for no answer (connect failure, reset, timeout).
    pub fn on_result(&mut self, slot: u32, status: u16, now_ms: u64) -> Option<Transition> {
        let (_, h) = self.hosts.get_mut(&slot)?;
        if h.in_flight {
            h.in_flight = false;
            self.in_flight = self.in_flight.saturating_sub(1);
        }
        h.next_due_ms = now_ms + self.s.interval_ms;
        let ok = (200..400).contains(&status);
        if ok == h.healthy {
            h.run = 0;
            return None;
        }
        h.run += 1;
        let needed = if h.healthy {
            self.s.unhealthy_threshold
        } else {
            self.s.healthy_threshold
        };
        if h.run < needed.max(1) {
            return None;
        }
        h.healthy = ok;
        h.run = 0;
        Some(if ok {
            Transition::Up(slot)
        } else {
            Transition::Down(slot)
        })
    }

    pub fn unhealthy(&self) -> impl Iterator<Item = u32> + '_ {
        self.hosts
            .iter()
            .filter(|(_, (_, h))| !h.healthy)
            .map(|(s, _)| *s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wasm_bindgen_test::wasm_bindgen_test;

    fn checker(max_in_flight: usize) -> HealthChecker {
        HealthChecker::new(Settings {
            cluster: "registry_lb_health".into(),
            authority: "web".into(),
            path: "/healthz".into(),
            header: "x-envoy-original-dst-host".into(),
            interval_ms: 1000,
            timeout_ms: 500,
            healthy_threshold: 2,
            unhealthy_threshold: 3,
            max_in_flight,
        })
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn checks_carry_the_instance_address() {
        let mut c = checker(8);
        c.set_hosts(&[(0, "10.0.0.1:80".into())], 0);
        let calls = c.due(1000);
        assert_eq!(calls.len(), 1);
        assert_eq!(calls[0].1.path, "/healthz");
        assert_eq!(
            calls[0].1.headers,
            [(
                "x-envoy-original-dst-host".to_string(),
                "10.0.0.1:80".to_string()
            )]
        );
        assert!(c.due(1000).is_empty(), "one check per host at a time");
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn thresholds_decide_transitions() {
        let mut c = checker(8);
        c.set_hosts(&[(4, "10.0.0.1:80".into())], 0);
        let mut t = 0;
        let mut run = |c: &mut HealthChecker, status: u16| {
            t += 1000;
            assert_eq!(c.due(t).len(), 1);
            c.on_result(4, status, t)
        };
        assert_eq!(run(&mut c, 503), None);
        assert_eq!(run(&mut c, 0), None);
        assert_eq!(run(&mut c, 200), None, "a success breaks the run");
        assert_eq!(run(&mut c, 503), None);
        assert_eq!(run(&mut c, 503), None);
        assert_eq!(run(&mut c, 503), Some(Transition::Down(4)));
        assert_eq!(c.unhealthy().collect::<Vec<_>>(), [4]);
        assert_eq!(run(&mut c, 204), None);
        assert_eq!(run(&mut c, 301), Some(Transition::Up(4)));
        assert_eq!(c.unhealthy().count(), 0);
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn concurrency_is_bounded_and_rounds_are_spread() {
        let mut c = checker(10);
        let hosts: Vec<(u32, String)> = (0..1000)
            .map(|i| (i, format!("10.0.{}.{}:80", i / 250, i % 250)))
            .collect();
        c.set_hosts(&hosts, 0);
        let first = c.due(0);
        assert!(first.len() <= 10);
        // Spread: only a fraction is due at any one instant.
        let mut c2 = checker(10_000);
        c2.set_hosts(&hosts, 0);
        let early = c2.due(10).len();
        assert!(early < 100, "{early} of 1000 due in the first 10 ms");
        let rest = c2.due(1000).len();
        assert_eq!(early + rest, 1000, "every host checked within one interval");
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn replaced_and_removed_hosts_are_forgotten() {
        let mut c = checker(8);
        c.set_hosts(&[(1, "10.0.0.1:80".into())], 0);
        let calls = c.due(5000);
        c.on_result(1, 503, 5000);
        c.set_hosts(&[(1, "10.0.0.9:80".into())], 6000);
        assert_eq!(
            c.hosts[&1].1.run, 0,
            "a new address in the slot starts fresh"
        );
        c.set_hosts(&[], 7000);
        assert!(c.due(99_999).is_empty());
        assert_eq!(calls.len(), 1);
    }
}
