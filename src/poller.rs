//! Refresh schedule of one service: when to call each source, what to do with the
//! answer, and when a new snapshot is due. No host calls: time and randomness come in.
//!
//! - A success schedules the next call on this poller's grid: the first point
//!   `phase + k × refresh_interval` at least `refresh_interval` after the call was
//!   sent, or at once for a Consul blocking query (which waits in Consul, not here).
//!   The phase is drawn at random once per leader ([`ServicePoller::set_phase`]), so
//!   a fleet that starts together spreads its polls over the interval from the second
//!   call on (one to two intervals after the first), keeps its spread through registry
//!   outages (after a retry, a source is back on its own grid at the first point at
//!   least half an interval later), and every service of one Envoy with the same
//!   interval is due in the same tick, which lets identical calls be made once
//!   (Eureka's `/apps`).
//!   `start_jitter` also delays the first call by a random time (0 = at once). A
//!   blocking query that returns unchanged within a second is treated as
//!   non-blocking, so a registry that ignores `index` is not hammered.
//! - A failure keeps the source's last good list (stale-on-error) and retries after
//!   an exponential, jittered backoff.
//! - Sources are merged by `ip:port`; on a conflict the earlier source wins. Nothing
//!   is published before every source has answered or failed once, so a slow source
//!   does not cause a snapshot without its instances at start-up.
//! - A new snapshot is produced only when the merged content hash changes.
//! - Mass-deregistration guard: a change that would drop more than
//!   `guard_max_drop_percent` of the routable instances, or leave none, is held
//!   back and re-read; it is published only when `guard_confirmations` refreshes in
//!   a row say the same. A registry outage that answers `[]` for a moment does not
//!   black-hole traffic; a real scale-down goes through after a few refreshes.

use crate::backoff;
use crate::config::{ServiceConfig, SourceConfig};
use crate::instance::Instance;
use crate::registry::{
    consul, etcd, eureka, kubernetes, nacos, HttpRequest, HttpResponse, RegistryError, Source, Step,
};
use crate::rng::Rng;
use crate::snapshot::{self, Entry, Snapshot};

/// An answer that arrives later than this after its call is written off.
const LOST_CALL_GRACE_MS: u64 = 5_000;
/// `Step::Again` (log in, then call) may chain this often before it counts as a failure.
const MAX_AGAIN: u32 = 3;

/// Where one configured source's instances come from.
#[derive(Debug)]
enum Feed {
    /// A registry, called on a schedule.
    Registry(Box<Source>),
    /// A list from the configuration: no calls, taken as it is once.
    Static(Vec<Instance>),
}

impl Feed {
    fn new(svc: &ServiceConfig, cfg: &SourceConfig) -> Feed {
        let to = svc.for_registry();
        let source = match cfg {
            SourceConfig::Static(s) => return Feed::Static(s.instances()),
            SourceConfig::Consul(c) => Source::Consul(consul::Consul::new(to, c)),
            SourceConfig::Etcd(e) => Source::Etcd(etcd::Etcd::new(to, e)),
            SourceConfig::Nacos(n) => Source::Nacos(nacos::Nacos::new(to, n)),
            SourceConfig::Eureka(e) => Source::Eureka(eureka::Eureka::new(to, e)),
            SourceConfig::Kubernetes(k) => Source::Kubernetes(kubernetes::Kubernetes::new(to, k)),
        };
        Feed::Registry(Box::new(source))
    }

    /// Change token to carry over to another poller; a static list has none.
    fn token(&self) -> String {
        match self {
            Feed::Registry(s) => s.token(),
            Feed::Static(_) => String::new(),
        }
    }

    fn is_blocking(&self) -> bool {
        matches!(self, Feed::Registry(s) if s.is_blocking())
    }
}

#[derive(Debug)]
struct SourcePoll {
    source: Feed,
    next_due_ms: u64,
    failures: u32,
    in_flight: Option<(u64, u64)>, // (sent at, timeout)
    /// When the call in flight was due (0: at once, the first call).
    scheduled_ms: u64,
    again: u32,
    answered: bool,
    failed_once: bool,
    last_good: Vec<Instance>,
    /// Wall-clock ms of this source's last successful answer.
    last_ok_ms: u64,
}

