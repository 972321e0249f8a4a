//! Per-VM state shared by a worker's root context and its HTTP contexts: the
//! routing tables, kept current from shared data, and the routing of one request.

use super::handoff;
use super::metrics::{gauge_add, gauge_get, Metrics};
use super::shared;
use crate::config::{Handoff, PluginConfig, Policy};
use crate::instance::truncate;
use crate::picker::Table;
use crate::rng::SplitMix64;
use crate::snapshot::Snapshot;
use proxy_wasm::hostcalls;
use proxy_wasm::types::Status;
use std::collections::HashMap;
use std::rc::Rc;

/// Shared-data keys of one plugin configuration.
pub struct Keys {
    pub lease: String,
    pub snapshot: Vec<String>,
    pub version: Vec<String>,
}

/// A local reply instead of routing: (response code details, body).
pub struct Reply(pub &'static str, pub String);

pub struct Worker {
    pub cfg: Rc<PluginConfig>,
    pub keys: Keys,
    pub tables: Vec<Option<Table>>,
    pub rng: SplitMix64,
    pub metrics: Metrics,
    /// Per service: slot → gauge id of its in-flight requests.
    active_gauges: Vec<HashMap<u32, Option<u32>>>,
    /// Requests paused until their service's first snapshot: (context, service, deadline).
    pub waiting: Vec<(u32, usize, u64)>,
    /// In-flight gauges of requests routed while paused, by context id.
    pub deferred_active: HashMap<u32, u32>,
}

impl Worker {
    pub fn new(cfg: PluginConfig, keys: Keys, seed: u64) -> Worker {
        let n = cfg.services.len();
        Worker {
            cfg: Rc::new(cfg),
            keys,
            tables: (0..n).map(|_| None).collect(),
            rng: SplitMix64(seed),
            metrics: Metrics::default(),
            active_gauges: (0..n).map(|_| HashMap::new()).collect(),
            waiting: Vec::new(),
            deferred_active: HashMap::new(),
        }
    }

    /// Rebuilds the table of service `i` if a newer snapshot was published.
    pub fn refresh(&mut self, i: usize) {
        let Some(vkey) = self.keys.version.get(i) else { return };
        let Some(v) = shared::get_u64(vkey) else { return };
        let have = self.tables.get(i).and_then(|t| t.as_ref()).map(|t| t.version).unwrap_or(0);
        if v <= have {
            return;
        }
        let (Some(bytes), _) = shared::get(&self.keys.snapshot[i]) else { return };
        let svc = &self.cfg.services[i];
        match Snapshot::decode(&bytes) {
            Ok(snap) => {
                let table = Table::build(&snap, svc.policy, svc.choice_count, &mut self.rng);
                log::debug!(
                    "registry-lb: service {}: worker table at version {} with {} routable of {} instance(s)",
                    svc.name,
                    table.version,
                    table.endpoints.len(),
                    table.known
                );
                self.tables[i] = Some(table);
            }
            Err(e) => {
                let name = svc.name.clone();
                log::error!("registry-lb: service {name}: {e}; keeping the previous table");
                self.metrics.inc(&format!("{name}.snapshot_decode_failed"));
            }
        }
    }

    pub fn refresh_all(&mut self) {
        for i in 0..self.tables.len() {
            self.refresh(i);
        }
    }

    /// Whether service `i` has no snapshot at all yet.
    pub fn unknown(&self, i: usize) -> bool {
        self.tables.get(i).map(|t| t.is_none()).unwrap_or(true)
    }

    fn active_gauge(&mut self, si: usize, slot: u32) -> Option<u32> {
        let map = self.active_gauges.get_mut(si)?;
        if let Some(id) = map.get(&slot) {
            return *id;
        }
        let name = format!("{}.slot_{slot}.rq_active", self.cfg.services.get(si)?.name);
        let id = self.metrics.gauge_id(&name);
        if let Some(map) = self.active_gauges.get_mut(si) {
            map.insert(slot, id);
        }
        id
    }

    /// Picks an instance of service `si` for the current request and hands it to
    /// Envoy. Returns the in-flight gauge to decrement when the request ends.
    pub fn route(&mut self, si: usize) -> Result<Option<u32>, Reply> {
        let cfg = self.cfg.clone();
        let Some(svc) = cfg.services.get(si) else { return Err(Reply("registry_lb_unknown_service", String::new())) };
        let name = &svc.name;
        let least_request = svc.policy == Policy::LeastRequest;
        // Take the table out so the gauge lookup can borrow the rest of `self`.
        let mut table = self.tables.get_mut(si).and_then(Option::take);
        let picked = match table.as_mut() {
            Some(t) => {
                let mut rng = self.rng.clone();
                let ep = t
                    .pick(&mut rng, |slot| {
                        if least_request {
                            self.active_gauge(si, slot).map(gauge_get).unwrap_or(0)
                        } else {
                            0
                        }
                    })
                    .map(|e| (e.host.clone(), e.slot));
                self.rng = rng;
                ep
            }
            None => None,
        };
        if let Some(slot) = self.tables.get_mut(si) {
            *slot = table;
        }
        let Some((host, slot)) = picked else {
            self.metrics.inc(&format!("{name}.rq_no_instance"));
            return Err(Reply("registry_lb_no_instance", format!("registry-lb: no available instance for service `{name}`\n")));
        };
        let handed = match cfg.handoff {
            Handoff::FilterState => handoff::set_filter_state(&host),
            Handoff::Header => handoff::set_header(&cfg.handoff_header, &host),
        };
        if let Err(e) = handed {
            self.metrics.inc(&format!("{name}.handoff_failed"));
            log::error!("registry-lb: service {name}: cannot hand {host} to Envoy: {e:?}");
            return Err(Reply("registry_lb_handoff_failed", format!("registry-lb: cannot route to service `{name}`\n")));
        }
        let gauge = if least_request { self.active_gauge(si, slot) } else { None };
        if let Some(id) = gauge {
            gauge_add(id, 1);
        }
        self.metrics.pick(name, &host, cfg.max_instance_stats);
        Ok(gauge)
    }

    /// Routes or fails the requests paused for a first snapshot, once it is there
    /// or their wait is over.
    pub fn release_waiting(&mut self, now: u64) {
        if self.waiting.is_empty() {
            return;
        }
        let waiting = std::mem::take(&mut self.waiting);
        for (ctx, si, deadline) in waiting {
            if self.unknown(si) && now < deadline {
                self.waiting.push((ctx, si, deadline));
                continue;
            }
            if hostcalls::set_effective_context(ctx).is_err() {
                continue; // the request is gone
            }
            match self.route(si) {
                Ok(gauge) => {
                    if let Some(id) = gauge {
                        self.deferred_active.insert(ctx, id);
                    }
                    continue_request();
                }
                Err(Reply(details, body)) => local_reply(503, details, &body),
            }
        }
    }

    /// Forgets a request that ended while paused.
    pub fn forget(&mut self, ctx: u32) {
        self.waiting.retain(|(c, _, _)| *c != ctx);
    }

    pub fn service_index(&self, name: &str) -> Option<usize> {
        self.cfg.service(name).map(|(i, _)| i)
    }
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
    ) -> Status;
    fn proxy_continue_stream(stream_type: u32) -> Status;
}

