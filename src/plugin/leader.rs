//! The leader's duty: one root per Envoy holds the lease (see `lease`), polls the
//! registries, publishes snapshots to shared data, runs the active health checks and
//! turns ejections whose time is over half-open.

use super::Plugin;
use crate::envoy::Envoy;
use crate::health_check::{HealthChecker, Transition};
use crate::http_call::HttpRequest;
use crate::instance::State;
use crate::lease::{self, Decision, Lease};
use crate::poller::{Outcome, ServicePoller};
use crate::registrar::{Registrar, Who};
use crate::registry::HttpResponse;
use crate::rng::Rng;
use crate::snapshot::Snapshot;
use crate::stats::{Stat, Stats};
use std::collections::HashMap;

/// What an outstanding call was for.
#[derive(Clone, Debug)]
pub(super) enum Call {
    /// A registry call, for every `(service, source)` that was due with the very same
    /// request (made once, answered to each).
    Registry(Vec<(usize, usize)>),
    Health {
        service: usize,
        slot: u32,
    },
    /// The registrar's (see `plugin::register`).
    Register(Who),
}

pub(super) struct Leader {
    /// Set while this root holds the lease.
    pollers: Option<Vec<ServicePoller>>,
    pub(super) calls: HashMap<u32, Call>,
    /// The local instance's registration, while this root holds the lease.
    pub(super) registrar: Option<Registrar>,
    /// Active health checkers per service (None where not configured).
    checkers: Vec<Option<HealthChecker>>,
    lease_ttl_ms: u64,
}

impl Leader {
    pub fn new(lease_ttl_ms: u64) -> Leader {
        Leader {
            pollers: None,
            calls: HashMap::new(),
            registrar: None,
            checkers: Vec::new(),
            lease_ttl_ms,
        }
    }

    pub fn active(&self) -> bool {
        self.pollers.is_some()
    }
}

impl<H: Envoy> Plugin<H> {
    /// Tick duty: contend for the lease; while held, poll, publish, expire
    /// ejections and run health checks.
    pub(super) fn lead_and_poll(&mut self, now: u64) {
        let leading = self.lead(now);
        match (leading, self.leader.active()) {
            (true, false) => self.become_leader(now),
            (false, true) => {
                log::info!("registry-lb: this root no longer polls the registries");
                self.leader.pollers = None;
                self.leader.checkers.clear();
                self.leader.calls.clear();
                // The next leader registers the same id again (idempotent).
                self.leader.registrar = None;
            }
            _ => {}
        }
        if self.leader.active() {
            self.poll(now);
            self.publish(now);
            self.expire_outliers(now);
            self.check_health(now);
            self.register(now);
        }
    }

    /// Lease contention; returns whether this root polls this tick.
    fn lead(&mut self, now: u64) -> bool {
        let key = &self.keys.lease;
        let (value, cas) = self.host.shared_get(key);
        let read = match (&value, cas) {
            (Some(v), _) => Some(v.as_slice()),
            (None, Some(_)) => Some(&[][..]),
            (None, None) => None,
        };
        let ttl = self.leader.lease_ttl_ms;
        match lease::decide(self.me, read, now, ttl, self.serving) {
            Decision::Seed => {
                // The key is absent, so this write ignores CAS: claim the lease but
                // act only after seeing it still ours on the next tick.
                let mine = Lease {
                    owner: self.me,
                    expires_ms: now + ttl,
                    serving: self.serving,
                };
                let _ = self.host.shared_set(key, &mine.encode(), None);
                false
            }
            Decision::Follow => false,
            Decision::Write { lease, confirmed } => {
                let wrote = self.host.shared_set(key, &lease.encode(), cas).is_ok();
                wrote && confirmed
            }
        }
    }

