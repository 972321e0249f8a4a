//! Per-request context: find the route's service, pick an instance, hand it to
//! Envoy, and account for the request until it ends.

use super::now_ms;
use super::metrics::gauge_add;
use super::worker::{local_reply, shown, Reply, Routed, Worker};
use crate::config::Handoff;
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::{Action, MapType};
use std::cell::RefCell;
use std::rc::Rc;

pub struct Http {
    id: u32,
    worker: Rc<RefCell<Worker>>,
    /// The routing of this request, to account for when it ends.
    routed: Option<Routed>,
}

impl Http {
    pub fn new(id: u32, worker: Rc<RefCell<Worker>>) -> Http {
        Http { id, worker, routed: None }
    }
}

/// The service named by the route: `filter_metadata.<namespace>.service`.
fn route_service(namespace: &str) -> Option<String> {
    let v = hostcalls::get_property(vec!["xds", "route_metadata", "filter_metadata", namespace, "service"])
        .ok()
        .flatten()?;
    String::from_utf8(v).ok().filter(|s| !s.is_empty())
}

/// An integer property (8 bytes, little endian); 0 when absent.
fn int_property(path: &[&str]) -> u64 {
    match hostcalls::get_property(path.to_vec()) {
        Ok(Some(b)) if b.len() == 8 => {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b);
            u64::from_le_bytes(a)
        }
        _ => 0,
    }
}

impl Context for Http {}

impl HttpContext for Http {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let mut w = self.worker.borrow_mut();
        let cfg = w.cfg.clone();
        if cfg.handoff != Handoff::FilterState {
            // A client-sent hand-off header must never reach the cluster.
            if let Ok(Some(_)) = hostcalls::get_map_value(MapType::HttpRequestHeaders, &cfg.handoff_header) {
                let _ = hostcalls::set_map_value(MapType::HttpRequestHeaders, &cfg.handoff_header, None);
                w.metrics.inc("client_handoff_header_removed");
            }
        }
        let Some(service) = route_service(&cfg.metadata_namespace) else { return Action::Continue };
        let Some(si) = w.service_index(&service) else {
            w.metrics.inc("unknown_service");
            log::warn!("registry-lb: a route names service `{}`, which is not configured", shown(&service));
            drop(w);
            local_reply(503, "registry_lb_unknown_service", &format!("registry-lb: service `{}` is not configured\n", shown(&service)));
            return Action::Pause;
        };
        if w.unknown(si) {
            // No snapshot seen yet: look now rather than at the next tick, and if
            // none is published yet (Envoy just started), hold the request until
            // the first one arrives or `initial_fetch_timeout` passes.
            w.refresh(si);
            if w.unknown(si) {
                let deadline = now_ms() + cfg.services[si].initial_fetch_timeout.0;
                w.waiting.push((self.id, si, deadline));
                w.metrics.inc(&format!("{service}.rq_waited_for_first_snapshot"));
                return Action::Pause;
            }
        }
        match w.route(si, now_ms()) {
            Ok(routed) => {
                self.routed = Some(routed);
                Action::Continue
            }
            Err(Reply(details, body)) => {
                drop(w);
                local_reply(503, details, &body);
                Action::Pause
            }
        }
    }

    fn on_log(&mut self) {
        let mut w = self.worker.borrow_mut();
        w.forget(self.id);
        let Some(routed) = self.routed.take().or_else(|| w.deferred.remove(&self.id)) else { return };
        if let Some(id) = routed.gauge {
            gauge_add(id, -1);
        }
        if w.cfg.services.get(routed.service).map(|s| s.outlier_detection.consecutive_5xx > 0).unwrap_or(false) {
            let code = int_property(&["response", "code"]);
            let flags = int_property(&["response", "flags"]);
            if routed.fallbacks.is_empty() {
                w.finished(routed, code, flags, now_ms());
            } else {
                let attempts = int_property(&["upstream", "request_attempt_count"]).max(1);
                w.finished_attempts(routed, attempts, code, flags, now_ms());
            }
        }
    }
}
