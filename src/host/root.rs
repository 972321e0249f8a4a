//! Root context: one per VM (each worker, plus the main thread). Every root keeps
//! its worker's routing tables current from shared data; the one root holding the
//! lease also polls the registries and publishes snapshots.

use super::http::Http;
use super::metrics::Metrics;
use super::worker::{Keys, Worker};
use super::{now_ms, now_us, shared};
use crate::config::PluginConfig;
use crate::health_check::{HealthChecker, Transition};
use crate::lease::{self, Decision, Lease};
use crate::poller::{Outcome, ServicePoller};
use crate::registry::HttpResponse;
use crate::snapshot::Snapshot;
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{BufferType, ContextType, MapType};
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::rc::Rc;
use std::time::Duration;

/// What an outstanding `dispatch_http_call` was for.
#[derive(Clone, Copy)]
enum Call {
    Registry { service: usize, source: usize },
    Health { service: usize, slot: u32 },
}

pub struct Root {
    me: u64,
    worker: Option<Rc<RefCell<Worker>>>,
    pollers: Option<Vec<ServicePoller>>,
    calls: HashMap<u32, Call>,
    /// Leader only: active health checkers per service (None where not configured).
    checkers: Vec<Option<HealthChecker>>,
    lease_ttl_ms: u64,
    /// This root's VM has served requests (a worker with traffic): it yields the
    /// lease to one that has not (see `lease`).
    serving: Cell<bool>,
}

impl Root {
    pub fn new() -> Root {
        // Entropy from the host (WASI random_get behind RandomState) and the clock.
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(now_ms());
        Root {
            me: h.finish() | 1,
            worker: None,
            pollers: None,
            calls: HashMap::new(),
            checkers: Vec::new(),
            lease_ttl_ms: 0,
            serving: Cell::new(false),
        }
    }

    fn configure(&mut self, bytes: &[u8]) -> Result<(), String> {
        let cfg = PluginConfig::parse(bytes).map_err(|e| e.to_string())?;
        let mut h = fnv::FnvHasher::default();
        h.write(bytes);
        let ns = format!("registry_lb.{:016x}", h.finish());
        let keys = Keys {
            lease: format!("{ns}.lease"),
            snapshot: cfg
                .services
                .iter()
                .map(|s| format!("{ns}.{}.snapshot", s.name))
                .collect(),
            version: cfg
                .services
                .iter()
                .map(|s| format!("{ns}.{}.version", s.name))
                .collect(),
            outliers: cfg
                .services
                .iter()
                .map(|s| format!("{ns}.{}.outliers", s.name))
                .collect(),
        };
        self.lease_ttl_ms = (cfg.tick.0 * 20).max(1000);
        self.worker = Some(Rc::new(RefCell::new(Worker::new(cfg, keys, self.me))));
        Ok(())
    }

    /// Lease contention; returns whether this root polls this tick.
    fn lead(&mut self, now: u64) -> bool {
        let Some(worker) = &self.worker else {
            return false;
        };
        let key = worker.borrow().keys.lease.clone();
        let (value, cas) = shared::get(&key);
        let read = match (&value, cas) {
            (Some(v), _) => Some(v.as_slice()),
            (None, Some(_)) => Some(&[][..]),
            (None, None) => None,
        };
        let serving = self.serving.get();
        match lease::decide(self.me, read, now, self.lease_ttl_ms, serving) {
            Decision::Seed => {
                // The key is absent, so this write ignores CAS: claim the lease but
                // act only after seeing it still ours on the next tick.
                let mine = Lease {
                    owner: self.me,
                    expires_ms: now + self.lease_ttl_ms,
                    serving,
                };
                let _ = shared::set(&key, &mine.encode(), None);
                false
            }
            Decision::Follow => false,
            Decision::Write { lease, confirmed } => {
                let wrote = shared::set(&key, &lease.encode(), cas).is_ok();
                wrote && confirmed
            }
        }
    }

    fn become_leader(&mut self) {
        let Some(worker) = &self.worker else { return };
        let w = worker.borrow();
        let keys = &w.keys;
        let mut pollers = Vec::with_capacity(w.cfg.services.len());
        for (i, svc) in w.cfg.services.iter().enumerate() {
            let mut p = ServicePoller::new(svc);
            if let (Some(bytes), _) = shared::get(&keys.snapshot[i]) {
                if let Ok(snap) = Snapshot::decode(&bytes) {
                    p.adopt(snap);
                }
            }
            pollers.push(p);
        }
        log::info!(
            "registry-lb: this {} now polls the registries for {} service(s)",
            if self.serving.get() {
                "worker (it serves requests, so a root that serves none will take over)"
            } else {
                "root (it serves no requests: Envoy's main thread or an idle worker)"
            },
            pollers.len()
        );
        let now = now_ms();
        self.checkers = w
            .cfg
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
        drop(w);
        self.pollers = Some(pollers);
    }