#[derive(Debug)]
pub struct ServicePoller {
    refresh_ms: u64,
    /// Offset of this poller's grid of calls (see [`ServicePoller::set_phase`]).
    phase_ms: u64,
    start_jitter_ms: u64,
    backoff_base_ms: u64,
    backoff_max_ms: u64,
    max_response_bytes: usize,
    sources: Vec<SourcePoll>,
    /// Last snapshot published (by us) or adopted (from another poller).
    pub current: Snapshot,
    dirty: bool,
    /// Wall-clock ms of the last successful refresh (changed or not).
    pub last_ok_ms: u64,
    guard_max_drop_percent: u32,
    guard_confirmations: u32,
    /// A held change: (content hash, times seen).
    held: Option<(u64, u32)>,
    /// Guard decisions for the host to log and count: (event, message).
    pub guard_events: Vec<(&'static str, String)>,
    /// Slow start's metadata key for registration times (`None` without slow start).
    registered_at_key: Option<String>,
}

/// The first point of the grid `phase + k × interval` at least one interval after
/// `from_ms`: on the grid, the next point; off it (a first call, a retry after a
/// failure), between one and two intervals later.
pub fn grid_after(phase_ms: u64, interval_ms: u64, from_ms: u64) -> u64 {
    let i = interval_ms.max(1);
    let t = from_ms.saturating_add(i);
    if t <= phase_ms {
        return phase_ms;
    }
    let k = (t - phase_ms).div_ceil(i);
    phase_ms.saturating_add(k.saturating_mul(i))
}

/// What one registry answer did.
#[derive(Debug, PartialEq)]
pub enum Outcome {
    /// Same index/revision, or the same content: nothing to publish.
    Unchanged,
    /// A new list was accepted; `rejected` entries were skipped; `warnings` are about
    /// the answer as a whole (logged and counted as `registry_warning`).
    Updated {
        rejected: crate::instance::Rejected,
        warnings: Vec<String>,
    },
    /// An intermediate step (login, expired token); the real call follows at once.
    Again(&'static str),
    Failed(RegistryError),
}

impl Outcome {
    /// One word for logs: `unchanged`, `updated`, `again` or `failed`.
    pub fn kind(&self) -> &'static str {
        match self {
            Outcome::Unchanged => "unchanged",
            Outcome::Updated { .. } => "updated",
            Outcome::Again(_) => "again",
            Outcome::Failed(_) => "failed",
        }
    }
}

impl ServicePoller {
    pub fn new(svc: &ServiceConfig) -> ServicePoller {
        ServicePoller {
            refresh_ms: svc.refresh_interval.0,
            phase_ms: 0,
            start_jitter_ms: svc.start_jitter.0,
            backoff_base_ms: svc.backoff_base.0,
            backoff_max_ms: svc.backoff_max.0,
            max_response_bytes: svc.max_response_bytes,
            sources: svc
                .sources
                .iter()
                .map(|c| SourcePoll {
                    source: Feed::new(svc, c),
                    next_due_ms: 0,
                    failures: 0,
                    in_flight: None,
                    scheduled_ms: 0,
                    again: 0,
                    answered: false,
                    failed_once: false,
                    last_good: Vec::new(),
                    last_ok_ms: 0,
                })
                .collect(),
            current: Snapshot::default(),
            dirty: false,
            last_ok_ms: 0,
            guard_max_drop_percent: svc.guard_max_drop_percent,
            guard_confirmations: svc.guard_confirmations,
            held: None,
            guard_events: Vec::new(),
            registered_at_key: svc
                .slow_start
                .as_ref()
                .map(|s| s.registered_at_key.clone())
                .filter(|k| !k.is_empty()),
        }
    }

    /// Places this poller's calls on the grid `phase + k × refresh_interval`; after
    /// taking over from another leader, resumes one interval after its last
    /// publication; with `start_jitter`, delays the first calls by a random time below it. `phase`
    /// is one random number per leader, shared by its services.
    pub fn set_phase(&mut self, phase: u64, now_ms: u64, rng: &mut impl Rng) {
        self.phase_ms = phase % self.refresh_ms.max(1);
        // A leader taking over (another root's snapshot adopted: at start-up, a root
        // that serves no requests takes the lease from a worker) goes on where the
        // last one was: polled sources are called one interval after the last
        // publication, not at once a second time.
        if self.current.version > 0 {
            let resume = self.current.published_ms.saturating_add(self.refresh_ms);
            for sp in &mut self.sources {
                let polled = matches!(&sp.source, Feed::Registry(s) if !s.is_blocking());
                if polled && sp.answered && resume > now_ms {
                    sp.next_due_ms = sp.next_due_ms.max(resume);
                }
            }
        }
        if self.start_jitter_ms > 0 {
            for sp in &mut self.sources {
                if matches!(sp.source, Feed::Registry(_)) && sp.next_due_ms <= now_ms {
                    sp.next_due_ms = now_ms + rng.below(self.start_jitter_ms);
                }
            }
        }
    }

