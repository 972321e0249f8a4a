//! Per-request context: find the route's service, pick an instance, hand it to
//! Envoy, and account for the request until it ends.

use super::handoff;
use super::metrics::{gauge_add, gauge_get};
use super::root::Worker;
use crate::config::Handoff;
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::{Action, MapType};
use std::cell::RefCell;
use std::rc::Rc;

pub struct Http {
    worker: Rc<RefCell<Worker>>,
    /// In-flight gauge to decrement when the request ends.
    active: Option<u32>,
}

impl Http {
    pub fn new(worker: Rc<RefCell<Worker>>) -> Http {
        Http { worker, active: None }
    }
}

/// The service named by the route: `filter_metadata.<namespace>.service`.
fn route_service(namespace: &str) -> Option<String> {
    let v = hostcalls::get_property(vec!["xds", "route_metadata", "filter_metadata", namespace, "service"])
        .ok()
        .flatten()?;
    String::from_utf8(v).ok().filter(|s| !s.is_empty())
}

#[link(wasm_import_module = "env")]
extern "C" {
    fn proxy_send_local_response(
        status_code: u32,
        details_data: *const u8,
        details_size: usize,
        body_data: *const u8,
        body_size: usize,
        headers_data: *const u8,
        headers_size: usize,
        grpc_status: i32,
    ) -> proxy_wasm::types::Status;
}

/// A local reply with Envoy response-code details (`%RESPONSE_CODE_DETAILS%`).
fn local_reply(status: u32, details: &str, body: &str) {
    // proxy-wasm header map: count, (key len, value len)*, then each key\0 value\0.
    let (k, v) = ("content-type", "text/plain");
    let mut headers = Vec::new();
    headers.extend_from_slice(&1u32.to_le_bytes());
    headers.extend_from_slice(&(k.len() as u32).to_le_bytes());
    headers.extend_from_slice(&(v.len() as u32).to_le_bytes());
    headers.extend_from_slice(k.as_bytes());
    headers.push(0);
    headers.extend_from_slice(v.as_bytes());
    headers.push(0);
    // SAFETY: all pointers are valid for the given lengths during the call.
    unsafe {
        proxy_send_local_response(
            status,
            details.as_ptr(),
            details.len(),
            body.as_ptr(),
            body.len(),
            headers.as_ptr(),
            headers.len(),
            -1,
        );
    }
}

impl Context for Http {}

impl HttpContext for Http {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let mut guard = self.worker.borrow_mut();
        let w = &mut *guard;
        let cfg = w.cfg.clone();
        if cfg.handoff == Handoff::Header {
            // A client-sent hand-off header must never reach the cluster.
            if let Ok(Some(_)) = hostcalls::get_map_value(MapType::HttpRequestHeaders, &cfg.handoff_header) {
                let _ = hostcalls::set_map_value(MapType::HttpRequestHeaders, &cfg.handoff_header, None);
                w.metrics.inc("client_handoff_header_removed");
            }
        }
        let Some(service) = route_service(&cfg.metadata_namespace) else { return Action::Continue };
        let Some((si, svc)) = cfg.service(&service) else {
            w.metrics.inc("unknown_service");
            log::warn!("registry-lb: route names service `{}`, which is not configured", crate::instance::truncate(&service, 64));
            drop(guard);
            local_reply(503, "registry_lb_unknown_service", &format!("registry-lb: service `{}` is not configured\n", crate::instance::truncate(&service, 64)));
            return Action::Pause;
        };
        let least_request = svc.policy == crate::config::Policy::LeastRequest;
        // In-flight gauges are needed by least_request only; resolve the ids first.
        let mut picked = None;
        if let Some(table) = w.tables.get_mut(si).and_then(|t| t.as_mut()) {
            let worker_gauges = &mut w.active_gauges;
            let metrics = &mut w.metrics;
            let name = &svc.name;
            let mut gauge = |slot: u32| -> Option<u32> {
                let map = worker_gauges.get_mut(si)?;
                if let Some(id) = map.get(&slot) {
                    return *id;
                }
                let id = metrics.gauge_id(&format!("{name}.slot_{slot}.rq_active"));
                map.insert(slot, id);
                id
            };
            let ep = table.pick(&mut w.rng, |slot| if least_request { gauge(slot).map(gauge_get).unwrap_or(0) } else { 0 });
            if let Some(ep) = ep {
                picked = Some((ep.host.clone(), if least_request { gauge(ep.slot) } else { None }));
            }
        }
        let Some((host, active)) = picked else {
            w.metrics.inc(&format!("{service}.rq_no_instance"));
            drop(guard);
            local_reply(503, "registry_lb_no_instance", &format!("registry-lb: no available instance for service `{service}`\n"));
            return Action::Pause;
        };
        let handed = match cfg.handoff {
            Handoff::FilterState => handoff::set_filter_state(&host),
            Handoff::Header => handoff::set_header(&cfg.handoff_header, &host),
        };
        if let Err(e) = handed {
            w.metrics.inc(&format!("{service}.handoff_failed"));
            log::error!("registry-lb: service {service}: cannot hand {host} to Envoy: {e:?}");
            drop(guard);
            local_reply(503, "registry_lb_handoff_failed", &format!("registry-lb: cannot route to service `{service}`\n"));
            return Action::Pause;
        }
        if let Some(id) = active {
            gauge_add(id, 1);
            self.active = Some(id);
        }
        let cap = cfg.max_instance_stats;
        w.metrics.pick(&service, &host, cap);
        Action::Continue
    }

    fn on_log(&mut self) {
        if let Some(id) = self.active.take() {
            gauge_add(id, -1);
        }
    }
}
