//! Per-request context: find the route's service, pick an instance, hand it to
//! Envoy, and account for the request until it ends.

use super::metrics::gauge_add;
use super::now_ms;
use super::worker::{local_reply, shown, Reply, RequestKey, RouteTarget, Routed, Worker};
use crate::config::Handoff;
use crate::config::{Policy, ServiceConfig};
use crate::hash_key::{self, HashOn, RequestParts};
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
        Http {
            id,
            worker,
            routed: None,
        }
    }
}

/// What the route names, cached per route name: reading the route's name costs
/// the host about a quarter of reading its metadata (measured with
/// `bench/hostcall-probe`). Unnamed routes are read every time.
fn route_target_cached(w: &mut Worker, namespace: &str) -> RouteTarget {
    match hostcalls::get_property(vec!["xds", "route_name"]) {
        Ok(Some(name)) if !name.is_empty() => {
            if let Some(v) = w.route_cache.get(&name) {
                return v.clone();
            }
            let v = route_target(w, namespace);
            if w.route_cache.len() < 1024 {
                w.route_cache.insert(name, v.clone());
            }
            v
        }
        _ => route_target(w, namespace),
    }
}

fn route_target(w: &Worker, namespace: &str) -> RouteTarget {
    match route_service(namespace) {
        None => RouteTarget::None,
        Some(name) => match w.service_index(&name) {
            Some(i) => RouteTarget::Service(i),
            None => RouteTarget::Unknown(name),
        },
    }
}

/// The service named by the route: `filter_metadata.<namespace>.service`.
fn route_service(namespace: &str) -> Option<String> {
    let v = hostcalls::get_property(vec![
        "xds",
        "route_metadata",
        "filter_metadata",
        namespace,
        "service",
    ])
    .ok()
    .flatten()?;
    String::from_utf8(v).ok().filter(|s| !s.is_empty())
}

