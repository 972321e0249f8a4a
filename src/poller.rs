//! Refresh schedule of one service: when to call each source, what to do with the
//! answer, and when a new snapshot is due. No host calls: time and randomness come in.
//!
//! - A success schedules the next call after `refresh_interval`, or at once for a
//!   Consul blocking query (which waits in Consul, not here). A blocking query that
//!   returns unchanged within a second is treated as non-blocking, so a registry
//!   that ignores `index` is not hammered.
//! - A failure keeps the source's last good list (stale-on-error) and retries after
//!   an exponential, jittered backoff.
//! - Sources are merged by `ip:port`; on a conflict the earlier source wins. Nothing
//!   is published before every source has answered or failed once, so a slow source
//!   does not cause a snapshot without its instances at start-up.
//! - A new snapshot is produced only when the merged content hash changes.

use crate::backoff;
use crate::config::ServiceConfig;
use crate::instance::Instance;
use crate::registry::{HttpRequest, HttpResponse, RegistryError, Source, Step};
use crate::rng::Rng;
use crate::snapshot::{self, Entry, Snapshot};
use std::collections::HashSet;

/// An answer that arrives later than this after its call is written off.
const LOST_CALL_GRACE_MS: u64 = 5_000;
/// `Step::Again` (log in, then call) may chain this often before it counts as a failure.
const MAX_AGAIN: u32 = 3;

#[derive(Debug)]
struct SourcePoll {
    source: Source,
    next_due_ms: u64,
    failures: u32,
    in_flight: Option<(u64, u64)>, // (sent at, timeout)
    again: u32,
    answered: bool,
    failed_once: bool,
    last_good: Vec<Instance>,
}

#[derive(Debug)]
pub struct ServicePoller {
    refresh_ms: u64,
    backoff_base_ms: u64,
    backoff_max_ms: u64,
    max_response_bytes: usize,
    sources: Vec<SourcePoll>,
    /// Last snapshot published (by us) or adopted (from another poller).
    pub current: Snapshot,
    dirty: bool,
    /// Wall-clock ms of the last successful refresh (changed or not).
    pub last_ok_ms: u64,
}

/// What one registry answer did.
#[derive(Debug, PartialEq)]
pub enum Outcome {
    /// Same index/revision, or the same content: nothing to publish.
    Unchanged,
    /// A new list was accepted; `rejected` entries were skipped.
    Updated { rejected: Vec<String> },
    /// An intermediate step (login, expired token); the real call follows at once.
    Again(&'static str),
    Failed(RegistryError),
}

impl ServicePoller {
    pub fn new(svc: &ServiceConfig) -> ServicePoller {
        ServicePoller {
            refresh_ms: svc.refresh_interval.0,
            backoff_base_ms: svc.backoff_base.0,
            backoff_max_ms: svc.backoff_max.0,
            max_response_bytes: svc.max_response_bytes,
            sources: svc
                .sources
                .iter()
                .map(|c| SourcePoll {
                    source: Source::new(svc, c),
                    next_due_ms: 0,
                    failures: 0,
                    in_flight: None,
                    again: 0,
                    answered: false,
                    failed_once: false,
                    last_good: Vec::new(),
                })
                .collect(),
            current: Snapshot::default(),
            dirty: false,
            last_ok_ms: 0,
        }
    }

    /// Takes over another poller's published state (on becoming leader, or after
    /// losing a publish race): per-source last good lists, change tokens, slots.
    pub fn adopt(&mut self, snap: Snapshot) {
        if snap.version < self.current.version {
            return;
        }
        for (i, sp) in self.sources.iter_mut().enumerate() {
            if let Some(t) = snap.tokens.get(i) {
                sp.source.restore_token(t);
            }
            sp.answered = snap.answered.get(i).copied().unwrap_or(false);
            sp.last_good = snap
                .entries
                .iter()
                .filter(|e| e.source as usize == i)
                .map(|e| e.instance.clone())
                .collect();
        }
        self.last_ok_ms = self.last_ok_ms.max(snap.published_ms);
        self.current = snap;
        self.dirty = false;
    }