    fn become_leader(&mut self, now: u64) {
        let cfg = self.cfg.clone();
        let mut pollers = Vec::with_capacity(cfg.services.len());
        // One random grid phase for all services: a fleet's polls spread over the
        // interval, one Envoy's services with the same interval are due together.
        let phase = self.rng.next_u64();
        for (i, svc) in cfg.services.iter().enumerate() {
            let mut p = ServicePoller::new(svc);
            p.set_phase(phase, now, &mut self.rng);
            if let (Some(bytes), _) = self.host.shared_get(&self.keys.snapshot[i]) {
                if let Ok(snap) = Snapshot::decode(&bytes) {
                    p.adopt(snap);
                }
            }
            pollers.push(p);
        }
        log::info!(
            "registry-lb: this {} now polls the registries for {} service(s)",
            if self.serving {
                "worker (it serves requests, so a root that serves none will take over)"
            } else {
                "root (it serves no requests: Envoy's main thread or an idle worker)"
            },
            pollers.len()
        );
        self.leader.checkers = cfg
            .services
            .iter()
            .zip(&pollers)
            .map(|(svc, p)| {
                svc.health_check.as_ref().map(|hc| {
                    let mut c = HealthChecker::new(hc.settings(&svc.name));
                    c.set_hosts(&check_targets(&p.current), now);
                    c
                })
            })
            .collect();
        self.leader.pollers = Some(pollers);
        if let Some(r) = &cfg.register {
            self.leader.registrar = Some(Registrar::new(r, now));
        }
    }

    /// Start the health checks that are due.
    fn check_health(&mut self, now: u64) {
        for (si, checker) in self.leader.checkers.iter_mut().enumerate() {
            let Some(c) = checker else { continue };
            for (slot, req) in c.due(now) {
                match self.host.dispatch(&req) {
                    Ok(token) => {
                        self.leader
                            .calls
                            .insert(token, Call::Health { service: si, slot });
                    }
                    Err(e) => {
                        log::error!(
                            "registry-lb: health check via cluster `{}` cannot be sent: {e}",
                            req.cluster
                        );
                        c.on_result(slot, 0, now);
                    }
                }
            }
        }
    }

    fn on_health_result(&mut self, si: usize, slot: u32, status: u16, now: u64) {
        let Some(Some(c)) = self.leader.checkers.get_mut(si) else {
            return;
        };
        let Some(t) = c.on_result(slot, status, now) else {
            return;
        };
        let unhealthy = c.unhealthy().count();
        let name = self.cfg.services[si].name.clone();
        let (healthy, what, stat) = match t {
            Transition::Down(_) => (false, "down", Stat::HealthCheckDown),
            Transition::Up(_) => (true, "up", Stat::HealthCheckUp),
        };
        self.update_outliers(si, now, |o| o.set_hc(slot, healthy));
        self.stats.inc(&self.host, &name, stat);
        self.stats
            .set(&self.host, &name, Stat::InstancesHcFailed, unhealthy as u64);
        log::warn!("registry-lb: service {name}: slot {slot} active health check {what} (last status {status})");
    }

    /// Dispatch the registry calls that are due. Identical calls due in the same tick
    /// (several services read from one Eureka `/apps`) are made once.
    fn poll(&mut self, now: u64) {
        let Some(pollers) = self.leader.pollers.as_mut() else {
            return;
        };
        let mut due: Vec<(HttpRequest, Vec<(usize, usize)>)> = Vec::new();
        for (si, p) in pollers.iter_mut().enumerate() {
            for (src, req) in p.due(now) {
                match due.iter_mut().find(|(r, _)| *r == req) {
                    Some((_, who)) => who.push((si, src)),
                    None => due.push((req, vec![(si, src)])),
                }
            }
        }
        for (req, who) in due {
            match self.host.dispatch(&req) {
                Ok(token) => {
                    self.leader.calls.insert(token, Call::Registry(who));
                }
                Err(e) => {
                    let why = format!("cannot call cluster `{}`: {e}", req.cluster);
                    for (si, src) in who {
                        let Some(p) = pollers.get_mut(si) else {
                            continue;
                        };
                        let out = p.dispatch_failed(src, now, &mut self.rng, why.clone());
                        let name = &self.cfg.services[si].name;
                        let at = (self.keys.error.get(si).map(String::as_str), now);
                        report(&mut self.stats, &self.host, name, src, &out, at);
                    }
                }
            }
        }
    }

    /// Publishes what the pollers have ready.
    fn publish(&mut self, now: u64) {
        let Some(mut pollers) = self.leader.pollers.take() else {
            return;
        };
        for (i, p) in pollers.iter_mut().enumerate() {
            self.publish_one(i, p, now);
        }
        self.leader.pollers = Some(pollers);
    }

