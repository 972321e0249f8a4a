//! The status view: a configured path this filter answers itself, never forwarded,
//! to configured client ranges only (loopback by default; others get 403). Per
//! service: the snapshot (version, ages, the last refresh error), zone shares, and
//! every non-draining instance with its registry health, active health, ejection
//! state, effective weight and its factors, in-flight count and latency estimate.
//!
//! JSON by default; `?format=text` (or an `Accept` that prefers `text/plain`) gives
//! one line per instance for a person. Text from registries is escaped: JSON escapes
//! control characters itself, the text form escapes them as Envoy's log does
//! (`log_text`). The view is the answering worker's: shared counts (in flight with
//! `least_request` or bounded loads, ejections, snapshot) are the same in every
//! worker, latency estimates and `peak_ewma` pending counts are that worker's own.

use super::Plugin;
use crate::envoy::Envoy;
use crate::explain::policy_name;
use crate::log_text::escape_control;
use crate::outlier::Breaker;
use crate::slow_start::{self, FirstSeen};
use crate::stats::{GlobalStat, SlotStat, Stat};
use serde_json::{json, Value};

impl<H: Envoy> Plugin<H> {
    /// Answers the request if it is for the status path; returns whether it did.
    pub(super) fn serve_status(&mut self) -> bool {
        let Some(st) = self.cfg.status.clone() else {
            return false;
        };
        let Some(path) = self.host.request_header(":path") else {
            return false;
        };
        let (p, query) = match path.iter().position(|&b| b == b'?') {
            Some(q) => (&path[..q], &path[q + 1..]),
            None => (&path[..], &b""[..]),
        };
        if p != st.path.as_bytes() {
            return false;
        }
        if !self.source_allowed(&st.ranges, st.trust_forwarded_for) {
            self.stats
                .inc_global(&self.host, GlobalStat::StatusForbidden);
            self.host.local_reply(
                403,
                "registry_lb_status_forbidden",
                "registry-lb: the status view is answered to configured sources only\n",
            );
            return true;
        }
        let text = query.split(|&b| b == b'&').any(|kv| kv == b"format=text")
            || self
                .host
                .request_header("accept")
                .is_some_and(|a| a.starts_with(b"text/plain"));
        let now = self.host.now_ms();
        let view = self.status_view(now);
        self.stats.inc_global(&self.host, GlobalStat::StatusServed);
        if text {
            self.host.local_reply_as(
                200,
                "registry_lb_status",
                &status_text(&view),
                "text/plain; charset=utf-8",
            );
        } else {
            let mut body = view.to_string();
            body.push('\n');
            self.host
                .local_reply_as(200, "registry_lb_status", &body, "application/json");
        }
        true
    }

    /// Whether the client is inside `ranges`: Envoy's downstream address
    /// (`source.address`), and — unless `trust_forwarded_for` — no `x-forwarded-for`
    /// header, from which Envoy would have taken that address.
    pub(super) fn source_allowed(
        &self,
        ranges: &[crate::cidr::Cidr],
        trust_forwarded_for: bool,
    ) -> bool {
        if !trust_forwarded_for && self.host.request_header("x-forwarded-for").is_some() {
            return false;
        }
        let source = self.host.property(&["source", "address"]);
        crate::cidr::allowed(ranges, source.as_deref())
    }

    /// The whole view as JSON.
    pub(super) fn status_view(&mut self, now: u64) -> Value {
        let services: Vec<Value> = (0..self.cfg.services.len())
            .map(|si| self.service_view(si, now))
            .collect();
        json!({ "now_ms": now, "services": services })
    }

