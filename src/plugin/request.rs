//! The request path: which service a request belongs to, what its policy needs from
//! it (hash key, subset selector), the pick, the hand-off to Envoy, requests held
//! until a service's first snapshot, and the accounting when a request ends
//! (in-flight counts, peak EWMA, consecutive failures, ejections, trials).

use super::{Action, Plugin};
use crate::config::{authority_host, Handoff, PluginConfig, Policy, ServiceConfig};
use crate::envoy::{int_property, Envoy, HostError};
use crate::handoff;
use crate::hash_key::{self, HashOn, RequestParts};
use crate::instance::truncate;
use crate::log_text::{suppressed_note, LogLimit};
use crate::outlier;
use crate::picker::Request;
use crate::stats::{GlobalStat, SlotStat, Stat};
use std::collections::HashMap;

/// What the filter must remember about a routed request until it ends.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Routed {
    pub service: usize,
    pub slot: u32,
    /// In-flight gauge to decrement.
    pub gauge: Option<u32>,
    /// This request is the half-open trial of its instance.
    pub trial: bool,
    /// `override_host`: slots of the ranked list after the first (attempt k+1 → entry k).
    pub fallbacks: Vec<u32>,
    /// Service-wide in-flight gauge (bounded load) to decrement.
    pub total_gauge: Option<u32>,
    /// The decision header's value, when the request asked for it (and may).
    pub decision: Option<String>,
}

/// What the request path read from the request for the policy.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RequestKey {
    /// Hash of the request's key (`ring_hash`, `maglev`).
    pub hash: Option<u64>,
    /// Subset selector from the request header.
    pub subset: Option<Vec<(String, String)>>,
    /// The request asked for the decision header from an allowed source.
    pub explain: bool,
}

/// What a request resolved to.
#[derive(Clone, Debug)]
enum RouteTarget {
    /// Not ours: no registry-lb metadata, and no service claims its cluster or host.
    None,
    /// A configured service, by index.
    Service(usize),
    /// Metadata names a service that is not configured.
    Unknown(String),
}

/// A request paused until its service's first snapshot.
#[derive(Debug)]
struct Held {
    context: u32,
    service: usize,
    deadline_ms: u64,
    /// Read when it arrived: the headers are not read again when it is released.
    key: RequestKey,
}