    /// Calls to make now. Static sources answer here, without a call.
    pub fn due(&mut self, now_ms: u64) -> Vec<(usize, HttpRequest)> {
        let mut out = Vec::new();
        for (i, sp) in self.sources.iter_mut().enumerate() {
            if let Some((sent, timeout)) = sp.in_flight {
                if now_ms < sent + timeout + LOST_CALL_GRACE_MS {
                    continue;
                }
                sp.in_flight = None; // lost: schedule normally
            }
            if now_ms < sp.next_due_ms {
                continue;
            }
            match sp.source.request() {
                Some(req) => {
                    sp.in_flight = Some((now_ms, req.timeout_ms));
                    out.push((i, req));
                }
                None => {
                    if let Source::Static(list) = &sp.source {
                        sp.last_good = list.clone();
                    }
                    sp.answered = true;
                    sp.next_due_ms = u64::MAX;
                    self.dirty = true;
                    self.last_ok_ms = now_ms;
                }
            }
        }
        out
    }

    /// The host could not even send the call (unknown cluster, ...).
    pub fn dispatch_failed(&mut self, i: usize, now_ms: u64, rng: &mut impl Rng, why: String) -> Outcome {
        self.fail(i, now_ms, rng, RegistryError::Unreachable(why))
    }

    pub fn on_response(&mut self, i: usize, resp: &HttpResponse, now_ms: u64, rng: &mut impl Rng) -> Outcome {
        let Some(sp) = self.sources.get_mut(i) else { return Outcome::Unchanged };
        let sent = sp.in_flight.take().map(|(s, _)| s).unwrap_or(now_ms);
        match sp.source.on_response(resp, self.max_response_bytes) {
            Ok(Step::Again(why)) => {
                sp.again += 1;
                if sp.again > MAX_AGAIN {
                    sp.again = 0;
                    return self.fail(i, now_ms, rng, RegistryError::Auth("credentials refused repeatedly".into()));
                }
                sp.next_due_ms = now_ms;
                Outcome::Again(why)
            }
            Ok(Step::Unchanged) => {
                sp.again = 0;
                sp.failures = 0;
                sp.answered = true;
                let quick = now_ms.saturating_sub(sent) < 1000;
                sp.next_due_ms = if sp.source.is_blocking() && !quick { now_ms } else { now_ms + self.refresh_ms };
                self.last_ok_ms = now_ms;
                Outcome::Unchanged
            }
            Ok(Step::Instances { instances, rejected }) => {
                sp.again = 0;
                sp.failures = 0;
                sp.answered = true;
                sp.next_due_ms = if sp.source.is_blocking() { now_ms } else { now_ms + self.refresh_ms };
                sp.last_good = instances;
                self.last_ok_ms = now_ms;
                self.dirty = true;
                Outcome::Updated { rejected }
            }
            Err(e) => self.fail(i, now_ms, rng, e),
        }
    }

    fn fail(&mut self, i: usize, now_ms: u64, rng: &mut impl Rng, e: RegistryError) -> Outcome {
        if let Some(sp) = self.sources.get_mut(i) {
            sp.in_flight = None;
            sp.failures = sp.failures.saturating_add(1);
            sp.failed_once = true;
            sp.next_due_ms = now_ms + backoff::delay_ms(sp.failures, self.backoff_base_ms, self.backoff_max_ms, rng);
            // A first failure can release a snapshot held back waiting for this source.
            self.dirty = true;
        }
        Outcome::Failed(e)
    }

    /// Merged instances, earlier sources first; `None` until every source has
    /// answered or failed once.
    fn merged(&self) -> Option<Vec<(Instance, u8)>> {
        if !self.sources.iter().all(|s| s.answered || s.failed_once) {
            return None;
        }
        let mut seen = HashSet::new();
        let mut out = Vec::new();
        for (i, sp) in self.sources.iter().enumerate() {
            for inst in &sp.last_good {
                if seen.insert(inst.addr) {
                    out.push((inst.clone(), i as u8));
                }
            }
        }
        Some(out)
    }

    /// A snapshot to publish, if the content changed since the current one.
    pub fn publication(&mut self, now_ms: u64) -> Option<Snapshot> {
        if !self.dirty {
            return None;
        }
        let merged = self.merged()?;
        self.dirty = false;
        let tokens: Vec<String> = self.sources.iter().map(|s| s.source.token()).collect();
        let answered: Vec<bool> = self.sources.iter().map(|s| s.answered).collect();
        let hash = snapshot::content_hash(merged.iter().map(|(i, _)| i));
        let first = self.current.version == 0;
        if !first && hash == self.current.hash {
            // Same routing content; keep tokens current without re-publishing.
            self.current.tokens = tokens;
            self.current.answered = answered;
            return None;
        }
        let entries: Vec<Entry> = snapshot::assign_slots(&self.current.entries, merged);
        Some(Snapshot {
            version: self.current.version + 1,
            hash,
            published_ms: now_ms,
            tokens,
            answered,
            entries,
        })
    }