    fn service_view(&mut self, si: usize, now: u64) -> Value {
        let cfg = self.cfg.clone();
        let svc = &cfg.services[si];
        let confirmed_age = self
            .stats
            .id(&self.host, &svc.name, Stat::SnapshotAgeMs)
            .map(|id| self.host.metric_get(id));
        let error = self
            .keys
            .error
            .get(si)
            .and_then(|k| self.host.shared_get(k).0)
            .map(|b| {
                let t = String::from_utf8_lossy(&b).into_owned();
                let (at, text) = t.split_once(' ').unwrap_or(("0", &t));
                let at: u64 = at.parse().unwrap_or(0);
                json!({ "at_ms": at, "age_ms": now.saturating_sub(at), "error": text })
            });
        let hc_on = svc.health_check.is_some();
        let shared_load = svc.shared_in_flight();
        let Some(state) = self.tables.services.get(si) else {
            return json!({ "name": svc.name });
        };
        let Some(table) = state.table.as_ref() else {
            return json!({
                "name": svc.name,
                "policy": policy_name(svc.policy),
                "shadow_policy": svc.shadow_policy.map(policy_name),
                "snapshot": Value::Null,
                "last_refresh_error": error,
                "instances": [],
            });
        };
        let zone_shares = table.zone_shares();
        let w = &state.weights;
        let mut instances = Vec::new();
        let views = table.instances();
        for v in &views {
            let slow_ppm = w.slow.as_ref().map(|ss| {
                let seen = w.first_seen.get(&v.addr).unwrap_or(FirstSeen::Initial);
                let registered = Some(v.registered_ms).filter(|&t| t > 0);
                ss.factor_ppm(slow_start::age_ms(now, registered, seen))
            });
            let load_ppm = w
                .load
                .as_ref()
                .and_then(|l| l.multiplier_ppm(v.slot as usize, now));
            let zone_share = zone_shares
                .iter()
                .find(|(z, _)| *z == v.zone)
                .map(|(_, p)| f64::from(*p) / 1e6);
            let ejection = match state.outliers.slots.get(&v.slot) {
                None => json!("none"),
                Some(s) if s.breaker == Breaker::HalfOpen => json!("half_open"),
                Some(s) => json!({
                    "ejected_for_ms": s.until_ms.saturating_sub(now),
                    "times": s.times,
                }),
            };
            let active = if !hc_on {
                "off"
            } else if state.outliers.hc_down.contains(&v.slot) {
                "failing"
            } else {
                "passing"
            };
            let slot = state.slots.get(v.slot as usize);
            let latency_ms = slot.and_then(|c| c.latency_ns).map(|ns| ns / 1e6);
            let peak = table.peak_cost(v.slot, now);
            instances.push(json!({
                "address": v.addr.to_string(),
                "slot": v.slot,
                "zone": v.zone,
                "registry_health": if v.registry_healthy { "healthy" } else { "unhealthy" },
                "active_health": active,
                "ejection": ejection,
                "routable": v.routable,
                "weight": {
                    "registry": v.registry_weight,
                    "slow_start": slow_ppm.map(|p| f64::from(p) / 1e6),
                    "load_report": load_ppm.map(|p| f64::from(p) / 1e6),
                    "zone_share": zone_share,
                    "effective": v.effective_weight,
                },
                "in_flight": Value::Null,
                "worker_pending": peak.map(|(_, p)| p),
                "latency_ms": latency_ms,
                "peak_ewma_cost_ms": peak.map(|(c, _)| c / 1e6),
            }));
        }
        let (version, published_ms, panic, known, routable) = (
            table.version,
            table.published_ms,
            table.panic,
            table.known,
            table.endpoints.len(),
        );
        let stale = state.stale;
        if shared_load {
            for (v, out) in views.iter().zip(instances.iter_mut()) {
                let n = self
                    .slot_gauge(si, v.slot, SlotStat::RqActive)
                    .map(|id| self.host.metric_get(id));
                out["in_flight"] = json!(n);
            }
        }
        json!({
            "name": svc.name,
            "policy": policy_name(svc.policy),
            "shadow_policy": svc.shadow_policy.map(policy_name),
            "snapshot": {
                "version": version,
                "published_age_ms": now.saturating_sub(published_ms),
                "confirmed_age_ms": confirmed_age,
            },
            "stale": stale,
            "panic": panic,
            "instances_known": known,
            "instances_draining": known.saturating_sub(views.len()),
            "instances_routable": routable,
            "zone_shares": zone_shares.iter().map(|(z, p)| json!({"zone": z, "share": f64::from(*p) / 1e6})).collect::<Vec<_>>(),
            "last_refresh_error": error,
            "instances": instances,
        })
    }
}

/// The view for a person: a header per service, a line per instance.
fn status_text(view: &Value) -> String {
    use std::fmt::Write;
    let s = |v: &Value| -> String {
        match v {
            Value::Null => "-".to_string(),
            Value::String(t) => escape_control(t).into_owned(),
            Value::Number(n) => match n.as_f64() {
                Some(f) if n.is_f64() => format!("{f:.3}"),
                _ => n.to_string(),
            },
            other => escape_control(&other.to_string()).into_owned(),
        }
    };
    let mut out = String::new();
    for svc in view["services"].as_array().into_iter().flatten() {
        let snap = &svc["snapshot"];
        let _ = writeln!(
            out,
            "service {}  policy {}  shadow {}  version {}  published {} ms ago  confirmed {} ms ago  stale {}  panic {}  routable {}/{} (draining {})",
            s(&svc["name"]),
            s(&svc["policy"]),
            s(&svc["shadow_policy"]),
            s(&snap["version"]),
            s(&snap["published_age_ms"]),
            s(&snap["confirmed_age_ms"]),
            s(&svc["stale"]),
            s(&svc["panic"]),
            s(&svc["instances_routable"]),
            s(&svc["instances_known"]),
            s(&svc["instances_draining"]),
        );
        let e = &svc["last_refresh_error"];
        if !e.is_null() {
            let _ = writeln!(
                out,
                "  last refresh error {} ms ago: {}",
                s(&e["age_ms"]),
                s(&e["error"])
            );
        }
        for z in svc["zone_shares"].as_array().into_iter().flatten() {
            let _ = writeln!(out, "  zone {} share {}", s(&z["zone"]), s(&z["share"]));
        }
        let _ = writeln!(
            out,
            "  {:<24} {:>4} {:<10} {:<9} {:<7} {:<9} {:>8} {:>9} {:>7} {:>8} {:>10} {:>9} {:>10}",
            "address",
            "slot",
            "zone",
            "registry",
            "active",
            "routable",
            "weight",
            "slow",
            "load",
            "zone",
            "effective",
            "in_flight",
            "latency_ms"
        );
        for i in svc["instances"].as_array().into_iter().flatten() {
            let w = &i["weight"];
            let ej = &i["ejection"];
            let ejected = if ej.is_object() {
                format!("  ejected {} ms", s(&ej["ejected_for_ms"]))
            } else if ej == "half_open" {
                "  half_open".to_string()
            } else {
                String::new()
            };
            let inflight = if i["in_flight"].is_null() {
                &i["worker_pending"]
            } else {
                &i["in_flight"]
            };
            let _ = writeln!(
                out,
                "  {:<24} {:>4} {:<10} {:<9} {:<7} {:<9} {:>8} {:>9} {:>7} {:>8} {:>10} {:>9} {:>10}{ejected}",
                s(&i["address"]),
                s(&i["slot"]),
                s(&i["zone"]),
                s(&i["registry_health"]),
                s(&i["active_health"]),
                s(&i["routable"]),
                s(&w["registry"]),
                s(&w["slow_start"]),
                s(&w["load_report"]),
                s(&w["zone_share"]),
                s(&w["effective"]),
                s(inflight),
                s(&i["latency_ms"]),
            );
        }
    }
    out
}