    /// Leader duty: start the health checks that are due.
    fn check_health(&mut self, now: u64) {
        for (si, checker) in self.checkers.iter_mut().enumerate() {
            let Some(c) = checker else { continue };
            for (slot, req) in c.due(now) {
                match dispatch(&req) {
                    Ok(token) => {
                        self.calls.insert(token, Call::Health { service: si, slot });
                    }
                    Err(e) => {
                        log::error!(
                            "registry-lb: health check via cluster `{}` cannot be sent: {e:?}",
                            req.cluster
                        );
                        c.on_result(slot, 0, now);
                    }
                }
            }
        }
    }

    fn on_health_result(&mut self, si: usize, slot: u32, status: u16, now: u64) {
        let Some(Some(c)) = self.checkers.get_mut(si) else {
            return;
        };
        let Some(t) = c.on_result(slot, status, now) else {
            return;
        };
        let Some(worker) = &self.worker else { return };
        let mut w = worker.borrow_mut();
        let name = w.cfg.services[si].name.clone();
        let (healthy, what) = match t {
            Transition::Down(_) => (false, "down"),
            Transition::Up(_) => (true, "up"),
        };
        w.update_outliers(si, |o| o.set_hc(slot, healthy));
        w.metrics.inc(&format!("{name}.health_check_{what}"));
        let unhealthy = c.unhealthy().count();
        w.metrics
            .gauge_set(&format!("{name}.instances_hc_failed"), unhealthy as u64);
        log::warn!("registry-lb: service {name}: slot {slot} active health check {what} (last status {status})");
    }

    fn poll(&mut self, now: u64) {
        let (Some(pollers), Some(worker)) = (&mut self.pollers, &self.worker) else {
            return;
        };
        let mut w = worker.borrow_mut();
        for (si, p) in pollers.iter_mut().enumerate() {
            for (src, req) in p.due(now) {
                match dispatch(&req) {
                    Ok(token) => {
                        self.calls.insert(
                            token,
                            Call::Registry {
                                service: si,
                                source: src,
                            },
                        );
                    }
                    Err(e) => {
                        let name = w.cfg.services[si].name.clone();
                        let why = format!("cannot call cluster `{}`: {e:?}", req.cluster);
                        let out = p.dispatch_failed(src, now, &mut w.rng, why);
                        report(&mut w.metrics, &name, src, &out);
                    }
                }
            }
        }
    }

    /// Publishes what the pollers have ready; returns whether anything was written.
    fn publish(&mut self, now: u64) {
        let (Some(pollers), Some(worker)) = (&mut self.pollers, &self.worker) else {
            return;
        };
        let mut guard = worker.borrow_mut();
        let w = &mut *guard;
        let (snapshot_keys, version_keys) = (w.keys.snapshot.clone(), w.keys.version.clone());
        for (i, p) in pollers.iter_mut().enumerate() {
            let name = w.cfg.services[i].name.clone();
            w.metrics
                .gauge_set(&format!("{name}.snapshot_age_ms"), p.age_ms(now));
            let publication = p.publication(now);
            for (event, message) in p.guard_events.drain(..) {
                w.metrics.inc(&format!("{name}.{event}"));
                log::warn!("registry-lb: service {name}: {message}");
            }
            let Some(snap) = publication else { continue };
            let _ = w.seed_outliers(i);
            let (current, cas) = shared::get(&snapshot_keys[i]);
            // Only the header is read unless another poller published first.
            let newer = current
                .as_deref()
                .filter(|b| Snapshot::peek_version(b).is_some_and(|v| v >= snap.version))
                .and_then(|b| Snapshot::decode(b).ok());
            if let Some(cur) = newer {
                log::warn!("registry-lb: service {name}: another poller published version {} first; adopting it", cur.version);
                p.adopt(cur);
                continue;
            }
            let bytes = snap.encode();
            if let Err(e) = shared::set(&snapshot_keys[i], &bytes, cas) {
                log::warn!("registry-lb: service {name}: snapshot write failed ({e:?}); retrying on the next change");
                continue;
            }
            let _ = shared::set(&version_keys[i], &snap.version.to_le_bytes(), None);
            let healthy = snap
                .entries
                .iter()
                .filter(|e| e.instance.state == crate::instance::State::Healthy)
                .count();
            w.metrics.gauge_set(
                &format!("{name}.instances_known"),
                snap.entries.len() as u64,
            );
            w.metrics
                .gauge_set(&format!("{name}.instances_healthy"), healthy as u64);
            w.metrics
                .gauge_set(&format!("{name}.snapshot_bytes"), bytes.len() as u64);
            w.metrics
                .gauge_set(&format!("{name}.snapshot_version"), snap.version);
            w.metrics.inc(&format!("{name}.snapshot_published"));
            log::info!(
                "registry-lb: service {name}: published snapshot version {} with {} instance(s), {healthy} healthy ({} bytes)",
                snap.version,
                snap.entries.len(),
                bytes.len()
            );
            let live: std::collections::HashSet<u32> =
                snap.entries.iter().map(|e| e.slot).collect();
            if let Some(Some(c)) = self.checkers.get_mut(i) {
                c.set_hosts(&check_targets(&snap), now);
            }
            p.published(snap);
            if w.cfg.services[i].outlier_detection.consecutive_5xx > 0
                || w.cfg.services[i].health_check.is_some()
            {
                w.update_outliers(i, |o| o.retain(|slot| live.contains(&slot)));
            }
        }
    }