/// A local reply instead of routing: (response code details, body).
struct Reply(&'static str, String);

impl Reply {
    /// No instance of `service` to route to (none known yet, or none available).
    fn no_instance(service: &str) -> Reply {
        Reply(
            "registry_lb_no_instance",
            format!("registry-lb: no available instance for service `{service}`\n"),
        )
    }
}

/// Property set for the access log: filter state `wasm.registry_lb_instance`.
pub const ACCESS_LOG_PROPERTY: &str = "registry_lb_instance";

/// Weight of a new response in the per-slot observed latency average (status view,
/// shadow comparison): about the last ten responses count.
const LATENCY_ALPHA: f64 = 0.2;

/// Bound of the route-name cache (a route table larger than this is read uncached).
const ROUTE_CACHE_MAX: usize = 1024;

/// Bound of the authority cache: clients choose authorities, so past this many
/// (until the next clearing) they are resolved uncached.
const AUTHORITY_CACHE_MAX: usize = 1024;

/// Authorities longer than this (a DNS name is at most 253 bytes) are resolved
/// uncached, so the cache holds at most `AUTHORITY_CACHE_MAX` × this many bytes.
const AUTHORITY_CACHE_KEY_MAX: usize = 260;

/// What claims a request that route metadata does not, from the configuration:
/// `upstream_clusters` and `hosts` → service index.
#[derive(Default)]
struct Claims {
    /// Cluster name as written.
    clusters: fnv::FnvHashMap<Vec<u8>, usize>,
    /// Host, lowercase, without port.
    hosts: fnv::FnvHashMap<Vec<u8>, usize>,
}

impl Claims {
    fn of(cfg: &PluginConfig) -> Claims {
        let mut c = Claims::default();
        for (i, s) in cfg.services.iter().enumerate() {
            for name in &s.upstream_clusters {
                c.clusters.insert(name.as_bytes().to_vec(), i);
            }
            for h in &s.hosts {
                c.hosts.insert(h.to_ascii_lowercase().into_bytes(), i);
            }
        }
        c
    }

    /// The service whose `hosts` hold this authority's host.
    fn host(&self, authority: &[u8]) -> Option<usize> {
        let host = authority_host(authority);
        if host.iter().any(u8::is_ascii_uppercase) {
            self.hosts.get(&host.to_ascii_lowercase()).copied()
        } else {
            self.hosts.get(host).copied()
        }
    }
}

/// Which rate-limited line a request causes.
#[derive(Clone, Copy)]
enum RequestLog {
    UnknownService,
    SubsetHeaderInvalid,
    HandoffFailed,
}

/// One rate limit per [`RequestLog`] kind.
#[derive(Default)]
struct RequestLogs([LogLimit; 3]);

/// Per-VM request-path state.
#[derive(Default)]
pub(super) struct Requests {
    held: Vec<Held>,
    /// Requests routed while held, by context id, until they end.
    released: HashMap<u32, Routed>,
    /// Route name → what its metadata names; forgotten every 10 s so a route
    /// changed by RDS under the same name is picked up.
    route_cache: fnv::FnvHashMap<Vec<u8>, RouteTarget>,
    route_cache_until: u64,
    claims: Claims,
    /// `:authority` as the client sent it → the service whose `hosts` hold it;
    /// bounded, forgotten with the route cache.
    authority_cache: fnv::FnvHashMap<Vec<u8>, Option<usize>>,
    /// Routing from a timer (held requests) now.
    releasing: bool,
    /// Rate limits of the log lines requests cause (see `log_text`).
    logs: RequestLogs,
    /// Rate-limited lines written, for tests.
    #[cfg(test)]
    pub(super) logged: Vec<String>,
    /// Envoy refused filter state set from a timer: before 1.37 foreign functions
    /// act on the root context, not the request made effective. Held requests then
    /// cannot be handed over; new ones are not held.
    pub(super) timer_filter_state_refused: bool,
}

impl Requests {
    pub fn new(cfg: &PluginConfig) -> Requests {
        Requests {
            claims: Claims::of(cfg),
            ..Requests::default()
        }
    }

    /// Forgets the route and authority caches every 10 s.
    pub fn expire_route_cache(&mut self, now: u64) {
        if now >= self.route_cache_until {
            self.route_cache.clear();
            self.authority_cache.clear();
            self.route_cache_until = now + 10_000;
        }
    }

    /// The service whose `hosts` hold `authority`, cached while the cache has room.
    fn authority_target(&mut self, authority: Vec<u8>) -> Option<usize> {
        if let Some(v) = self.authority_cache.get(&authority) {
            return *v;
        }
        let v = self.claims.host(&authority);
        if self.authority_cache.len() < AUTHORITY_CACHE_MAX
            && authority.len() <= AUTHORITY_CACHE_KEY_MAX
        {
            self.authority_cache.insert(authority, v);
        }
        v
    }

    #[cfg(test)]
    pub(super) fn cache_sizes(&self) -> (usize, usize) {
        (self.route_cache.len(), self.authority_cache.len())
    }
}

impl<H: Envoy> Plugin<H> {
    /// A request's headers: find its service, hold it if the service has no
    /// snapshot yet, otherwise route it. Returns what to tell Envoy and, when routed,
    /// what to remember until the request ends.
    pub fn on_request_headers(&mut self, context: u32) -> (Action, Option<Routed>) {
        let cfg = self.cfg.clone();
        if cfg.handoff != Handoff::FilterState
            && self.host.request_header(&cfg.handoff_header).is_some()
        {
            // A client-sent hand-off header must never reach the cluster.
            let _ = self.host.set_request_header(&cfg.handoff_header, None);
            self.stats
                .inc_global(&self.host, GlobalStat::ClientHandoffHeaderRemoved);
        }
        // The ask for a decision header never reaches the upstream, whether or not
        // the request is routed by a service.
        let explain_ask = cfg.explain.is_some() && self.take_explain_ask();
        if cfg.status.is_some() && self.serve_status() {
            return (Action::Pause, None);
        }
        let si = match self.route_target() {
            RouteTarget::None => return (Action::Continue, None),
            RouteTarget::Service(i) => i,
            RouteTarget::Unknown(service) => {
                self.stats
                    .inc_global(&self.host, GlobalStat::UnknownService);
                let shown = truncate(&service, 64);
                self.log_limited(log::Level::Warn, RequestLog::UnknownService, || {
                    format!("registry-lb: a route names service `{shown}`, which is not configured: answering 503")
                });
                self.host.local_reply(
                    503,
                    "registry_lb_unknown_service",
                    &format!("registry-lb: service `{shown}` is not configured\n"),
                );
                return (Action::Pause, None);
            }
        };
        let now = self.host.now_ms();
        let svc = &cfg.services[si];
        let mut key = self.request_key(svc);
        key.explain = explain_ask && self.explain_allowed();
        if self.unknown(si) {
            // No snapshot seen yet: look now rather than at the next tick.
            self.refresh(si, now);
        }
        if self.unknown(si) {
            // None is published yet (Envoy just started): hold the request until the
            // first one arrives or `initial_fetch_timeout` passes — unless this Envoy
            // cannot hand a held request over (see `release_held`).
            if self.requests.timer_filter_state_refused {
                self.stats.inc(&self.host, &svc.name, Stat::RqNoInstance);
                let Reply(details, body) = Reply::no_instance(&svc.name);
                self.host.local_reply(503, details, &body);
                return (Action::Pause, None);
            }
            self.requests.held.push(Held {
                context,
                service: si,
                deadline_ms: now + svc.initial_fetch_timeout.0,
                key,
            });
            self.stats
                .inc(&self.host, &svc.name, Stat::RqWaitedForFirstSnapshot);
            return (Action::Pause, None);
        }
        match self.route(si, now, &key) {
            Ok(routed) => (Action::Continue, Some(routed)),
            Err(Reply(details, body)) => {
                self.host.local_reply(503, details, &body);
                (Action::Pause, None)
            }
        }
    }

    /// The service this request belongs to: the one its route's metadata names,
    /// else the one whose `upstream_clusters` hold the route's cluster, else the one
    /// whose `hosts` hold its authority. The cluster is read only when some service
    /// has `upstream_clusters`, the authority only when some service has `hosts`.
    fn route_target(&mut self) -> RouteTarget {
        let by_metadata = self.route_metadata_target();
        if !matches!(by_metadata, RouteTarget::None) {
            return by_metadata;
        }
        // Not cached per route: with weighted clusters one route has several.
        if !self.requests.claims.clusters.is_empty() {
            let cluster = self.host.property(&["xds", "cluster_name"]);
            if let Some(&i) = cluster.and_then(|c| self.requests.claims.clusters.get(&c)) {
                return RouteTarget::Service(i);
            }
        }
        if !self.requests.claims.hosts.is_empty() {
            if let Some(authority) = self.host.request_header(":authority") {
                if let Some(i) = self.requests.authority_target(authority) {
                    return RouteTarget::Service(i);
                }
            }
        }
        RouteTarget::None
    }

    /// What the route's metadata names, cached per route name: reading the route's
    /// name costs the host about a quarter of reading its metadata (measured with
    /// `bench/hostcall-probe`). Unnamed routes are read every time.
    fn route_metadata_target(&mut self) -> RouteTarget {
        let name = self
            .host
            .property(&["xds", "route_name"])
            .filter(|n| !n.is_empty());
        if let Some(name) = &name {
            if let Some(v) = self.requests.route_cache.get(name) {
                return v.clone();
            }
        }
        let service = self
            .host
            .property(&[
                "xds",
                "route_metadata",
                "filter_metadata",
                &self.cfg.metadata_namespace,
                "service",
            ])
            .and_then(|v| String::from_utf8(v).ok())
            .filter(|s| !s.is_empty());
        let v = match service {
            None => RouteTarget::None,
            Some(s) => match self.cfg.service(&s) {
                Some((i, _)) => RouteTarget::Service(i),
                None => RouteTarget::Unknown(s),
            },
        };
        if let Some(name) = name {
            if self.requests.route_cache.len() < ROUTE_CACHE_MAX {
                self.requests.route_cache.insert(name, v.clone());
            }
        }
        v
    }

    /// Reads what the service's policy needs from the request: the hash key
    /// (`ring_hash`, `maglev`; source IP when `hash_on` is not set) and a subset
    /// selector.
    fn request_key(&mut self, svc: &ServiceConfig) -> RequestKey {
        let mut key = RequestKey::default();
        if svc.policy.is_hash() || svc.shadow_policy.is_some_and(Policy::is_hash) {
            let on = svc
                .hash_on
                .as_ref()
                .map(|h| h.to_hash_on())
                .unwrap_or(HashOn::SourceIp);
            let text = |b: Option<Vec<u8>>| b.and_then(|b| String::from_utf8(b).ok());
            let header;
            let cookie;
            let source;
            let path;
            let mut parts = RequestParts::default();
            match &on {
                HashOn::Header(name) => {
                    header = self.host.request_header(name);
                    parts.header = header.as_deref();
                }
                HashOn::Cookie(_) => {
                    cookie = text(self.host.request_header("cookie"));
                    parts.cookie_header = cookie.as_deref();
                }
                HashOn::SourceIp => {
                    source = text(self.host.property(&["source", "address"]));
                    parts.source_address = source.as_deref();
                }
                HashOn::Path { .. } => {
                    path = text(self.host.request_header(":path"));
                    parts.path = path.as_deref();
                }
            }
            key.hash = hash_key::key(&on, &parts).hash();
            if key.hash.is_none() {
                self.stats
                    .inc(&self.host, &svc.name, Stat::RqHashKeyMissing);
            }
        }
        if let Some(header) = svc.subset.as_ref().and_then(|s| s.header.as_deref()) {
            if let Some(raw) = self.host.request_header(header) {
                let parsed = match std::str::from_utf8(&raw) {
                    Ok(text) => crate::subset::parse_selector(text).map_err(|e| e.to_string()),
                    Err(_) => Err("selector is not UTF-8".to_string()),
                };
                match parsed {
                    Ok(sel) => key.subset = Some(sel),
                    Err(why) => {
                        // Ignored, as if absent: the fallback serves the request.
                        self.stats
                            .inc(&self.host, &svc.name, Stat::SubsetHeaderInvalid);
                        let name = &svc.name;
                        self.log_limited(log::Level::Warn, RequestLog::SubsetHeaderInvalid, || {
                            let shown = truncate(&String::from_utf8_lossy(&raw), 64);
                            format!("registry-lb: service {name}: ignoring a malformed subset header `{header}` ({why}): `{shown}`")
                        });
                    }
                }
            }
        }
        key
    }

    /// Logs a line a request caused, at most once per `LOG_INTERVAL_MS` per kind in
    /// this VM (the clock is read only for such requests).
    fn log_limited(&mut self, level: log::Level, kind: RequestLog, line: impl FnOnce() -> String) {
        let now = self.host.now_ms();
        let Some(limit) = self.requests.logs.0.get_mut(kind as usize) else {
            return;
        };
        let Some(left_out) = limit.allow(now) else {
            return;
        };
        let line = format!("{}{}", line(), suppressed_note(left_out));
        log::log!(level, "{line}");
        #[cfg(test)]
        self.requests.logged.push(line);
    }

    /// Picks an instance of service `si` for the current request and hands it to
    /// Envoy. Returns what to remember until the request ends.
    fn route(&mut self, si: usize, now: u64, key: &RequestKey) -> Result<Routed, Reply> {
        let cfg = self.cfg.clone();
        let Some(svc) = cfg.services.get(si) else {
            return Err(Reply("registry_lb_unknown_service", String::new()));
        };
        let name = &svc.name;
        if self.tables.services.get(si).is_some_and(|s| s.stale) {
            self.stats.inc(&self.host, name, Stat::RqStale);
            return Err(Reply(
                "registry_lb_stale",
                format!("registry-lb: registry data for service `{name}` is too old\n"),
            ));
        }
        // Other workers' ejections: their generation gauge is read at most once per
        // millisecond per service (this worker's own apply at once).
        if self
            .tables
            .services
            .get(si)
            .is_some_and(|s| s.outliers_seen_ms != now)
        {
            self.sync_outliers(si, now);
            if let Some(s) = self.tables.services.get_mut(si) {
                s.outliers_seen_ms = now;
            }
        }
        let shared_load = svc.shared_in_flight();
        let total_gauge = if svc.bounded_load_percent.is_some() || svc.hot_cold() {
            self.service_active_gauge(si)
        } else {
            None
        };
        let total_active = total_gauge
            .map(|id| self.host.metric_get(id))
            .unwrap_or(0)
            .max(0) as u64;
        let want = if cfg.handoff == Handoff::OverrideHost {
            svc.override_host_count as usize
        } else {
            1
        };
        // The chosen slot, the further ranked ones (override_host only: no
        // allocation otherwise), and whether it is a half-open trial.
        let mut chosen: Option<(u32, Vec<u32>, bool)> = None;
        let mut trace = None;
        for _attempt in 0..3 {
            // Take the table out so the gauge lookup can borrow the rest of `self`.
            let Some(mut table) = self
                .tables
                .services
                .get_mut(si)
                .and_then(|s| s.table.take())
            else {
                break;
            };
            if key.explain {
                table.trace_start();
            }
            let mut rng = self.rng.clone();
            let load = |slot: u32| self.shared_in_flight(si, slot, shared_load);
            let mut req = Request {
                rng: &mut rng,
                now_ms: now,
                hash: key.hash,
                subset: key.subset.as_deref(),
                active: load,
                total_active,
            };
            let picked: Option<(u32, Vec<u32>)> = if want > 1 {
                let ranked: Vec<u32> = table
                    .ranked(want, &mut req)
                    .into_iter()
                    .filter_map(|i| table.endpoints.get(i))
                    .map(|e| e.slot)
                    .collect();
                ranked
                    .split_first()
                    .map(|(first, rest)| (*first, rest.to_vec()))
            } else {
                table.pick(&mut req).map(|e| (e.slot, Vec::new()))
            };
            let panic = table.panic;
            if key.explain {
                trace = Some((table.trace_take(), panic));
            }
            self.rng = rng;
            if let Some(s) = self.tables.services.get_mut(si) {
                s.table = Some(table);
            }
            let Some((slot, rest)) = picked else { break };
            if panic {
                self.stats.inc(&self.host, name, Stat::RqPanic);
            }
            let half_open = self
                .tables
                .services
                .get(si)
                .is_some_and(|s| s.outliers.is_half_open(slot));
            if half_open {
                // Half-open: this request is the one trial, if no other worker took it.
                if self.update_outliers(si, now, |o| o.start_trial(slot, now)) {
                    chosen = Some((slot, rest, true));
                    break;
                }
                self.sync_outliers(si, now);
                continue;
            }
            chosen = Some((slot, rest, false));
            break;
        }
        let Some((slot, fallbacks, trial)) = chosen else {
            self.stats.inc(&self.host, name, Stat::RqNoInstance);
            return Err(Reply::no_instance(name));
        };
        if let Err(e) = self.hand_off(si, slot, &fallbacks) {
            self.stats.inc(&self.host, name, Stat::HandoffFailed);
            if trial {
                // The instance was never asked: a later request makes the trial,
                // instead of the slot staying out (and counting against
                // `max_ejection_percent`) until the trial times out.
                self.update_outliers(si, now, |o| o.abandon_trial(slot));
            }
            let from_timer = self.requests.releasing && cfg.handoff == Handoff::FilterState;
            if from_timer && matches!(e, HostError::NotFound | HostError::BadArgument) {
                if !self.requests.timer_filter_state_refused {
                    self.requests.timer_filter_state_refused = true;
                    log::error!("registry-lb: this Envoy does not set filter state on a request from a timer ({e}; Envoy before 1.37 runs foreign functions on the root context): requests that arrived before the first registry answer are answered 503, and until a service has its first snapshot its requests are answered 503 at once instead of held. Envoy 1.37 or later, or the `header` / `override_host` hand-off, holds and routes them");
                }
            } else {
                let host = self.host_of(si, slot).unwrap_or_else(|| "?".into());
                self.log_limited(log::Level::Error, RequestLog::HandoffFailed, || {
                    format!("registry-lb: service {name}: cannot hand {host} to Envoy: {e}")
                });
            }
            return Err(Reply(
                "registry_lb_handoff_failed",
                format!("registry-lb: cannot route to service `{name}`\n"),
            ));
        }
        if cfg.access_log_instance {
            self.set_access_log(si, slot);
        }
        let shadow = if svc.shadow_policy.is_some() {
            self.shadow_pick(si, now, key, slot, shared_load, total_active)
        } else {
            None
        };
        let decision = trace.map(|(t, panic)| {
            let mut flags = Vec::new();
            if panic {
                flags.push("panic".to_string());
            }
            if trial {
                flags.push("trial".to_string());
            }
            if let (Some(p), Some(s)) = (svc.shadow_policy, shadow) {
                let a = self.host_of(si, s).unwrap_or_default();
                flags.push(format!("shadow={}:{a}", crate::explain::policy_name(p)));
            }
            let chosen = self.host_of(si, slot).unwrap_or_default();
            crate::explain::header(
                svc.policy,
                svc.bounded_load_percent.is_some(),
                svc.policy == Policy::PeakEwma
                    && svc.peak_ewma.rule == crate::balancer::peak_ewma::Rule::HotCold,
                &chosen,
                &t,
                |s| self.host_of(si, s),
                &flags,
            )
        });
        let gauge = if shared_load {
            self.slot_gauge(si, slot, SlotStat::RqActive)
        } else {
            None
        };
        for id in [gauge, total_gauge].into_iter().flatten() {
            self.host.metric_add(id, 1);
        }
        if svc.policy == Policy::PeakEwma {
            if let Some(t) = self
                .tables
                .services
                .get_mut(si)
                .and_then(|s| s.table.as_mut())
            {
                t.peak_start(slot);
            }
        }
        if svc.shadow_policy == Some(Policy::PeakEwma) {
            if let Some(t) = self
                .tables
                .services
                .get_mut(si)
                .and_then(|s| s.shadow.as_mut())
            {
                t.peak_start(slot);
            }
        }
        self.count_pick(si, slot, cfg.max_instance_stats);
        Ok(Routed {
            service: si,
            slot,
            gauge,
            trial,
            fallbacks,
            total_gauge,
            decision,
        })
    }

    /// Whether the request asks for the decision header; the asking header is
    /// removed so it never reaches the upstream.
    fn take_explain_ask(&mut self) -> bool {
        let Some(x) = self.cfg.explain.as_ref() else {
            return false;
        };
        let name = x.request_header.clone();
        if self.host.request_header(&name).is_none() {
            return false;
        }
        let _ = self.host.set_request_header(&name, None);
        true
    }

    /// A request that asked for the decision header comes from an allowed source
    /// (counted either way).
    fn explain_allowed(&mut self) -> bool {
        let Some(x) = self.cfg.explain.clone() else {
            return false;
        };
        if self.source_allowed(&x.ranges, x.trust_forwarded_for) {
            self.stats.inc_global(&self.host, GlobalStat::ExplainServed);
            true
        } else {
            self.stats
                .inc_global(&self.host, GlobalStat::ExplainRefused);
            false
        }
    }

    /// Requests in flight to `slot` across the Envoy (its shared gauge), when the
    /// service keeps those gauges (`shared`); 0 otherwise.
    fn shared_in_flight(&mut self, si: usize, slot: u32, shared: bool) -> i64 {
        if !shared {
            return 0;
        }
        self.slot_gauge(si, slot, SlotStat::RqActive)
            .map(|id| self.host.metric_get(id))
            .unwrap_or(0)
    }

    /// The shadow policy's pick for this request beside the real one (`slot`),
    /// counted; never routed to. Its own randomness, so routing is unchanged.
    fn shadow_pick(
        &mut self,
        si: usize,
        now: u64,
        key: &RequestKey,
        slot: u32,
        shared_load: bool,
        total_active: u64,
    ) -> Option<u32> {
        let mut table = self.tables.services.get_mut(si)?.shadow.take()?;
        let mut rng = self.shadow_rng.clone();
        let load = |s: u32| self.shared_in_flight(si, s, shared_load);
        let mut req = Request {
            rng: &mut rng,
            now_ms: now,
            hash: key.hash,
            subset: key.subset.as_deref(),
            active: load,
            total_active,
        };
        let picked = table.pick(&mut req).map(|e| e.slot);
        self.shadow_rng = rng;
        let state = self.tables.services.get_mut(si)?;
        state.shadow = Some(table);
        let other = picked?;
        let c = &mut state.shadow_pending;
        c.picks += 1;
        if other != slot {
            c.disagreements += 1;
            let est = |s: u32| state.slots.get(s as usize).and_then(|c| c.latency_ns);
            if let (Some(real), Some(shadow)) = (est(slot), est(other)) {
                let c = &mut state.shadow_pending;
                c.compared += 1;
                let d_us = ((shadow - real) / 1000.0) as i64;
                if d_us < 0 {
                    c.lower_us += -d_us;
                } else {
                    c.higher_us += d_us;
                }
            }
        }
        Some(other)
    }

    /// Tick duty: the shadow counts of every service added to Envoy's stats.
    pub(super) fn flush_shadow(&mut self) {
        for si in 0..self.tables.services.len() {
            let c = std::mem::take(&mut self.tables.services[si].shadow_pending);
            if c.picks == 0 {
                continue;
            }
            let name = self.cfg.services[si].name.clone();
            for (stat, v) in [
                (Stat::ShadowPicks, c.picks),
                (Stat::ShadowDisagreements, c.disagreements),
                (Stat::ShadowCompared, c.compared),
                (Stat::ShadowLatencyLowerUs, c.lower_us),
                (Stat::ShadowLatencyHigherUs, c.higher_us),
            ] {
                if v != 0 {
                    self.stats.add(&self.host, &name, stat, v);
                }
            }
        }
    }

    /// Puts `slot`'s `ip:port` in filter state for the access log (the bytes cached
    /// per instance, so a request costs the host call only).
    fn set_access_log(&mut self, si: usize, slot: u32) {
        if self.slot_cache(si, slot).is_some_and(|c| c.text.is_none()) {
            let t = self.host_of(si, slot).map(String::into_bytes);
            if let Some(c) = self.slot_cache(si, slot) {
                c.text = t;
            }
        }
        let text = self
            .tables
            .services
            .get(si)
            .and_then(|s| s.slots.get(slot as usize))
            .and_then(|c| c.text.as_deref());
        if let Some(t) = text {
            let _ = self.host.set_property(&[ACCESS_LOG_PROPERTY], t);
        }
    }

    /// Hands `slot` (and, for `override_host`, the ranked `fallbacks`) to Envoy.
    fn hand_off(&mut self, si: usize, slot: u32, fallbacks: &[u32]) -> Result<(), HostError> {
        let cfg = self.cfg.clone();
        match cfg.handoff {
            Handoff::FilterState => {
                self.handoff_payload(si, slot);
                let p = self.cached_payload(si, slot).ok_or(HostError::NotFound)?;
                self.host.set_filter_state(p)
            }
            Handoff::Header => {
                self.handoff_payload(si, slot);
                let p = self.cached_payload(si, slot).ok_or(HostError::NotFound)?;
                self.host.set_request_header(&cfg.handoff_header, Some(p))
            }
            Handoff::OverrideHost => {
                // The ranked list, from each instance's cached `ip:port` bytes.
                let mut list: Vec<u8> = Vec::new();
                for s in std::iter::once(slot).chain(fallbacks.iter().copied()) {
                    if let Some(p) = self.handoff_payload(si, s) {
                        if !list.is_empty() {
                            list.push(b',');
                        }
                        list.extend_from_slice(p);
                    }
                }
                self.host
                    .set_request_header(&cfg.handoff_header, Some(&list))
            }
        }
    }

    /// `ip:port` of the instance in `slot` of service `si`, routable or on its
    /// half-open trial (formatted: the request path uses the per-slot cached bytes
    /// of `handoff_payload`).
    pub(super) fn host_of(&self, si: usize, slot: u32) -> Option<String> {
        let t = self.tables.services.get(si)?.table.as_ref()?;
        t.addr_of_slot(slot).map(|a| a.to_string())
    }

    /// The bytes that hand `slot`'s instance to Envoy (filter-state arguments or
    /// header value), built once per instance.
    fn handoff_payload(&mut self, si: usize, slot: u32) -> Option<&[u8]> {
        if self.slot_cache(si, slot)?.handoff.is_none() {
            let host = self.host_of(si, slot)?;
            let payload = match self.cfg.handoff {
                Handoff::FilterState => handoff::filter_state_args(&host),
                _ => host.into_bytes(),
            };
            self.slot_cache(si, slot)?.handoff = Some(payload);
        }
        self.slot_cache(si, slot)?.handoff.as_deref()
    }

    /// The payload [`Self::handoff_payload`] cached for `slot`.
    fn cached_payload(&self, si: usize, slot: u32) -> Option<&[u8]> {
        self.tables
            .services
            .get(si)?
            .slots
            .get(slot as usize)?
            .handoff
            .as_deref()
    }

    /// Counts a pick of `slot`'s instance (per-instance counter while under the cap).
    fn count_pick(&mut self, si: usize, slot: u32, cap: usize) {
        if let Some(id) = self.slot_cache(si, slot).and_then(|c| c.pick) {
            self.stats.count_pick(id);
            return;
        }
        let (Some(name), Some(host)) = (
            self.cfg.services.get(si).map(|s| s.name.clone()),
            self.host_of(si, slot),
        ) else {
            return;
        };
        if let Some(id) = self.stats.pick(&self.host, &name, &host, cap) {
            if let Some(c) = self.slot_cache(si, slot) {
                c.pick = Some(id);
            }
        }
    }

    /// Tick duty: routes (or fails) the held requests whose service has its first
    /// snapshot now, or whose wait is over. Each is routed as it would have been on
    /// arrival — same hash key and subset — on its own request (effective context).
    pub(super) fn release_held(&mut self, now: u64) {
        if self.requests.held.is_empty() {
            return;
        }
        let held = std::mem::take(&mut self.requests.held);
        for h in held {
            if self.unknown(h.service) && now < h.deadline_ms {
                self.requests.held.push(h);
                continue;
            }
            if self.host.set_effective_context(h.context).is_err() {
                continue; // the request is gone
            }
            self.requests.releasing = true;
            let routed = self.route(h.service, now, &h.key);
            self.requests.releasing = false;
            match routed {
                Ok(routed) => {
                    self.requests.released.insert(h.context, routed);
                    self.host.continue_request();
                }
                Err(Reply(details, body)) => self.host.local_reply(503, details, &body),
            }
        }
    }

    /// Response headers of request `context` (`routed`: how it was routed, `None` if
    /// it was not, or was held and then routed from the timer): the decision header,
    /// the backend's load report if the service reads them.
    pub fn on_response_headers(&mut self, context: u32, routed: Option<&Routed>) {
        let released = match routed {
            None => self.requests.released.get(&context).cloned(),
            Some(_) => None,
        };
        let routed = routed.or(released.as_ref());
        if let Some(x) = &self.cfg.explain {
            // Only this filter's decision reaches the client under this name: an
            // upstream's (or anyone's) header of the same name is removed.
            let value = routed.and_then(|r| r.decision.as_deref());
            let _ = self
                .host
                .set_response_header(&x.header, value.map(str::as_bytes));
        }
        let Some(r) = routed else { return };
        let Some(header) = self
            .cfg
            .services
            .get(r.service)
            .and_then(|s| s.load_report.as_ref())
            .map(|lr| lr.header.clone())
        else {
            return;
        };
        if let Some(v) = self
            .host
            .response_header(&header)
            .and_then(|b| String::from_utf8(b).ok())
        {
            let now = self.host.now_ms();
            self.load_report(r.service, r.slot, &v, now);
        }
    }

    /// The request ended (every outcome, Envoy's own local replies included):
    /// in-flight counts, peak EWMA and outlier accounting.
    pub fn on_log(&mut self, context: u32, routed: Option<Routed>) {
        self.requests.held.retain(|h| h.context != context);
        let Some(routed) = routed.or_else(|| self.requests.released.remove(&context)) else {
            return;
        };
        for id in [routed.gauge, routed.total_gauge].into_iter().flatten() {
            self.host.metric_add(id, -1);
        }
        let Some(svc) = self.cfg.services.get(routed.service) else {
            return;
        };
        let peak = svc.policy == Policy::PeakEwma || svc.shadow_policy.is_some();
        let passive = self.passive_on(routed.service);
        // The response code (0: no response), read once for both.
        let code = if peak || passive {
            int_property(&self.host, &["response", "code"])
        } else {
            0
        };
        if peak {
            let rtt = match int_property(&self.host, &["response", "backend_latency"]) {
                0 => int_property(&self.host, &["request", "duration"]),
                v => v,
            };
            let now = self.host.now_ms();
            let rtt = (rtt > 0).then_some(rtt);
            // No response or a 5xx: a failure, which never makes the instance look fast.
            let failed = code == 0 || code >= 500;
            let (real, shadow) = (
                svc.policy == Policy::PeakEwma,
                svc.shadow_policy == Some(Policy::PeakEwma),
            );
            if let Some(s) = self.tables.services.get_mut(routed.service) {
                for t in [
                    s.table.as_mut().filter(|_| real),
                    s.shadow.as_mut().filter(|_| shadow),
                ]
                .into_iter()
                .flatten()
                {
                    t.peak_end(routed.slot, rtt, failed, now);
                }
            }
            if let (Some(rtt), Some(c)) = (rtt, self.slot_cache(routed.service, routed.slot)) {
                c.latency_ns = Some(match c.latency_ns {
                    Some(old) => old * (1.0 - LATENCY_ALPHA) + rtt as f64 * LATENCY_ALPHA,
                    None => rtt as f64,
                });
            }
        }
        if passive {
            // Host-failure flags come with no response or a 5xx: read them only then.
            let flags = if code == 0 || code >= 500 || !routed.fallbacks.is_empty() {
                int_property(&self.host, &["response", "flags"])
            } else {
                0
            };
            if routed.fallbacks.is_empty() {
                self.finished(routed, code, flags);
            } else {
                let attempts =
                    int_property(&self.host, &["upstream", "request_attempt_count"]).max(1);
                self.finished_attempts(routed, attempts, code, flags);
            }
        }
    }

    /// Accounts for a finished request that took `attempts` tries. With the
    /// `override_host` hand-off, attempt k went to entry k of the ranked list, so
    /// every attempt before the last failed on its host.
    fn finished_attempts(&mut self, r: Routed, attempts: u64, code: u64, flags: u64) {
        let mut last = r.clone();
        if attempts > 1 {
            let tried: Vec<u32> = std::iter::once(r.slot)
                .chain(r.fallbacks.iter().copied())
                .collect();
            let n = (attempts as usize).min(tried.len());
            for (k, slot) in tried.iter().take(n - 1).enumerate() {
                let failed = Routed {
                    slot: *slot,
                    trial: r.trial && k == 0,
                    gauge: None,
                    fallbacks: Vec::new(),
                    decision: None,
                    ..r
                };
                self.finished(failed, 503, outlier::flags::UPSTREAM_CONNECTION_FAILURE);
            }
            last = Routed {
                slot: tried[n - 1],
                trial: false,
                gauge: None,
                fallbacks: Vec::new(),
                decision: None,
                ..r
            };
        }
        self.finished(last, code, flags);
    }

    /// Accounts for a finished request: consecutive failures, ejection, trials.
    fn finished(&mut self, r: Routed, code: u64, flags: u64) {
        let cfg = self.cfg.clone();
        let Some(svc) = cfg.services.get(r.service) else {
            return;
        };
        let policy = svc.outlier_detection.policy();
        // A local reply or a request the client abandoned says nothing about the
        // instance: neither the failure run nor a trial moves (a trial left open
        // times out and is offered again).
        let Some(result) = outlier::judge(code, flags) else {
            return;
        };
        let name = &svc.name;
        // The clock is read only when an ejection state changes (not per success).
        if r.trial {
            let now = self.host.now_ms();
            if self.update_outliers(r.service, now, |o| {
                o.end_trial(r.slot, result, &policy, now)
            }) {
                let ok = result == outlier::Result_::Success;
                let stat = if ok {
                    Stat::OutlierTrialOk
                } else {
                    Stat::OutlierTrialFailed
                };
                self.stats.inc(&self.host, name, stat);
                log::info!(
                    "registry-lb: service {name}: slot {} trial request {}",
                    r.slot,
                    if ok {
                        "succeeded: back in rotation"
                    } else {
                        "failed: ejected again"
                    }
                );
            }
            return;
        }
        let Some(counter) = self.slot_gauge(r.service, r.slot, SlotStat::Consecutive5xx) else {
            return;
        };
        if result == outlier::Result_::Success {
            self.host.metric_record(counter, 0);
            return;
        }
        self.host.metric_add(counter, 1);
        let n = self.host.metric_get(counter).max(0) as u32;
        if n < policy.consecutive_5xx {
            return;
        }
        let known = self
            .tables
            .services
            .get(r.service)
            .and_then(|s| s.table.as_ref())
            .map(|t| t.known)
            .unwrap_or(1);
        let now = self.host.now_ms();
        if self.update_outliers(r.service, now, |o| o.eject(r.slot, n, known, &policy, now)) {
            self.host.metric_record(counter, 0);
            self.stats.inc(&self.host, name, Stat::OutlierEjections);
            let until = self
                .tables
                .services
                .get(r.service)
                .and_then(|s| s.outliers.slots.get(&r.slot))
                .map(|s| s.until_ms.saturating_sub(now))
                .unwrap_or(0);
            log::warn!("registry-lb: service {name}: ejecting slot {} for {until} ms after {n} consecutive failures", r.slot);
        }
    }
}