/// Reads what the service's policy needs from the request: the hash key
/// (`ring_hash`, `maglev`; source IP when `hash_on` is not set) and a subset selector.
fn request_key(svc: &ServiceConfig, w: &mut Worker) -> RequestKey {
    let mut key = RequestKey::default();
    if svc.policy.is_hash() {
        let on = svc
            .hash_on
            .as_ref()
            .map(|h| h.to_hash_on())
            .unwrap_or(HashOn::SourceIp);
        let header_bytes;
        let cookie;
        let source;
        let path;
        let mut parts = RequestParts::default();
        match &on {
            HashOn::Header(name) => {
                header_bytes = hostcalls::get_map_value_bytes(MapType::HttpRequestHeaders, name)
                    .ok()
                    .flatten();
                parts.header = header_bytes.as_deref();
            }
            HashOn::Cookie(_) => {
                cookie = hostcalls::get_map_value(MapType::HttpRequestHeaders, "cookie")
                    .ok()
                    .flatten();
                parts.cookie_header = cookie.as_deref();
            }
            HashOn::SourceIp => {
                source = hostcalls::get_property(vec!["source", "address"])
                    .ok()
                    .flatten()
                    .and_then(|b| String::from_utf8(b).ok());
                parts.source_address = source.as_deref();
            }
            HashOn::Path { .. } => {
                path = hostcalls::get_map_value(MapType::HttpRequestHeaders, ":path")
                    .ok()
                    .flatten();
                parts.path = path.as_deref();
            }
        }
        key.hash = hash_key::key(&on, &parts).hash();
        if key.hash.is_none() {
            w.metrics.inc(&format!("{}.rq_hash_key_missing", svc.name));
        }
    }
    if let Some(header) = svc.subset.as_ref().and_then(|s| s.header.as_deref()) {
        if let Ok(Some(v)) = hostcalls::get_map_value(MapType::HttpRequestHeaders, header) {
            match crate::subset::parse_selector(&v) {
                Ok(sel) => key.subset = Some(sel),
                Err(_) => w
                    .metrics
                    .inc(&format!("{}.subset_header_invalid", svc.name)),
            }
        }
    }
    key
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
            if let Ok(Some(_)) =
                hostcalls::get_map_value(MapType::HttpRequestHeaders, &cfg.handoff_header)
            {
                let _ = hostcalls::set_map_value(
                    MapType::HttpRequestHeaders,
                    &cfg.handoff_header,
                    None,
                );
                w.metrics.inc("client_handoff_header_removed");
            }
        }
        let si = match route_target_cached(&mut w, &cfg.metadata_namespace) {
            RouteTarget::None => return Action::Continue,
            RouteTarget::Service(i) => i,
            RouteTarget::Unknown(service) => {
                w.metrics.inc("unknown_service");
                log::warn!(
                    "registry-lb: a route names service `{}`, which is not configured",
                    shown(&service)
                );
                drop(w);
                local_reply(
                    503,
                    "registry_lb_unknown_service",
                    &format!(
                        "registry-lb: service `{}` is not configured\n",
                        shown(&service)
                    ),
                );
                return Action::Pause;
            }
        };
        if w.unknown(si) {
            // No snapshot seen yet: look now rather than at the next tick, and if
            // none is published yet (Envoy just started), hold the request until
            // the first one arrives or `initial_fetch_timeout` passes.
            w.refresh(si);
            if w.unknown(si) {
                let deadline = now_ms() + cfg.services[si].initial_fetch_timeout.0;
                w.waiting.push((self.id, si, deadline));
                w.metrics.inc(&format!(
                    "{}.rq_waited_for_first_snapshot",
                    cfg.services[si].name
                ));
                return Action::Pause;
            }
        }
        let key = request_key(&cfg.services[si], &mut w);
        match w.route(si, now_ms(), &key) {
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

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let Some(r) = &self.routed else {
            return Action::Continue;
        };
        let (si, slot) = (r.service, r.slot);
        let mut w = self.worker.borrow_mut();
        let header = match w.cfg.services.get(si).and_then(|s| s.load_report.as_ref()) {
            Some(lr) => lr.header.clone(),
            None => return Action::Continue,
        };
        if let Ok(Some(v)) = hostcalls::get_map_value(MapType::HttpResponseHeaders, &header) {
            w.load_report(si, slot, &v, now_ms());
        }
        Action::Continue
    }

    fn on_log(&mut self) {
        let mut w = self.worker.borrow_mut();
        w.forget(self.id);
        let Some(routed) = self.routed.take().or_else(|| w.deferred.remove(&self.id)) else {
            return;
        };
        for id in [routed.gauge, routed.total_gauge].into_iter().flatten() {
            gauge_add(id, -1);
        }
        if w.cfg
            .services
            .get(routed.service)
            .map(|s| s.policy == Policy::PeakEwma)
            .unwrap_or(false)
        {
            let rtt = match int_property(&["response", "backend_latency"]) {
                0 => int_property(&["request", "duration"]),
                v => v,
            };
            let now = now_ms();
            if let Some(Some(t)) = w.tables.get_mut(routed.service) {
                t.peak_end(routed.slot, (rtt > 0).then_some(rtt), now);
            }
        }
        if w.cfg
            .services
            .get(routed.service)
            .map(|s| s.outlier_detection.consecutive_5xx > 0)
            .unwrap_or(false)
        {
            let code = int_property(&["response", "code"]);
            // Host-failure flags come with no response or a 5xx: read them only then.
            let flags = if code == 0 || code >= 500 || !routed.fallbacks.is_empty() {
                int_property(&["response", "flags"])
            } else {
                0
            };
            if routed.fallbacks.is_empty() {
                w.finished(routed, code, flags);
            } else {
                let attempts = int_property(&["upstream", "request_attempt_count"]).max(1);
                w.finished_attempts(routed, attempts, code, flags);
            }
        }
    }
}