    /// Takes over another poller's published state (on becoming leader, or after
    /// losing a publish race): per-source last good lists, change tokens, slots.
    pub fn adopt(&mut self, snap: Snapshot) {
        if snap.version < self.current.version {
            return;
        }
        for (i, sp) in self.sources.iter_mut().enumerate() {
            if let (Some(t), Feed::Registry(s)) = (snap.tokens.get(i), &mut sp.source) {
                s.restore_token(t);
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
            match &mut sp.source {
                Feed::Registry(source) => {
                    let req = source.request(now_ms);
                    sp.in_flight = Some((now_ms, req.timeout_ms));
                    // A call that follows an intermediate step (a login, etcd's change
                    // check) continues the same poll: its schedule is the poll's.
                    if sp.again == 0 {
                        sp.scheduled_ms = sp.next_due_ms;
                    }
                    out.push((i, req));
                }
                Feed::Static(list) => {
                    sp.last_good = list.clone();
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
    pub fn dispatch_failed(
        &mut self,
        i: usize,
        now_ms: u64,
        rng: &mut impl Rng,
        why: String,
    ) -> Outcome {
        self.fail(i, now_ms, rng, RegistryError::Unreachable(why))
    }

    /// Source `i` answered with a body over `max_response_bytes`, which was not
    /// read: a failure like any other (last good list kept, backoff).
    pub fn answer_too_large(
        &mut self,
        i: usize,
        now_ms: u64,
        rng: &mut impl Rng,
        size: usize,
    ) -> Outcome {
        self.fail(i, now_ms, rng, RegistryError::TooLarge(size))
    }

    pub fn on_response(
        &mut self,
        i: usize,
        resp: &HttpResponse,
        now_ms: u64,
        rng: &mut impl Rng,
    ) -> Outcome {
        // Only a registry makes calls; an answer for anything else is not ours.
        let Some(sp) = self.sources.get_mut(i) else {
            return Outcome::Unchanged;
        };
        let Feed::Registry(source) = &mut sp.source else {
            return Outcome::Unchanged;
        };
        let sent = sp.in_flight.take().map(|(s, _)| s).unwrap_or(now_ms);
        // From when the call was due, not when a tick sent it: the grid does not slip
        // by the tick's lag (bounded, for a call long overdue, to half an interval).
        // The first call: the grid point one to two intervals later (a fleet started
        // together spreads out without calling twice in an interval). A call off the
        // grid (a retry, a follow-up, a resumption): back on the grid at the first
        // point at least half an interval later, so a change is not seen later than
        // 1.5 intervals after a registry comes back.
        let every = self.refresh_ms.max(1);
        let base = match sp.scheduled_ms {
            0 => sent,
            due if due >= self.phase_ms && (due - self.phase_ms) % every == 0 => {
                due.max(sent.saturating_sub(every / 2))
            }
            _ => sent.saturating_sub(every / 2),
        };
        let next_on_grid = grid_after(self.phase_ms, self.refresh_ms, base);
        match source.on_response(resp, self.max_response_bytes) {
            Ok(Step::Again(why)) => {
                sp.again += 1;
                if sp.again > MAX_AGAIN {
                    sp.again = 0;
                    return self.fail(
                        i,
                        now_ms,
                        rng,
                        RegistryError::Auth("credentials refused repeatedly".into()),
                    );
                }
                sp.next_due_ms = now_ms;
                Outcome::Again(why)
            }
            Ok(Step::Unchanged) => {
                sp.again = 0;
                sp.failures = 0;
                sp.answered = true;
                sp.last_ok_ms = now_ms;
                let quick = now_ms.saturating_sub(sent) < 1000;
                sp.next_due_ms = if source.is_blocking() && !quick {
                    now_ms
                } else {
                    next_on_grid
                };
                self.last_ok_ms = now_ms;
                if self.held.is_some() {
                    // The registry still says the same: that confirms a held change.
                    self.dirty = true;
                }
                Outcome::Unchanged
            }
            Ok(Step::Instances {
                instances,
                rejected,
                warnings,
            }) => {
                sp.again = 0;
                sp.failures = 0;
                sp.answered = true;
                sp.last_ok_ms = now_ms;
                sp.next_due_ms = if source.is_blocking() {
                    now_ms
                } else {
                    next_on_grid
                };
                sp.last_good = instances;
                self.last_ok_ms = now_ms;
                self.dirty = true;
                Outcome::Updated { rejected, warnings }
            }
            Err(e) => self.fail(i, now_ms, rng, e),
        }
    }

    fn fail(&mut self, i: usize, now_ms: u64, rng: &mut impl Rng, e: RegistryError) -> Outcome {
        if let Some(sp) = self.sources.get_mut(i) {
            sp.in_flight = None;
            sp.again = 0;
            sp.failures = sp.failures.saturating_add(1);
            sp.failed_once = true;
            sp.next_due_ms = now_ms
                + backoff::delay_ms(sp.failures, self.backoff_base_ms, self.backoff_max_ms, rng);
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
        let mut seen = fnv::FnvHashSet::default();
        let mut out = Vec::new();
        for (i, sp) in self.sources.iter().enumerate() {
            for inst in &sp.last_good {
                if seen.insert(inst.addr) {
                    let mut inst = inst.clone();
                    if let (0, Some(key)) = (inst.registered_ms, &self.registered_at_key) {
                        let v = inst
                            .metadata
                            .iter()
                            .find(|(k, _)| k == key)
                            .map(|(_, v)| v.as_str());
                        inst.registered_ms = v
                            .and_then(crate::instance::parse_registered_at)
                            .unwrap_or(0);
                    }
                    out.push((inst, i as u8));
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
            self.held = None;
            // Same routing content; keep tokens current without re-publishing.
            self.current.tokens = tokens;
            self.current.answered = answered;
            return None;
        }
        if !first && self.guard_holds(&merged, hash) {
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

    /// Whether the guard holds this change back (and schedules a re-read).
    fn guard_holds(&mut self, merged: &[(Instance, u8)], hash: u64) -> bool {
        use crate::instance::State;
        if self.guard_max_drop_percent >= 100 {
            return false;
        }
        let before = self
            .current
            .entries
            .iter()
            .filter(|e| e.instance.state == State::Healthy)
            .count() as u64;
        let after = merged
            .iter()
            .filter(|(i, _)| i.state == State::Healthy)
            .count() as u64;
        let dropped = before.saturating_sub(after);
        let suspicious = before > 0
            && (after == 0 || dropped * 100 > u64::from(self.guard_max_drop_percent) * before);
        if !suspicious {
            self.held = None;
            return false;
        }
        let seen = match self.held {
            Some((h, n)) if h == hash => n + 1,
            _ => 1,
        };
        if seen >= self.guard_confirmations {
            self.held = None;
            self.guard_events.push((
                "guard_released",
                format!("drop from {before} to {after} routable instance(s) confirmed {seen} times: applying it"),
            ));
            return false;
        }
        self.held = Some((hash, seen));
        self.guard_events.push((
            "guard_held",
            format!(
                "refresh would drop routable instances from {before} to {after}; held back ({seen} of {} confirmations), serving the previous list",
                self.guard_confirmations
            ),
        ));
        // Re-confirm within one refresh interval (a blocking query still returns at
        // once if the registry recovers).
        for sp in &mut self.sources {
            if let Feed::Registry(s) = &mut sp.source {
                s.confirm_within(self.refresh_ms);
            }
        }
        true
    }

    /// The host stored `snap` in shared data.
    pub fn published(&mut self, snap: Snapshot) {
        self.current = snap;
    }

    /// How old the data is: the longest time any source has gone without a good
    /// answer. A source whose blocking query is open after a good answer is fresh
    /// (Consul answers it the moment anything changes); static sources are always fresh.
    pub fn age_ms(&self, now_ms: u64) -> u64 {
        self.sources
            .iter()
            .map(|sp| {
                let fresh = matches!(sp.source, Feed::Static(_))
                    || (sp.in_flight.is_some()
                        && sp.source.is_blocking()
                        && sp.failures == 0
                        && sp.answered);
                if fresh {
                    0
                } else {
                    now_ms.saturating_sub(sp.last_ok_ms.max(self.current.published_ms))
                }
            })
            .max()
            .unwrap_or(0)
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
            format!(
                r#"{{"services":[{{"name":"web","refresh_interval":"1s","sources":[{sources}]}}]}}"#
            )
            .as_bytes(),
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
        vec![
            ("x-consul-index".into(), index.into()),
            ("server".into(), "consul".into()),
        ]
    }

    /// Drives a non-blocking Consul source for `until_ms` with a tick of `tick_ms`,
    /// answering every call at once with the same list; the times calls were sent.
    fn call_times(p: &mut ServicePoller, start_ms: u64, until_ms: u64, tick_ms: u64) -> Vec<u64> {
        let h = consul_ok("7");
        let body = consul_body(&["10.0.0.1"]);
        let mut rng = SplitMix64(3);
        let mut sent = Vec::new();
        let mut now = start_ms;
        while now < until_ms {
            for (i, _) in p.due(now) {
                sent.push(now);
                let resp = HttpResponse {
                    status: 200,
                    headers: &h,
                    body: body.as_bytes(),
                };
                let out = p.on_response(i, &resp, now + 3, &mut rng);
                assert!(!matches!(out, Outcome::Failed(_)), "{out:?}");
            }
            now += tick_ms;
        }
        sent
    }

    const NON_BLOCKING: &str = r#"{"consul":{"cluster":"c","blocking":false}}"#;

    #[wasm_bindgen_test(unsupported = test)]
    fn polls_stay_on_the_grid_of_their_phase_despite_the_tick() {
        let mut p = poller(NON_BLOCKING);
        let mut rng = SplitMix64(9);
        // Phase 10,250 ms on a 1 s grid: 250 ms past each second.
        p.set_phase(10_250, 100_000, &mut rng);
        let sent = call_times(&mut p, 100_000, 106_000, 70);
        // The first call at once; the second on the grid at least an interval later,
        // then one per interval, each at the first tick at or after its grid point.
        assert_eq!(sent[0], 100_000);
        assert!(sent[1] - sent[0] >= 1000, "{sent:?}");
        let grid: Vec<u64> = sent[1..].iter().map(|t| (t - 250) / 1000).collect();
        for w in grid.windows(2) {
            assert_eq!(w[1], w[0] + 1, "a grid point skipped or doubled: {sent:?}");
        }
        for t in &sent[1..] {
            assert!(
                (t - 250) % 1000 < 70,
                "{t} is not the first tick after its grid point"
            );
        }
        assert_eq!(sent.len(), 6, "{sent:?}");
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn a_fleet_started_together_spreads_its_polls_and_never_polls_twice_in_an_interval() {
        // 50 pollers started in the same millisecond, each with its own random phase.
        let mut rng = SplitMix64(42);
        let mut all: Vec<u64> = Vec::new();
        for _ in 0..50 {
            let mut p = poller(NON_BLOCKING);
            p.set_phase(rng.next_u64(), 0, &mut rng);
            let sent = call_times(&mut p, 0, 10_000, 10);
            for w in sent.windows(2) {
                assert!(w[1] - w[0] >= 990, "two calls within an interval: {sent:?}");
            }
            all.extend(sent);
        }
        // After the first second (every first call), each 100 ms slot of the second
        // holds about 50/10 of the calls: none holds more than 3x its share.
        let mut per_slot = [0u32; 10];
        for t in all.iter().filter(|t| **t >= 1000) {
            per_slot[((t % 1000) / 100) as usize] += 1;
        }
        let total: u32 = per_slot.iter().sum();
        assert!(total >= 50 * 8, "{total}");
        for n in per_slot {
            assert!(n * 10 <= total * 3, "polls bunched: {per_slot:?}");
        }
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn after_a_failure_the_source_returns_to_its_own_grid() {
        let mut p = poller(NON_BLOCKING);
        let mut rng = SplitMix64(5);
        p.set_phase(400, 0, &mut rng);
        assert_eq!(call_times(&mut p, 0, 1500, 10), vec![0, 1400]);
        // The next call (due at 2,400) fails; the retry after backoff succeeds.
        let calls = p.due(2400);
        assert_eq!(calls.len(), 1);
        let out = p.dispatch_failed(0, 2400, &mut rng, "down".into());
        assert!(matches!(out, Outcome::Failed(_)));
        let sent = call_times(&mut p, 2410, 9000, 10);
        assert!(sent[0] > 2400 && sent[0] < 4400, "{sent:?}");
        for t in &sent[1..] {
            assert_eq!(t % 1000, 400, "off its grid: {sent:?}");
        }
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn a_leader_taking_over_resumes_an_interval_after_the_last_publication() {
        // The first leader polls at 0 and publishes.
        let mut first = poller(NON_BLOCKING);
        let mut rng = SplitMix64(2);
        first.set_phase(700, 0, &mut rng);
        assert_eq!(call_times(&mut first, 0, 10, 10), vec![0]);
        let snap = first.publication(5).expect("a first snapshot");
        // Another root takes the lease 300 ms later and adopts it: no call before
        // the last publication + 1 s, then one on its own grid.
        let mut next = poller(NON_BLOCKING);
        next.adopt(snap);
        next.set_phase(100, 300, &mut rng);
        let sent = call_times(&mut next, 300, 4000, 10);
        assert_eq!(sent[0], 1010, "{sent:?}");
        for w in sent.windows(2) {
            assert!(w[1] - w[0] >= 1000, "{sent:?}");
        }
        // Nothing adopted (a first start): at once.
        let mut fresh = poller(NON_BLOCKING);
        fresh.set_phase(100, 300, &mut rng);
        assert_eq!(call_times(&mut fresh, 300, 310, 10), vec![300]);
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn after_a_retry_the_next_call_is_at_most_one_and_a_half_intervals_later() {
        let mut p = poller(NON_BLOCKING);
        let mut rng = SplitMix64(8);
        p.set_phase(400, 0, &mut rng);
        assert_eq!(call_times(&mut p, 0, 1500, 10), vec![0, 1400]);
        assert_eq!(p.due(2400).len(), 1);
        p.dispatch_failed(0, 2400, &mut rng, "down".into());
        let sent = call_times(&mut p, 2410, 9000, 10);
        // The retry, then the grid point at least half an interval later.
        let gap = sent[1] - sent[0];
        assert!((500..=1500).contains(&gap), "{sent:?}");
        assert_eq!(sent[1] % 1000, 400, "{sent:?}");
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn a_login_before_the_first_read_keeps_the_next_poll_an_interval_or_more_away() {
        // Consul through an auth method: the first poll is a login, then the read.
        let mut p = poller(
            r#"{"consul":{"cluster":"c","blocking":false,"auth_method":"k8s","bearer_token":"jwt"}}"#,
        );
        let mut rng = SplitMix64(6);
        p.set_phase(600, 100_000, &mut rng);
        let login = p.due(100_000);
        assert!(login[0].1.path.contains("/v1/acl/login"), "{login:?}");
        let out = p.on_response(
            0,
            &crate::registry::test_util::resp(200, r#"{"SecretID":"s"}"#),
            100_005,
            &mut rng,
        );
        assert!(matches!(out, Outcome::Again(_)), "{out:?}");
        let sent = call_times(&mut p, 100_010, 104_000, 10);
        // The read at once, then the grid point one to two intervals after the poll
        // began — not half an interval, as after a retry.
        assert_eq!(sent[0], 100_010);
        assert_eq!(sent[1], 101_600, "{sent:?}");
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn start_jitter_delays_the_first_call_below_its_bound() {
        let c = PluginConfig::parse(
            br#"{"services":[{"name":"web","refresh_interval":"1s","start_jitter":"2s",
                "sources":[{"consul":{"cluster":"c","blocking":false}}]}]}"#,
        )
        .unwrap();
        let mut rng = SplitMix64(11);
        let firsts: Vec<u64> = (0..40)
            .map(|_| {
                let mut p = ServicePoller::new(&c.services[0]);
                p.set_phase(rng.next_u64(), 1000, &mut rng);
                call_times(&mut p, 1000, 4000, 1)[0]
            })
            .collect();
        assert!(
            firsts.iter().all(|t| (1000..3000).contains(t)),
            "{firsts:?}"
        );
        let distinct: std::collections::HashSet<_> = firsts.iter().collect();
        assert!(distinct.len() > 30, "{firsts:?}");
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn refresh_interval_defaults_to_30s_for_eureka_only_services() {
        let c = PluginConfig::parse(
            br#"{"services":[
                {"name":"a","sources":[{"eureka":{"cluster":"e"}}]},
                {"name":"b","sources":[{"eureka":{"cluster":"e"}},{"static":{"instances":[{"address":"10.0.0.1","port":80}]}}]},
                {"name":"c","refresh_interval":"2s","sources":[{"eureka":{"cluster":"e"}}]}]}"#,
        )
        .unwrap();
        let i: Vec<u64> = c.services.iter().map(|s| s.refresh_interval.0).collect();
        assert_eq!(i, vec![30_000, 5_000, 2_000]);
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn registration_time_comes_from_metadata_with_slow_start() {
        let sources = r#"{"static":{"instances":[
            {"address":"10.0.0.1","port":80,"metadata":{"registered_at":"1700000000"}},
            {"address":"10.0.0.2","port":80,"metadata":{"registered_at":"soon"}},
            {"address":"10.0.0.3","port":80}]}}"#;
        let parse = |extra: &str| {
            let cfg = format!(r#"{{"services":[{{"name":"web",{extra}"sources":[{sources}]}}]}}"#);
            ServicePoller::new(&PluginConfig::parse(cfg.as_bytes()).unwrap().services[0])
        };
        let times = |p: &mut ServicePoller| -> Vec<u64> {
            assert!(p.due(0).is_empty());
            p.publication(0)
                .unwrap()
                .entries
                .iter()
                .map(|e| e.instance.registered_ms)
                .collect()
        };
        assert_eq!(
            times(&mut parse(r#""slow_start":{"window":"10s"},"#)),
            [1_700_000_000_000, 0, 0]
        );
        // Without slow start, or with the key turned off: not read.
        assert_eq!(times(&mut parse("")), [0, 0, 0]);
        assert_eq!(
            times(&mut parse(
                r#""slow_start":{"window":"10s","registered_at_key":""},"#
            )),
            [0, 0, 0]
        );
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn static_source_publishes_once() {
        let mut p =
            poller(r#"{"static":{"instances":[{"address":"10.0.0.1","port":80,"weight":2}]}}"#);
        assert!(p.due(0).is_empty());
        let s = p.publication(0).unwrap();
        assert_eq!(s.version, 1);
        assert_eq!(s.entries[0].instance.weight, 2);
        p.published(s);
        assert!(p.due(10_000).is_empty());
        assert!(p.publication(10_000).is_none());
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn an_answer_for_a_static_source_is_not_taken() {
        let mut p =
            poller(r#"{"static":{"instances":[{"address":"10.0.0.1","port":80,"weight":2}]}}"#);
        assert!(p.due(0).is_empty());
        let body = consul_body(&["10.0.0.9"]);
        let h = consul_ok("5");
        let resp = HttpResponse {
            status: 200,
            headers: &h,
            body: body.as_bytes(),
        };
        let mut rng = SplitMix64(1);
        assert_eq!(p.on_response(0, &resp, 1, &mut rng), Outcome::Unchanged);
        let s = p.publication(1).unwrap();
        assert_eq!(s.entries.len(), 1);
        assert_eq!(s.entries[0].instance.addr.to_string(), "10.0.0.1:80");
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
        let out = p.on_response(
            0,
            &HttpResponse {
                status: 200,
                headers: &h,
                body: body.as_bytes(),
            },
            20,
            &mut r,
        );
        assert_eq!(
            out,
            Outcome::Updated {
                rejected: crate::instance::Rejected::default(),
                warnings: vec![]
            }
        );
        let s = p.publication(20).unwrap();
        assert_eq!(s.tokens, ["5"]);
        p.published(s);
        // Blocking: next call at once, with the index.
        let calls = p.due(20);
        assert!(calls[0].1.path.contains("index=5"));
        // Unchanged after a long wait: straight back to blocking, nothing published.
        let out = p.on_response(
            0,
            &HttpResponse {
                status: 200,
                headers: &h,
                body: b"",
            },
            30_020,
            &mut r,
        );
        assert_eq!(out, Outcome::Unchanged);
        assert!(p.publication(30_020).is_none());
        assert_eq!(p.due(30_020).len(), 1);
        // Unchanged at once (index ignored by the server): fall back to the interval.
        p.on_response(
            0,
            &HttpResponse {
                status: 200,
                headers: &h,
                body: b"",
            },
            30_030,
            &mut r,
        );
        // The call was due at 30,020 (off the grid of phase 0): the next grid point
        // at least half an interval after it was sent.
        assert!(p.due(30_999).is_empty());
        assert_eq!(p.due(31_000).len(), 1);
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn failures_back_off_and_keep_last_good() {
        let mut p = poller(r#"{"consul":{"cluster":"consul","blocking":false}}"#);
        let mut r = SplitMix64(4);
        p.due(0);
        let body = consul_body(&["10.0.0.1"]);
        let h = consul_ok("3");
        p.on_response(
            0,
            &HttpResponse {
                status: 200,
                headers: &h,
                body: body.as_bytes(),
            },
            0,
            &mut r,
        );
        let s = p.publication(0).unwrap();
        p.published(s);
        let mut now = 0;
        let mut delays = Vec::new();
        for k in 0..7 {
            let next = (now..now + 60_000).find(|t| !p.due(*t).is_empty()).unwrap();
            if k > 0 {
                delays.push(next - now);
            }
            let out = p.on_response(
                0,
                &HttpResponse {
                    status: 500,
                    headers: &h,
                    body: b"boom",
                },
                next,
                &mut r,
            );
            assert!(matches!(
                out,
                Outcome::Failed(RegistryError::Status(500, _))
            ));
            assert!(
                p.publication(next).is_none(),
                "a failure never publishes a change"
            );
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
        consul_ok_body(&["10.0.0.1", "10.0.0.2"], "3", &mut p, 5, &mut r);
        let s = p.publication(5).unwrap();
        let got: Vec<(String, u32, u8)> = s
            .entries
            .iter()
            .map(|e| (e.instance.addr.to_string(), e.instance.weight, e.source))
            .collect();
        assert_eq!(
            got,
            [
                ("10.0.0.1:80".into(), 1, 0),
                ("10.0.0.2:80".into(), 1, 0),
                ("10.0.0.3:80".into(), 1, 1)
            ]
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
        a.on_response(
            0,
            &HttpResponse {
                status: 200,
                headers: &h,
                body: body.as_bytes(),
            },
            5,
            &mut r,
        );
        let s = a.publication(5).unwrap();
        let bytes = s.encode();

        let mut b = poller(r#"{"consul":{"cluster":"consul"}}"#);
        b.adopt(Snapshot::decode(&bytes).unwrap());
        let calls = b.due(100);
        assert!(calls[0].1.path.contains("index=77"), "{}", calls[0].1.path);
        // The same content again is not re-published.
        b.on_response(
            0,
            &HttpResponse {
                status: 200,
                headers: &consul_ok("78"),
                body: body.as_bytes(),
            },
            200,
            &mut r,
        );
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
            let body: &[u8] = if calls[0].1.path.ends_with("authenticate") {
                auth
            } else {
                expired
            };
            let status = if body == auth { 200 } else { 401 };
            outcomes.push(p.on_response(
                0,
                &HttpResponse {
                    status,
                    headers: &[],
                    body,
                },
                t,
                &mut r,
            ));
        }
        assert!(
            matches!(
                outcomes.last(),
                Some(Outcome::Failed(RegistryError::Auth(_)))
            ),
            "{outcomes:?}"
        );
    }

    fn consul_ok_body(
        ips: &[&str],
        index: &str,
        p: &mut ServicePoller,
        now: u64,
        r: &mut SplitMix64,
    ) -> Outcome {
        let body = consul_body(ips);
        let h = consul_ok(index);
        p.on_response(
            0,
            &HttpResponse {
                status: 200,
                headers: &h,
                body: body.as_bytes(),
            },
            now,
            r,
        )
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn guard_holds_mass_deregistration_until_confirmed() {
        let mut p = poller(r#"{"consul":{"cluster":"consul"}}"#);
        let mut r = SplitMix64(4);
        p.due(0);
        consul_ok_body(
            &["10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4"],
            "5",
            &mut p,
            0,
            &mut r,
        );
        let s = p.publication(0).unwrap();
        p.published(s);
        // The registry suddenly answers [] (index moved): held, and the next read is
        // soon and non-blocking.
        p.due(0);
        consul_ok_body(&[], "6", &mut p, 10, &mut r);
        assert!(p.publication(10).is_none());
        assert_eq!(p.guard_events.len(), 1);
        assert_eq!(p.guard_events[0].0, "guard_held");
        let calls = p.due(10);
        assert!(
            calls[0].1.path.ends_with("index=6&wait=1000ms"),
            "{}",
            calls[0].1.path
        );
        // It recovers on the next read: nothing was ever published.
        consul_ok_body(
            &["10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4"],
            "7",
            &mut p,
            1010,
            &mut r,
        );
        assert!(p.publication(1010).is_none(), "same content as published");
        assert_eq!(p.current.entries.len(), 4);
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn guard_releases_a_confirmed_scale_down_and_lets_small_drops_through() {
        let mut p = poller(r#"{"consul":{"cluster":"consul","blocking":false}}"#);
        let mut r = SplitMix64(4);
        p.due(0);
        consul_ok_body(
            &["10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4"],
            "5",
            &mut p,
            0,
            &mut r,
        );
        let s = p.publication(0).unwrap();
        p.published(s);
        // One of four leaves (25 %): straight through.
        p.due(1000);
        consul_ok_body(
            &["10.0.0.1", "10.0.0.2", "10.0.0.3"],
            "6",
            &mut p,
            1000,
            &mut r,
        );
        let s = p.publication(1000).unwrap();
        assert_eq!(s.entries.len(), 3);
        p.published(s);
        // Two of three leave (67 %): published on the third identical answer.
        let mut published = None;
        for (k, t) in [2000u64, 3000, 4000].iter().enumerate() {
            let calls = (*t..*t + 2000)
                .find_map(|x| Some((x, p.due(x))).filter(|(_, c)| !c.is_empty()))
                .unwrap();
            consul_ok_body(
                &["10.0.0.1"],
                &format!("{}", 7 + k),
                &mut p,
                calls.0,
                &mut r,
            );
            if let Some(s) = p.publication(calls.0) {
                published = Some((k, s));
                break;
            }
        }
        let (k, s) = published.expect("confirmed change never published");
        assert_eq!(k, 2);
        assert_eq!(s.entries.len(), 1);
        assert!(p.guard_events.iter().any(|(e, _)| *e == "guard_released"));
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn age_counts_from_the_last_good_answer() {
        let mut p = poller(r#"{"consul":{"cluster":"consul","wait":"30s"}}"#);
        let mut r = SplitMix64(4);
        p.due(0);
        consul_ok_body(&["10.0.0.1"], "5", &mut p, 1000, &mut r);
        let s = p.publication(1000).unwrap();
        p.published(s);
        p.due(1000); // blocking query open: fresh however long it waits
        assert_eq!(p.age_ms(20_000), 0);
        let h = consul_ok("5");
        p.on_response(
            0,
            &HttpResponse {
                status: 503,
                headers: &h,
                body: b"",
            },
            20_000,
            &mut r,
        );
        assert_eq!(p.age_ms(50_000), 49_000);
        let s = poller(r#"{"static":{"instances":[{"address":"10.0.0.1","port":80}]}}"#);
        assert_eq!(s.age_ms(99_999), 0);
    }
}