    fn publish_one(&mut self, i: usize, p: &mut ServicePoller, now: u64) {
        let cfg = self.cfg.clone();
        let name = &cfg.services[i].name;
        self.stats
            .set(&self.host, name, Stat::SnapshotAgeMs, p.age_ms(now));
        let publication = p.publication(now);
        for (event, message) in p.guard_events.drain(..) {
            if let Some(s) = Stat::named(event) {
                self.stats.inc(&self.host, name, s);
            }
            log::warn!("registry-lb: service {name}: {message}");
        }
        let Some(snap) = publication else { return };
        let _ = self.seed_outliers(i);
        let key = &self.keys.snapshot[i];
        let (current, cas) = self.host.shared_get(key);
        // Only the header is read unless another poller published first.
        let newer = current
            .as_deref()
            .filter(|b| Snapshot::peek_version(b).is_some_and(|v| v >= snap.version))
            .and_then(|b| Snapshot::decode(b).ok());
        if let Some(cur) = newer {
            log::warn!(
                "registry-lb: service {name}: another poller published version {} first; adopting it",
                cur.version
            );
            p.adopt(cur);
            return;
        }
        let bytes = snap.encode();
        if let Err(e) = self.host.shared_set(key, &bytes, cas) {
            log::warn!("registry-lb: service {name}: snapshot write failed ({e}); retrying on the next change");
            return;
        }
        let _ = self
            .host
            .shared_set(&self.keys.version[i], &snap.version.to_le_bytes(), None);
        let healthy = snap
            .entries
            .iter()
            .filter(|e| e.instance.state == State::Healthy)
            .count();
        let h = &self.host;
        self.stats
            .set(h, name, Stat::InstancesKnown, snap.entries.len() as u64);
        self.stats
            .set(h, name, Stat::InstancesHealthy, healthy as u64);
        self.stats
            .set(h, name, Stat::SnapshotBytes, bytes.len() as u64);
        self.stats.set(h, name, Stat::SnapshotVersion, snap.version);
        self.stats.inc(h, name, Stat::SnapshotPublished);
        log::info!(
            "registry-lb: service {name}: published snapshot version {} with {} instance(s), {healthy} healthy ({} bytes)",
            snap.version,
            snap.entries.len(),
            bytes.len()
        );
        let live: std::collections::HashSet<u32> = snap.entries.iter().map(|e| e.slot).collect();
        if let Some(Some(c)) = self.leader.checkers.get_mut(i) {
            c.set_hosts(&check_targets(&snap), now);
        }
        p.published(snap);
        if self.outliers_on(i) {
            self.update_outliers(i, now, |o| o.retain(|slot| live.contains(&slot)));
        }
    }

    /// Ejections whose time is over become half-open.
    fn expire_outliers(&mut self, now: u64) {
        let cfg = self.cfg.clone();
        for (i, svc) in cfg.services.iter().enumerate() {
            if svc.outlier_detection.consecutive_5xx == 0 {
                continue;
            }
            let trial_timeout = svc.request_timeout.0.max(30_000);
            self.update_outliers(i, now, |o| o.expire(now, trial_timeout));
        }
    }