    /// Leader duty: ejections whose time is over become half-open.
    fn expire_outliers(&mut self, now: u64) {
        let Some(worker) = &self.worker else { return };
        let mut w = worker.borrow_mut();
        for i in 0..w.cfg.services.len() {
            let svc = &w.cfg.services[i];
            if svc.outlier_detection.consecutive_5xx == 0 {
                continue;
            }
            let trial_timeout = svc.request_timeout.0.max(30_000);
            w.update_outliers(i, |o| o.expire(now, trial_timeout));
        }
    }
}

/// Sends a call to an Envoy cluster; returns its token.
fn dispatch(req: &crate::registry::HttpRequest) -> Result<u32, proxy_wasm::types::Status> {
    let mut headers: Vec<(&str, &str)> = vec![
        (":method", req.method),
        (":path", &req.path),
        (":authority", &req.authority),
    ];
    headers.extend(req.headers.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    let body = if req.body.is_empty() {
        None
    } else {
        Some(req.body.as_slice())
    };
    hostcalls::dispatch_http_call(
        &req.cluster,
        headers,
        body,
        vec![],
        Duration::from_millis(req.timeout_ms),
    )
}

/// Instances to health-check: every non-draining one, by slot.
fn check_targets(snap: &Snapshot) -> Vec<(u32, String)> {
    snap.entries
        .iter()
        .filter(|e| e.instance.state != crate::instance::State::Draining)
        .map(|e| (e.slot, e.instance.addr.to_string()))
        .collect()
}

/// Logs and counts one refresh outcome.
fn report(m: &mut Metrics, service: &str, source: usize, out: &Outcome) {
    match out {
        Outcome::Unchanged => m.inc(&format!("{service}.refresh_unchanged")),
        Outcome::Again(why) => m.inc(&format!("{service}.registry_{why}")),
        Outcome::Updated { rejected, warnings } => {
            m.inc(&format!("{service}.refresh_ok"));
            if !warnings.is_empty() {
                m.add(
                    &format!("{service}.registry_warning"),
                    warnings.len() as i64,
                );
                for w in warnings {
                    log::warn!(
                        "registry-lb: service {service}: source {source}: registry warning: {w}"
                    );
                }
            }
            if !rejected.is_empty() {
                m.add(
                    &format!("{service}.instances_rejected"),
                    rejected.len() as i64,
                );
                for r in rejected.iter().take(5) {
                    log::warn!(
                        "registry-lb: service {service}: source {source}: instance skipped: {r}"
                    );
                }
                if rejected.len() > 5 {
                    log::warn!("registry-lb: service {service}: source {source}: {} more instance(s) skipped", rejected.len() - 5);
                }
            }
        }
        Outcome::Failed(e) => {
            m.inc(&format!("{service}.refresh_failed"));
            m.inc(&format!("{service}.refresh_failed_{}", e.kind()));
            log::warn!("registry-lb: service {service}: source {source}: refresh failed, keeping the last good instances: {e}");
        }
    }
}

impl Context for Root {
    fn on_http_call_response(
        &mut self,
        token: u32,
        num_headers: usize,
        body_size: usize,
        _trailers: usize,
    ) {
        let Some(call) = self.calls.remove(&token) else {
            return;
        };
        let started_us = now_us();
        let now = (started_us / 1000) as u64;
        // No headers means a reset or an oversized body: reading the header map then
        // would fail, so it is not read (status 0).
        let headers: Vec<(String, String)> = if num_headers == 0 {
            Vec::new()
        } else {
            hostcalls::get_map(MapType::HttpCallResponseHeaders).unwrap_or_default()
        };
        let status = headers
            .iter()
            .find(|(k, _)| k == ":status")
            .and_then(|(_, v)| v.parse::<u16>().ok())
            .unwrap_or(0);
        let (si, src) = match call {
            Call::Registry { service, source } => (service, source),
            Call::Health { service, slot } => {
                self.on_health_result(service, slot, status, now);
                return;
            }
        };
        let (Some(pollers), Some(worker)) = (&mut self.pollers, &self.worker) else {
            return;
        };
        let Some(p) = pollers.get_mut(si) else { return };
        let mut w = worker.borrow_mut();
        let max = w.cfg.services[si].max_response_bytes;
        let body: Vec<u8> = if body_size == 0 || body_size > max {
            Vec::new()
        } else {
            hostcalls::get_buffer(BufferType::HttpCallResponseBody, 0, body_size)
                .ok()
                .flatten()
                .unwrap_or_default()
        };
        let name = w.cfg.services[si].name.clone();
        let copied_us = now_us();
        let out = if num_headers == 0 {
            p.dispatch_failed(
                src,
                now,
                &mut w.rng,
                "call reset or answer over 32 MiB".into(),
            )
        } else if body_size > max {
            p.dispatch_failed(
                src,
                now,
                &mut w.rng,
                format!("answer of {body_size} bytes is over max_response_bytes"),
            )
        } else {
            let mut rng = w.rng.clone();
            let out = p.on_response(
                src,
                &HttpResponse {
                    status,
                    headers: &headers,
                    body: &body,
                },
                now,
                &mut rng,
            );
            w.rng = rng;
            out
        };
        report(&mut w.metrics, &name, src, &out);
        drop(w);
        let parsed_us = now_us();
        // Publishing at once saves a tick; calls are only ever dispatched from on_tick.
        self.publish(now);
        // This thread's time on the answer: copying the body in, parsing, publishing.
        let done_us = now_us();
        let took_us = done_us.saturating_sub(started_us) as u64;
        if let Some(w) = &self.worker {
            let mut w = w.borrow_mut();
            w.metrics
                .gauge_set(&format!("{name}.refresh_last_us"), took_us);
            w.metrics
                .add(&format!("{name}.refresh_total_us"), took_us as i64);
        }
        log::debug!(
            "registry-lb: service {name}: source {src}: answer of {body_size} bytes handled in {took_us} us ({}): copy {} us, parse {} us, publish {} us",
            out.kind(),
            copied_us.saturating_sub(started_us),
            parsed_us.saturating_sub(copied_us),
            done_us.saturating_sub(parsed_us),
        );
    }
}

impl RootContext for Root {
    fn on_configure(&mut self, size: usize) -> bool {
        let bytes = if size == 0 {
            Vec::new()
        } else {
            hostcalls::get_buffer(BufferType::PluginConfiguration, 0, size)
                .ok()
                .flatten()
                .unwrap_or_default()
        };
        if let Err(e) = self.configure(&bytes) {
            log::error!("registry-lb: {e}");
            return false;
        }
        let tick = self
            .worker
            .as_ref()
            .map(|w| w.borrow().cfg.tick.0)
            .unwrap_or(50);
        if let Err(e) = hostcalls::set_tick_period(Duration::from_millis(tick)) {
            log::error!("registry-lb: cannot start the timer: {e:?}");
            return false;
        }
        true
    }

    fn on_tick(&mut self) {
        let now = now_ms();
        if let Some(w) = &self.worker {
            w.borrow_mut().refresh_all();
        }
        let leading = self.lead(now);
        match (leading, self.pollers.is_some()) {
            (true, false) => self.become_leader(),
            (false, true) => {
                log::info!("registry-lb: this root no longer polls the registries");
                self.pollers = None;
                self.checkers.clear();
                self.calls.clear();
            }
            _ => {}
        }
        if self.pollers.is_some() {
            self.poll(now);
            self.publish(now);
            self.expire_outliers(now);
            self.check_health(now);
        }
        if let Some(w) = &self.worker {
            let mut w = w.borrow_mut();
            w.refresh_all();
            w.reweigh(now);
            w.release_waiting(now);
            w.metrics.flush();
        }
    }

    fn create_http_context(&self, id: u32) -> Option<Box<dyn HttpContext>> {
        self.serving.set(true);
        let worker = self.worker.clone()?;
        Some(Box::new(Http::new(id, worker)))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}
