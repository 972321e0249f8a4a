//! The registrar's hook in the leader: its calls dispatched on each tick, their
//! answers handed back, its events logged and counted, and the deregistration when
//! the plugin stops (see `registrar`).

use super::leader::{status_of, Call};
use super::Plugin;
use crate::envoy::Envoy;
use crate::http_call::HttpResponse;
use crate::registrar::{AppChange, Event, Registrar, Who};
use crate::stats::GlobalStat;

/// Registry answers to registration calls are small; larger ones are not read.
const MAX_ANSWER_BYTES: usize = 64 * 1024;

impl<H: Envoy> Plugin<H> {
    /// Tick duty of the leader: the registrar's due calls.
    pub(super) fn register(&mut self, now: u64) {
        let Some(mut r) = self.leader.registrar.take() else {
            return;
        };
        for (who, req) in r.due(now) {
            match self.host.dispatch(&req) {
                Ok(token) => {
                    self.leader.calls.insert(token, Call::Register(who));
                }
                Err(e) => {
                    let why = format!("cannot call cluster `{}`: {e}", req.cluster);
                    match who {
                        Who::App => {
                            log::warn!(
                                "registry-lb: register: the application's health check {why}"
                            );
                            self.app_result(&mut r, 0, now);
                        }
                        Who::Target(i) | Who::Leave(i) => {
                            let ev = r.on_failure(i, why, now);
                            self.report_registration(&r, i, ev);
                        }
                    }
                }
            }
        }
        self.leader.registrar = Some(r);
    }

    pub(super) fn on_register_answer(
        &mut self,
        who: Who,
        num_headers: usize,
        body_size: usize,
        now: u64,
    ) {
        let Some(mut r) = self.leader.registrar.take() else {
            return;
        };
        match who {
            Who::App => {
                let a = self.host.call_answer(num_headers, 0, 0);
                self.app_result(&mut r, status_of(&a.headers), now);
            }
            Who::Target(i) => {
                let a = self
                    .host
                    .call_answer(num_headers, body_size, MAX_ANSWER_BYTES);
                let ev = if num_headers == 0 {
                    r.on_failure(i, "call reset or timed out".into(), now)
                } else {
                    r.on_answer(
                        i,
                        &HttpResponse {
                            status: status_of(&a.headers),
                            headers: &a.headers,
                            body: &a.body,
                        },
                        now,
                    )
                };
                self.report_registration(&r, i, ev);
            }
            Who::Leave(i) => {
                let a = self
                    .host
                    .call_answer(num_headers, body_size, MAX_ANSWER_BYTES);
                let ev = r.on_leave_answer(i, status_of(&a.headers), &a.body);
                self.report_registration(&r, i, ev);
            }
        }
        self.leader.registrar = Some(r);
    }

    fn app_result(&mut self, r: &mut Registrar, status: u16, now: u64) {
        let Some(change) = r.on_app_result(status, now) else {
            return;
        };
        let up = change == AppChange::Up;
        self.stats
            .set_global(&self.host, GlobalStat::RegisterAppHealthy, u64::from(up));
        log::warn!(
            "registry-lb: register: instance `{}`: the application is {} (health check status {status})",
            r.id(),
            if up { "healthy: heartbeats on" } else { "unhealthy: marking it down" }
        );
    }

    fn report_registration(&mut self, r: &Registrar, i: usize, ev: Event) {
        let (id, target) = (r.id(), r.target_name(i));
        let stat = match &ev {
            Event::Step => return,
            Event::Registered { up } => {
                log::info!(
                    "registry-lb: register: instance `{id}` registered in {target} ({})",
                    if *up { "up" } else { "down" }
                );
                GlobalStat::RegisterRegistered
            }
            Event::Heartbeat => GlobalStat::RegisterHeartbeatOk,
            Event::Marked { down } => {
                log::warn!(
                    "registry-lb: register: instance `{id}` marked {} in {target}",
                    if *down { "down" } else { "up" }
                );
                if *down {
                    GlobalStat::RegisterMarkedDown
                } else {
                    GlobalStat::RegisterMarkedUp
                }
            }
            Event::Forgotten(why) => {
                log::warn!("registry-lb: register: {target} forgot instance `{id}` ({why}); registering it again");
                GlobalStat::RegisterForgotten
            }
            Event::Failed(why) => {
                log::warn!("registry-lb: register: instance `{id}` in {target}: {why}");
                GlobalStat::RegisterFailed
            }
            Event::Deregistered => {
                log::info!("registry-lb: register: instance `{id}` deregistered from {target}");
                GlobalStat::RegisterDeregistered
            }
        };
        self.stats.inc_global(&self.host, stat);
    }

    /// The plugin stops (Envoy shuts down or the configuration is removed): the
    /// registrar sends its deregistrations. Returns whether nothing is awaited;
    /// otherwise [`Plugin::leaving_done`] says when the answers are in.
    pub fn on_done(&mut self) -> bool {
        let Some(mut r) = self.leader.registrar.take() else {
            return true;
        };
        let mut sent = 0;
        for (i, req) in r.leave() {
            match self.host.dispatch(&req) {
                Ok(token) => {
                    self.leader
                        .calls
                        .insert(token, Call::Register(Who::Leave(i)));
                    sent += 1;
                }
                Err(e) => {
                    log::warn!(
                        "registry-lb: register: deregistration cannot call cluster `{}`: {e}",
                        req.cluster
                    );
                    let ev = r.on_leave_answer(i, 0, b"");
                    self.report_registration(&r, i, ev);
                }
            }
        }
        log::info!(
            "registry-lb: register: stopping: {sent} deregistration(s) of instance `{}` sent",
            r.id()
        );
        self.leader.registrar = Some(r);
        self.stats.flush(&self.host);
        sent == 0
    }

    /// After [`Plugin::on_done`]: every deregistration answered (or failed).
    pub fn leaving_done(&self) -> bool {
        !self
            .leader
            .calls
            .values()
            .any(|c| matches!(c, Call::Register(Who::Leave(_))))
    }
}