/// Resumes the current (paused) request; a stream that is gone is ignored.
pub fn continue_request() {
    // SAFETY: plain ABI call with no pointers; 0 = the request stream.
    let _ = unsafe { proxy_continue_stream(0) };
}

/// A local reply with Envoy response-code details (`%RESPONSE_CODE_DETAILS%`).
pub fn local_reply(status: u32, details: &str, body: &str) {
    // proxy-wasm header map: count, (key len, value len)*, then each key\0 value\0.
    let (k, v) = ("content-type", "text/plain");
    let mut headers = Vec::with_capacity(48);
    headers.extend_from_slice(&1u32.to_le_bytes());
    headers.extend_from_slice(&(k.len() as u32).to_le_bytes());
    headers.extend_from_slice(&(v.len() as u32).to_le_bytes());
    headers.extend_from_slice(k.as_bytes());
    headers.push(0);
    headers.extend_from_slice(v.as_bytes());
    headers.push(0);
    // SAFETY: every pointer is valid for its length for the duration of the call.
    let _ = unsafe {
        proxy_send_local_response(
            status,
            details.as_ptr(),
            details.len(),
            body.as_ptr(),
            body.len(),
            headers.as_ptr(),
            headers.len(),
            -1,
        )
    };
}

/// Log-safe form of a service name taken from route metadata.
pub fn shown(name: &str) -> String {
    truncate(name, 64)
}