    /// The host stored `snap` in shared data.
    pub fn published(&mut self, snap: Snapshot) {
        self.current = snap;
    }

    /// Number of sources (for metrics).
    pub fn source_kinds(&self) -> Vec<&'static str> {
        self.sources
            .iter()
            .map(|s| match s.source {
                Source::Consul(_) => "consul",
                Source::Etcd(_) => "etcd",
                Source::Static(_) => "static",
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::PluginConfig;
    use crate::rng::SplitMix64;
    use wasm_bindgen_test::wasm_bindgen_test;

    fn poller(sources: &str) -> ServicePoller {
        let c = PluginConfig::parse(
            format!(r#"{{"services":[{{"name":"web","refresh_interval":"1s","sources":[{sources}]}}]}}"#).as_bytes(),
        )
        .unwrap();
        ServicePoller::new(&c.services[0])
    }

    fn consul_body(ips: &[&str]) -> String {
        let items: Vec<String> = ips
            .iter()
            .map(|ip| format!(r#"{{"Node":{{"Address":"10.9.9.9"}},"Service":{{"ID":"{ip}","Address":"{ip}","Port":80}},"Checks":[]}}"#))
            .collect();
        format!("[{}]", items.join(","))
    }

    fn consul_ok(index: &str) -> Vec<(String, String)> {
        vec![("x-consul-index".into(), index.into()), ("server".into(), "consul".into())]
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn static_source_publishes_once() {
        let mut p = poller(r#"{"static":{"instances":[{"address":"10.0.0.1","port":80,"weight":2}]}}"#);
        assert!(p.due(0).is_empty());
        let s = p.publication(0).unwrap();
        assert_eq!(s.version, 1);
        assert_eq!(s.entries[0].instance.weight, 2);
        p.published(s);
        assert!(p.due(10_000).is_empty());
        assert!(p.publication(10_000).is_none());
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn consul_blocking_cycle_and_unchanged_costs_nothing() {
        let mut p = poller(r#"{"consul":{"cluster":"consul"}}"#);
        let mut r = SplitMix64(1);
        let calls = p.due(0);
        assert_eq!(calls.len(), 1);
        assert!(p.due(10).is_empty(), "one call in flight at a time");
        let body = consul_body(&["10.0.0.1", "10.0.0.2"]);
        let h = consul_ok("5");
        let out = p.on_response(0, &HttpResponse { status: 200, headers: &h, body: body.as_bytes() }, 20, &mut r);
        assert_eq!(out, Outcome::Updated { rejected: vec![] });
        let s = p.publication(20).unwrap();
        assert_eq!(s.tokens, ["5"]);
        p.published(s);
        // Blocking: next call at once, with the index.
        let calls = p.due(20);
        assert!(calls[0].1.path.contains("index=5"));
        // Unchanged after a long wait: straight back to blocking, nothing published.
        let out = p.on_response(0, &HttpResponse { status: 200, headers: &h, body: b"" }, 30_020, &mut r);
        assert_eq!(out, Outcome::Unchanged);
        assert!(p.publication(30_020).is_none());
        assert_eq!(p.due(30_020).len(), 1);
        // Unchanged at once (index ignored by the server): fall back to the interval.
        p.on_response(0, &HttpResponse { status: 200, headers: &h, body: b"" }, 30_030, &mut r);
        assert!(p.due(30_040).is_empty());
        assert_eq!(p.due(31_030).len(), 1);
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn failures_back_off_and_keep_last_good() {
        let mut p = poller(r#"{"consul":{"cluster":"consul","blocking":false}}"#);
        let mut r = SplitMix64(4);
        p.due(0);
        let body = consul_body(&["10.0.0.1"]);
        let h = consul_ok("3");
        p.on_response(0, &HttpResponse { status: 200, headers: &h, body: body.as_bytes() }, 0, &mut r);
        let s = p.publication(0).unwrap();
        p.published(s);
        let mut now = 0;
        let mut delays = Vec::new();
        for k in 0..7 {
            let next = (now..now + 60_000).find(|t| !p.due(*t).is_empty()).unwrap();
            if k > 0 {
                delays.push(next - now);
            }
            let out = p.on_response(0, &HttpResponse { status: 500, headers: &h, body: b"boom" }, next, &mut r);
            assert!(matches!(out, Outcome::Failed(RegistryError::Status(500, _))));
            assert!(p.publication(next).is_none(), "a failure never publishes a change");
            now = next;
        }
        assert!(delays.windows(2).all(|w| w[1] >= w[0] / 2), "{delays:?}");
        assert!(*delays.last().unwrap() > 4 * delays[0], "{delays:?}");
        assert_eq!(p.current.entries.len(), 1);
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn merge_waits_for_every_source_and_earlier_wins() {
        let mut p = poller(
            r#"{"consul":{"cluster":"consul","blocking":false}},
               {"static":{"instances":[{"address":"10.0.0.1","port":80,"weight":9},{"address":"10.0.0.3","port":80}]}}"#,
        );
        let mut r = SplitMix64(4);
        assert_eq!(p.due(0).len(), 1);
        assert!(p.publication(0).is_none(), "consul has not answered yet");
        let body = consul_body(&["10.0.0.1", "10.0.0.2"]);
        let h = consul_ok("3");
        p.on_response(0, &HttpResponse { status: 200, headers: &h, body: body.as_bytes() }, 5, &mut r);
        let s = p.publication(5).unwrap();
        let got: Vec<(String, u32, u8)> =
            s.entries.iter().map(|e| (e.instance.addr.to_string(), e.instance.weight, e.source)).collect();
        assert_eq!(
            got,
            [("10.0.0.1:80".into(), 1, 0), ("10.0.0.2:80".into(), 1, 0), ("10.0.0.3:80".into(), 1, 1)]
        );
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn a_failing_source_does_not_block_the_others() {
        let mut p = poller(
            r#"{"consul":{"cluster":"consul","blocking":false}},
               {"static":{"instances":[{"address":"10.0.0.3","port":80}]}}"#,
        );
        let mut r = SplitMix64(4);
        p.due(0);
        p.dispatch_failed(0, 0, &mut r, "unknown cluster".into());
        let s = p.publication(0).unwrap();
        assert_eq!(s.entries.len(), 1);
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn a_new_leader_adopts_tokens_and_lists() {
        let mut a = poller(r#"{"consul":{"cluster":"consul"}}"#);
        let mut r = SplitMix64(4);
        a.due(0);
        let body = consul_body(&["10.0.0.1", "10.0.0.2"]);
        let h = consul_ok("77");
        a.on_response(0, &HttpResponse { status: 200, headers: &h, body: body.as_bytes() }, 5, &mut r);
        let s = a.publication(5).unwrap();
        let bytes = s.encode();

        let mut b = poller(r#"{"consul":{"cluster":"consul"}}"#);
        b.adopt(Snapshot::decode(&bytes).unwrap());
        let calls = b.due(100);
        assert!(calls[0].1.path.contains("index=77"), "{}", calls[0].1.path);
        // The same content again is not re-published.
        b.on_response(0, &HttpResponse { status: 200, headers: &consul_ok("78"), body: body.as_bytes() }, 200, &mut r);
        assert!(b.publication(200).is_none());
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn lost_calls_are_written_off() {
        let mut p = poller(r#"{"consul":{"cluster":"consul","blocking":false}}"#);
        assert_eq!(p.due(0).len(), 1);
        assert!(p.due(5000 + LOST_CALL_GRACE_MS - 1).is_empty());
        assert_eq!(p.due(5000 + LOST_CALL_GRACE_MS).len(), 1);
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn login_chain_is_bounded() {
        let mut p = poller(r#"{"etcd":{"cluster":"etcd","username":"u","password":"p"}}"#);
        let mut r = SplitMix64(4);
        let auth = br#"{"token":"t1"}"#;
        let expired = br#"{"error":"etcdserver: invalid auth token","code":16}"#;
        let mut outcomes = Vec::new();
        for t in 0..8 {
            let calls = p.due(t);
            if calls.is_empty() {
                break;
            }
            let body: &[u8] = if calls[0].1.path.ends_with("authenticate") { auth } else { expired };
            let status = if body == auth { 200 } else { 401 };
            outcomes.push(p.on_response(0, &HttpResponse { status, headers: &[], body }, t, &mut r));
        }
        assert!(matches!(outcomes.last(), Some(Outcome::Failed(RegistryError::Auth(_)))), "{outcomes:?}");
    }
}