    /// The answer to a registry or health-check call.
    pub fn on_call_answer(&mut self, token: u32, num_headers: usize, body_size: usize) {
        let Some(call) = self.leader.calls.remove(&token) else {
            return;
        };
        let started_us = self.host.now_us();
        let now = started_us / 1000;
        let who = match call {
            Call::Registry(who) => who,
            Call::Health { service, slot } => {
                let a = self.host.call_answer(num_headers, 0, 0);
                self.on_health_result(service, slot, status_of(&a.headers), now);
                return;
            }
            Call::Register(who) => {
                self.on_register_answer(who, num_headers, body_size, now);
                return;
            }
        };
        let cfg = self.cfg.clone();
        // The body is read once, up to the largest limit among the services it is for.
        let max = who
            .iter()
            .filter_map(|&(si, _)| cfg.services.get(si))
            .map(|s| s.max_response_bytes)
            .max()
            .unwrap_or(0);
        // No headers means a reset or an answer Envoy would not buffer (over its own
        // 32 MiB limit): the header map is then not read.
        let answer = self.host.call_answer(num_headers, body_size, max);
        let copied_us = self.host.now_us();
        for (si, src) in who {
            let Some(svc) = cfg.services.get(si) else {
                continue;
            };
            let Some(mut pollers) = self.leader.pollers.take() else {
                return;
            };
            let Some(p) = pollers.get_mut(si) else {
                self.leader.pollers = Some(pollers);
                continue;
            };
            let name = &svc.name;
            let begin_us = self.host.now_us();
            let out = if num_headers == 0 {
                p.dispatch_failed(
                    src,
                    now,
                    &mut self.rng,
                    "call reset, or answer too large for Envoy to buffer".into(),
                )
            } else if body_size > svc.max_response_bytes {
                p.answer_too_large(src, now, &mut self.rng, body_size)
            } else {
                p.on_response(
                    src,
                    &HttpResponse {
                        status: status_of(&answer.headers),
                        headers: &answer.headers,
                        body: &answer.body,
                    },
                    now,
                    &mut self.rng,
                )
            };
            let at = (self.keys.error.get(si).map(String::as_str), now);
            report(&mut self.stats, &self.host, name, src, &out, at);
            let parsed_us = self.host.now_us();
            // Publishing at once saves a tick; calls are only ever dispatched from on_tick.
            self.publish_one(si, p, now);
            self.leader.pollers = Some(pollers);
            // This thread's time on the answer for this service: copying the body in
            // (once per call), parsing, publishing.
            let done_us = self.host.now_us();
            let took_us = done_us.saturating_sub(begin_us) + copied_us.saturating_sub(started_us);
            self.stats
                .set(&self.host, name, Stat::RefreshLastUs, took_us);
            self.stats
                .add(&self.host, name, Stat::RefreshTotalUs, took_us as i64);
            log::debug!(
                "registry-lb: service {name}: source {src}: answer of {body_size} bytes handled in {took_us} us ({}): copy {} us, parse {} us, publish {} us",
                out.kind(),
                copied_us.saturating_sub(started_us),
                parsed_us.saturating_sub(begin_us),
                done_us.saturating_sub(parsed_us),
            );
        }
    }
}

/// `:status` of an answer; 0 when absent (a reset).
pub(super) fn status_of(headers: &[(String, String)]) -> u16 {
    headers
        .iter()
        .find(|(k, _)| k == ":status")
        .and_then(|(_, v)| v.parse::<u16>().ok())
        .unwrap_or(0)
}

/// Instances to health-check: every non-draining one, by slot.
fn check_targets(snap: &Snapshot) -> Vec<(u32, String)> {
    snap.entries
        .iter()
        .filter(|e| e.instance.state != State::Draining)
        .map(|e| (e.slot, e.instance.addr.to_string()))
        .collect()
}

/// Logs and counts one refresh outcome; a failure is also kept, with its time
/// (`at`: the service's shared-data key and now), for the status view.
fn report(
    m: &mut Stats,
    host: &impl Envoy,
    service: &str,
    source: usize,
    out: &Outcome,
    at: (Option<&str>, u64),
) {
    match out {
        Outcome::Unchanged => m.inc(host, service, Stat::RefreshUnchanged),
        Outcome::Again(why) => {
            if let Some(s) = Stat::registry(why) {
                m.inc(host, service, s);
            }
        }
        Outcome::Updated { rejected, warnings } => {
            m.inc(host, service, Stat::RefreshOk);
            if !warnings.is_empty() {
                m.add(host, service, Stat::RegistryWarning, warnings.len() as i64);
                for w in warnings {
                    log::warn!(
                        "registry-lb: service {service}: source {source}: registry warning: {w}"
                    );
                }
            }
            if !rejected.is_empty() {
                m.add(
                    host,
                    service,
                    Stat::InstancesRejected,
                    rejected.len() as i64,
                );
                for r in rejected.iter().take(5) {
                    log::warn!(
                        "registry-lb: service {service}: source {source}: instance skipped: {r}"
                    );
                }
                if rejected.len() > 5 {
                    log::warn!(
                        "registry-lb: service {service}: source {source}: {} more instance(s) skipped",
                        rejected.len() - 5
                    );
                }
            }
        }
        Outcome::Failed(e) => {
            m.inc(host, service, Stat::RefreshFailed);
            if let (Some(key), now) = at {
                let text = format!("{now} source {source}: {e}");
                let _ = host.shared_set(key, text.as_bytes(), None);
            }
            if let Some(s) = Stat::refresh_failed(e.kind()) {
                m.inc(host, service, s);
            }
            log::warn!("registry-lb: service {service}: source {source}: refresh failed, keeping the last good instances: {e}");
        }
    }
}
