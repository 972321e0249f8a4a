//! The per-worker routing table of one service: the instances of the current
//! snapshot, their `ip:port` text prepared once, which of them are routable now
//! (registry health, active health, outlier ejection, panic mode), and the policy
//! state. Rebuilt when a worker sees a new snapshot or ejection state, and — while
//! weights move (slow start, load reports) — once a second; never per request.
//!
//! Panic mode follows Envoy's `healthy_panic_threshold`: when fewer than
//! `panic_threshold` percent of the non-draining instances are routable, traffic is
//! spread over all of them (health and ejections ignored) rather than crushing the
//! few that are left. Draining instances never get new requests.
//!
//! Composition, in order: routable set → subset (metadata selector from config or
//! a request header, with a fallback) → zone (local zone first, spill over by
//! capacity, priority failover, see `zone`) *within the subset* → policy over the
//! weights (registry weight × slow-start factor × load-report multiplier). Hash
//! policies (`ring_hash`, `maglev`) skip the zone step, so a key keeps its instance.
//!
//! Subset then zone follows Envoy's subset load balancer
//! (`source/extensions/load_balancing_policies/subset/subset_lb.cc`): each subset
//! is a priority set of its own hosts, and its child load balancer is given the
//! cluster's local priority set, so zone-aware routing and priority failover run
//! inside the subset — with the subset's capacity per zone, and, for failover, the
//! subset's health (its routable weight over the weight of the instances the
//! subset's selector matches). A fallback set (any endpoint, the default subset) is
//! routed the same way. Each set's zone shares and per-zone pools are built with
//! its pool (the configured subset when the table is built, a header's subset on
//! its first request; at most `MAX_CACHED_SUBSETS` are kept, further ones are
//! built for their request and dropped — once per request, however many ranked
//! entries it needs — and every further selector that matches nothing shares one
//! fallback set), so a pick from a kept set stays a draw
//! over the zones plus the policy's own pick. Left out: Envoy's
//! `locality_weight_aware` / `scale_locality_weight` subset options and subset
//! keys (a selector is matched against every instance's metadata).

use crate::balancer::bounded_load::BoundedLoad;
use crate::balancer::maglev::{self, Maglev};
use crate::balancer::peak_ewma::{self, PeakEwma, Rule as PeakRule};
use crate::balancer::random::Random;
use crate::balancer::ring_hash::{self, RingHash};
use crate::balancer::weighted_sampler::WeightedSampler;
use crate::balancer::{LeastRequest, RoundRobin};
use crate::config::{Policy, ServiceConfig};
use crate::instance::State;
use crate::outlier::Outliers;
use crate::rng::Rng;
use crate::snapshot::Snapshot;
use crate::subset::{self, Fallback, Pairs};
use crate::zone;
use std::collections::HashMap;
use std::net::SocketAddr;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// The instance's address; `host()` is its `ip:port` (`[v6]:port`) text, as
    /// handed to Envoy and hashed by ring_hash and maglev.
    pub addr: SocketAddr,
    /// Effective weight (registry weight with slow start and load reports applied).
    pub weight: u32,
    /// Slot of the instance's shared in-flight gauge and outlier state.
    pub slot: u32,
}

impl Endpoint {
    /// `ip:port` (`[v6]:port`).
    pub fn host(&self) -> String {
        self.addr.to_string()
    }
}

/// One instance as the status view shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct InstanceView {
    pub slot: u32,
    pub addr: SocketAddr,
    pub registry_healthy: bool,
    pub registry_weight: u32,
    /// Registry weight × slow start × load report (scaled by 1000 while those move).
    pub effective_weight: u32,
    pub zone: String,
    /// In the routable set now (healthy, not ejected; or panic mode).
    pub routable: bool,
    /// Registration time from the registry, Unix ms; 0 = unknown.
    pub registered_ms: u64,
}

#[derive(Debug, Clone)]
struct Candidate {
    ep: Endpoint,
    base_weight: u32,
    healthy: bool,
    zone: String,
    metadata: Pairs,
    /// Registration time from the registry, Unix ms; 0 = unknown.
    registered_ms: u64,
}

/// How a table picks.
#[derive(Debug, Clone)]
pub struct Options {
    pub policy: Policy,
    pub choice_count: u32,
    /// Percent; 0 disables panic mode.
    pub panic_threshold: u32,
    /// Bounded-load factor in percent (`ring_hash`, `maglev`); `None` = unbounded.
    pub bounded_load_percent: Option<u32>,
    /// Local zone for zone-aware routing; `None` = off.
    pub local_zone: Option<String>,
    /// Zone groups in order of preference (priority failover); empty = off.
    pub zone_priorities: Vec<Vec<String>>,
    pub overprovisioning_percent: u32,
    /// Subset selector from the configuration.
    pub subset: Option<Pairs>,
    pub subset_fallback: Fallback,
    pub peak_ewma_decay_ms: u64,
    pub peak_ewma_default_rtt_ns: u64,
    /// `peak_ewma` candidates per pick and how they are compared.
    pub peak_ewma_choices: u32,
    pub peak_ewma_rule: PeakRule,
}

impl Options {
    /// Table options of a configured service.
    pub fn of(svc: &ServiceConfig) -> Options {
        Options {
            policy: svc.policy,
            choice_count: svc.choice_count,
            panic_threshold: svc.panic_threshold,
            bounded_load_percent: svc.bounded_load_percent,
            local_zone: svc.local_zone.clone(),
            zone_priorities: svc.zone_priorities.clone().unwrap_or_default(),
            overprovisioning_percent: svc.overprovisioning_percent,
            subset: svc.subset.as_ref().and_then(|s| s.selector.clone()),
            subset_fallback: svc
                .subset
                .as_ref()
                .map(|s| s.fallback())
                .unwrap_or(Fallback::NoFallback),
            peak_ewma_decay_ms: svc.peak_ewma.decay.0,
            peak_ewma_default_rtt_ns: svc.peak_ewma.default_rtt.0.saturating_mul(1_000_000),
            peak_ewma_choices: svc.peak_ewma.choices,
            peak_ewma_rule: svc.peak_ewma.rule,
        }
    }

    pub fn new(policy: Policy) -> Options {
        Options {
            policy,
            choice_count: 2,
            panic_threshold: 50,
            bounded_load_percent: None,
            local_zone: None,
            zone_priorities: Vec::new(),
            overprovisioning_percent: zone::DEFAULT_OVERPROVISIONING_PERCENT,
            subset: None,
            subset_fallback: Fallback::NoFallback,
            peak_ewma_decay_ms: crate::balancer::peak_ewma::DEFAULT_DECAY_MS,
            peak_ewma_default_rtt_ns: crate::balancer::peak_ewma::DEFAULT_RTT_NS,
            peak_ewma_choices: crate::balancer::peak_ewma::DEFAULT_CHOICES,
            peak_ewma_rule: PeakRule::HotCold,
        }
    }
}

#[derive(Debug)]
enum PolicyState {
    RoundRobin(RoundRobin),
    LeastRequest(LeastRequest),
    Random(Random),
    /// `choices` distinct weighted draws, compared by the configured rule; the
    /// pool's total weight (the hot threshold's reference).
    PeakEwma(WeightedSampler, u64),
    RingHash(RingHash, Option<BoundedLoad>),
    Maglev(Maglev, Option<BoundedLoad>),
}

/// A set of endpoints (indexes into `Table::endpoints`) with its policy.
#[derive(Debug)]
struct Pool {
    members: Vec<usize>,
    policy: PolicyState,
}

/// The routing of a set of endpoints (all routable ones, or a subset): its pool,
/// and with zone-aware routing the share per zone and a pool per zone of the set.
#[derive(Debug)]
struct Group {
    all: Pool,
    zones: Option<(zone::Split, Vec<Option<Pool>>)>,
}

/// Per-request inputs of a pick.
pub struct Request<'a, R: Rng, A: FnMut(u32) -> i64> {
    pub rng: &'a mut R,
    pub now_ms: u64,
    /// Hash of the request's key (hash policies); `None` → random.
    pub hash: Option<u64>,
    /// Subset selector from a request header, already parsed.
    pub subset: Option<&'a [(String, String)]>,
    /// Shared in-flight count of a slot.
    pub active: A,
    /// Shared in-flight count of the service (bounded load).
    pub total_active: u64,
}

#[derive(Debug)]
pub struct Table {
    pub version: u64,
    pub published_ms: u64,
    /// Instances in the snapshot, routable or not.
    pub known: usize,
    candidates: Vec<Candidate>,
    /// Routable endpoints now.
    pub endpoints: Vec<Endpoint>,
    /// For each endpoint, its index in `candidates`.
    endpoint_candidate: Vec<usize>,
    /// Slot → index in `endpoints`.
    slot_index: HashMap<u32, usize>,
    zones: Vec<String>,
    endpoint_zone: Vec<usize>,
    /// Routing over all candidates because too few are routable.
    pub panic: bool,
    /// Generation of the outlier state applied.
    pub outlier_generation: u64,
    options: Options,
    /// Routing over every routable endpoint (no subset selector).
    main: Option<Group>,
    /// While [`Table::ranked`] draws the entries after the first: round robin looks
    /// this many steps ahead instead of moving its cursor, so the cursor moves once
    /// per request and each request's first entry follows round robin.
    rr_ahead: usize,
    /// Routing per subset selector (config selector, header selectors), built
    /// lazily; `None`: no endpoint, even after the fallback.
    subsets: HashMap<Pairs, Option<Group>>,
    /// Routing of the fallback set for selectors past the subset cache (every such
    /// selector that matches nothing shares it), built on first use.
    fallback: Option<Option<Group>>,
    peak: Option<PeakEwma>,
    /// Recording what picks look at (a request asked for the decision header).
    tracing: std::cell::Cell<bool>,
    trace: std::cell::Cell<crate::explain::Trace>,
    /// Groups (pools, rings, zone splits) built so far.
    #[cfg(test)]
    pub groups_built: std::cell::Cell<usize>,
}

/// A request's subset routing when its selector is not in the subset cache.
enum Uncached {
    /// Its selector matches nothing: the table's fallback group.
    Fallback,
    /// Its own group, built for this request (`None`: no endpoint).
    Built(Option<Group>),
}

/// Header-selected subsets kept per table; more are built per request, not kept.
const MAX_CACHED_SUBSETS: usize = 32;

impl Table {
    /// The table of a snapshot. It takes the snapshot's instances (their zones and
    /// metadata move, nothing is copied or formatted per instance).
    pub fn build(snap: Snapshot, options: Options, rng: &mut impl Rng) -> Table {
        let known = snap.entries.len();
        let candidates: Vec<Candidate> = snap
            .entries
            .into_iter()
            .filter(|e| e.instance.state != State::Draining)
            .map(|e| Candidate {
                ep: Endpoint {
                    addr: e.instance.addr,
                    weight: e.instance.weight,
                    slot: e.slot,
                },
                base_weight: e.instance.weight,
                healthy: e.instance.state == State::Healthy,
                zone: e.instance.zone,
                metadata: e.instance.metadata,
                registered_ms: e.instance.registered_ms,
            })
            .collect();
        let mut t = Table {
            version: snap.version,
            published_ms: snap.published_ms,
            known,
            candidates,
            endpoints: Vec::new(),
            endpoint_candidate: Vec::new(),
            slot_index: HashMap::new(),
            zones: Vec::new(),
            endpoint_zone: Vec::new(),
            panic: false,
            outlier_generation: 0,
            options,
            main: None,
            rr_ahead: 0,
            subsets: HashMap::new(),
            fallback: None,
            peak: None,
            tracing: std::cell::Cell::new(false),
            trace: std::cell::Cell::new(crate::explain::Trace::default()),
            #[cfg(test)]
            groups_built: std::cell::Cell::new(0),
        };
        t.apply(&Outliers::default(), &|_: u32, w: u32| w, 0, rng);
        t
    }

    /// Recomputes the routable set and the policies. `weight(slot, registry weight)`
    /// gives the effective weight (slow start, load reports).
    pub fn apply(
        &mut self,
        outliers: &Outliers,
        weight: &dyn Fn(u32, u32) -> u32,
        now_ms: u64,
        rng: &mut impl Rng,
    ) {
        for c in &mut self.candidates {
            c.ep.weight = weight(c.ep.slot, c.base_weight).max(1);
        }
        let routable: Vec<usize> = (0..self.candidates.len())
            .filter(|&i| self.candidates[i].healthy && !outliers.is_out(self.candidates[i].ep.slot))
            .collect();
        let threshold = u64::from(self.options.panic_threshold.min(100));
        self.panic = !self.candidates.is_empty()
            && (routable.len() as u64) * 100 < threshold * self.candidates.len() as u64;
        let chosen: Vec<usize> = if self.panic {
            (0..self.candidates.len()).collect()
        } else {
            routable
        };
        // Carry peak-EWMA state over by address.
        let old_peak: HashMap<SocketAddr, crate::balancer::peak_ewma::EndpointState> =
            match &self.peak {
                Some(p) => self
                    .endpoints
                    .iter()
                    .enumerate()
                    .filter_map(|(i, e)| Some((e.addr, p.state(i)?)))
                    .collect(),
                None => HashMap::new(),
            };
        self.endpoints = chosen
            .iter()
            .map(|&i| self.candidates[i].ep.clone())
            .collect();
        self.slot_index = self
            .endpoints
            .iter()
            .enumerate()
            .map(|(i, e)| (e.slot, i))
            .collect();
        self.zones.clear();
        self.endpoint_zone = chosen
            .iter()
            .map(|&i| {
                let z = &self.candidates[i].zone;
                match self.zones.iter().position(|x| x == z) {
                    Some(k) => k,
                    None => {
                        self.zones.push(z.clone());
                        self.zones.len() - 1
                    }
                }
            })
            .collect();
        self.endpoint_candidate = chosen;
        self.outlier_generation = outliers.generation;
        if self.options.policy == Policy::PeakEwma {
            let weights: Vec<u32> = self.endpoints.iter().map(|e| e.weight).collect();
            let mut p = PeakEwma::new(
                &weights,
                self.options.peak_ewma_decay_ms,
                self.options.peak_ewma_default_rtt_ns,
                now_ms,
            );
            for (i, e) in self.endpoints.iter().enumerate() {
                if let Some(s) = old_peak.get(&e.addr) {
                    p.set_state(i, *s);
                }
            }
            self.peak = Some(p);
        } else {
            self.peak = None;
        }
        let all: Vec<usize> = (0..self.endpoints.len()).collect();
        self.main = self.group(all, None, rng);
        self.subsets.clear();
        self.fallback = None;
        if let Some(sel) = self.options.subset.clone() {
            let group = self.subset_group(&sel, rng);
            self.subsets.insert(sel, group);
        }
    }

    /// The routing of the subset `sel` selects (fallback applied).
    fn subset_group(&self, sel: &[(String, String)], rng: &mut impl Rng) -> Option<Group> {
        let (members, matcher) = self.select(sel)?;
        self.group(members, matcher.as_deref(), rng)
    }

    /// The routing of `members`, whose non-draining instances are the candidates
    /// matching `matcher` (`None`: all).
    fn group(
        &self,
        members: Vec<usize>,
        matcher: Option<&[(String, String)]>,
        rng: &mut impl Rng,
    ) -> Option<Group> {
        #[cfg(test)]
        self.groups_built.set(self.groups_built.get() + 1);
        let zones = self.build_zones(&members, matcher, rng);
        let all = self.pool(members, rng)?;
        Some(Group { all, zones })
    }

    fn pool(&self, members: Vec<usize>, rng: &mut impl Rng) -> Option<Pool> {
        if members.is_empty() {
            return None;
        }
        let eps: Vec<&Endpoint> = members
            .iter()
            .filter_map(|&i| self.endpoints.get(i))
            .collect();
        let weights: Vec<u32> = eps.iter().map(|e| e.weight).collect();
        // Hash keys are the `ip:port` texts (only the hash policies format them).
        let keys: Vec<String> = if self.options.policy.is_hash() {
            eps.iter().map(|e| e.host()).collect()
        } else {
            Vec::new()
        };
        let bounded = self
            .options
            .bounded_load_percent
            .map(|c| BoundedLoad::new(&weights, c));
        let policy = match self.options.policy {
            Policy::RoundRobin => PolicyState::RoundRobin(RoundRobin::new(&weights, rng)),
            Policy::LeastRequest => {
                PolicyState::LeastRequest(LeastRequest::new(&weights, self.options.choice_count))
            }
            Policy::Random => PolicyState::Random(Random::new(&weights)),
            Policy::PeakEwma => PolicyState::PeakEwma(
                WeightedSampler::new(&weights),
                weights.iter().map(|&w| u64::from(w)).sum(),
            ),
            Policy::RingHash => PolicyState::RingHash(
                RingHash::new(
                    &keys,
                    &weights,
                    ring_hash::DEFAULT_MIN_RING_SIZE,
                    ring_hash::DEFAULT_MAX_RING_SIZE,
                ),
                bounded,
            ),
            Policy::Maglev => PolicyState::Maglev(
                Maglev::new(&keys, &weights, maglev::DEFAULT_TABLE_SIZE),
                bounded,
            ),
        };
        Some(Pool { members, policy })
    }

    /// Zone-aware routing over `members` (indexes into `endpoints`); the zones'
    /// total weight (priority failover) counts the candidates matching `matcher`
    /// (`None`: all), so a subset's health is its own.
    fn build_zones(
        &self,
        members: &[usize],
        matcher: Option<&[(String, String)]>,
        rng: &mut impl Rng,
    ) -> Option<(zone::Split, Vec<Option<Pool>>)> {
        let o = &self.options;
        if o.policy.is_hash() || (o.local_zone.is_none() && o.zone_priorities.is_empty()) {
            return None;
        }
        let in_set = |c: &Candidate| matcher.map_or(true, |m| subset::matches(&c.metadata, m));
        // Zones of the members; with priorities also those of the set's other
        // instances: a group's health is its routable weight over its whole weight.
        let mut zones: Vec<&str> = Vec::new();
        let mut member_zone: Vec<usize> = Vec::with_capacity(members.len());
        for &i in members {
            let name = self
                .endpoint_zone
                .get(i)
                .and_then(|&z| self.zones.get(z))
                .map_or("", String::as_str);
            let z = match zones.iter().position(|x| *x == name) {
                Some(z) => z,
                None => {
                    zones.push(name);
                    zones.len() - 1
                }
            };
            member_zone.push(z);
        }
        if !o.zone_priorities.is_empty() {
            for c in self.candidates.iter().filter(|c| in_set(c)) {
                if !zones.contains(&c.zone.as_str()) {
                    zones.push(c.zone.as_str());
                }
            }
        }
        if zones.len() < 2 {
            return None;
        }
        let mut capacity = vec![0u64; zones.len()];
        if !self.panic {
            for (&i, &z) in members.iter().zip(&member_zone) {
                if let (Some(e), Some(c)) = (self.endpoints.get(i), capacity.get_mut(z)) {
                    *c += u64::from(e.weight);
                }
            }
        }
        let local_idx = o
            .local_zone
            .as_ref()
            .and_then(|l| zones.iter().position(|z| z == l));
        let split = if o.zone_priorities.is_empty() {
            zone::zone_split(local_idx, &capacity, None)
        } else {
            let mut total = vec![0u64; zones.len()];
            for c in self.candidates.iter().filter(|c| in_set(c)) {
                if let Some(z) = zones.iter().position(|z| *z == c.zone) {
                    total[z] += u64::from(c.ep.weight);
                }
            }
            let last = o.zone_priorities.len();
            let level: Vec<usize> = zones
                .iter()
                .map(|z| {
                    o.zone_priorities
                        .iter()
                        .position(|g| g.iter().any(|x| x == z))
                        .unwrap_or(last)
                })
                .collect();
            zone::failover_split(
                local_idx,
                &level,
                &capacity,
                &total,
                o.overprovisioning_percent,
            )
        };
        let pools = (0..zones.len())
            .map(|z| {
                let of_zone: Vec<usize> = members
                    .iter()
                    .zip(&member_zone)
                    .filter(|&(_, &mz)| mz == z)
                    .map(|(&i, _)| i)
                    .collect();
                self.pool(of_zone, rng)
            })
            .collect();
        Some((split, pools))
    }

    /// Endpoints matching `sel`, with the fallback applied, and the selector that
    /// chose them (`None`: any endpoint); `None` = no endpoint.
    fn select(&self, sel: &[(String, String)]) -> Option<(Vec<usize>, Option<Pairs>)> {
        let metadata = |i: usize| -> &[(String, String)] {
            self.endpoint_candidate
                .get(i)
                .and_then(|&c| self.candidates.get(c))
                .map(|c| c.metadata.as_slice())
                .unwrap_or(&[])
        };
        let hit: Vec<usize> = (0..self.endpoints.len())
            .filter(|&i| subset::matches(metadata(i), sel))
            .collect();
        if !hit.is_empty() {
            return Some((hit, Some(sel.to_vec())));
        }
        match &self.options.subset_fallback {
            Fallback::NoFallback => None,
            Fallback::AnyEndpoint => Some((0..self.endpoints.len()).collect())
                .filter(|v: &Vec<usize>| !v.is_empty())
                .map(|v| (v, None)),
            Fallback::DefaultSubset(d) => {
                let v: Vec<usize> = (0..self.endpoints.len())
                    .filter(|&i| subset::matches(metadata(i), d))
                    .collect();
                Some(v)
                    .filter(|v| !v.is_empty())
                    .map(|v| (v, Some(d.clone())))
            }
        }
    }

    /// Index (into `endpoints`) of the next pick.
    pub fn pick_index<R: Rng, A: FnMut(u32) -> i64>(
        &mut self,
        req: &mut Request<'_, R, A>,
    ) -> Option<usize> {
        self.pick_index_with(req, &mut None)
    }

    /// [`Self::pick_index`]; `uncached` keeps, across the picks of one request
    /// ([`Self::ranked`]), the routing of a selector the subset cache has no room
    /// for, so it is worked out once per request, not once per pick.
    fn pick_index_with<R: Rng, A: FnMut(u32) -> i64>(
        &mut self,
        req: &mut Request<'_, R, A>,
        uncached: &mut Option<Uncached>,
    ) -> Option<usize> {
        let subset_key: Option<Pairs> = match req.subset {
            Some(s) if !s.is_empty() => Some(s.to_vec()),
            _ => self.options.subset.clone(),
        };
        if let Some(key) = subset_key {
            if !self.subsets.contains_key(&key) {
                if self.subsets.len() >= MAX_CACHED_SUBSETS {
                    return self.pick_uncached(&key, req, uncached);
                }
                let group = self.subset_group(&key, req.rng);
                self.subsets.insert(key.clone(), group);
            }
            let group = self.subsets.remove(&key)?;
            let Some(mut group) = group else {
                self.subsets.insert(key, None);
                return None;
            };
            let picked = self.pick_in_group(&mut group, req);
            self.subsets.insert(key, Some(group));
            return picked;
        }
        let mut main = self.main.take()?;
        let picked = self.pick_in_group(&mut main, req);
        self.main = Some(main);
        picked
    }

    /// A pick for selector `key` when the subset cache is full. A selector that
    /// matches nothing (say, one of a client's endless made-up values) is routed by
    /// the table's one fallback group; one that matches instances gets a group built
    /// for this request. Either way nothing more is kept per selector.
    fn pick_uncached<R: Rng, A: FnMut(u32) -> i64>(
        &mut self,
        key: &[(String, String)],
        req: &mut Request<'_, R, A>,
        uncached: &mut Option<Uncached>,
    ) -> Option<usize> {
        if uncached.is_none() {
            let (members, matcher) = self.select(key)?;
            *uncached = Some(if matcher.as_deref() == Some(key) {
                Uncached::Built(self.group(members, matcher.as_deref(), req.rng))
            } else {
                if self.fallback.is_none() {
                    self.fallback = Some(self.group(members, matcher.as_deref(), req.rng));
                }
                Uncached::Fallback
            });
        }
        match uncached.as_mut()? {
            Uncached::Built(group) => {
                let group = group.as_mut()?;
                self.pick_in_group(group, req)
            }
            Uncached::Fallback => {
                let mut group = self.fallback.take()?;
                let picked = group.as_mut().and_then(|g| self.pick_in_group(g, req));
                self.fallback = Some(group);
                picked
            }
        }
    }

    /// A pick in `group`: in the zone its split draws, else (no share, or that
    /// zone's policy declines) over the whole group.
    fn pick_in_group<R: Rng, A: FnMut(u32) -> i64>(
        &self,
        group: &mut Group,
        req: &mut Request<'_, R, A>,
    ) -> Option<usize> {
        if let Some((split, pools)) = &mut group.zones {
            let picked = split
                .pick(req.rng)
                .and_then(|z| pools.get_mut(z))
                .and_then(|p| p.as_mut())
                .and_then(|p| self.pick_in_mut(p, req));
            if picked.is_some() {
                return picked;
            }
        }
        self.pick_in_mut(&mut group.all, req)
    }

    fn pick_in_mut<R: Rng, A: FnMut(u32) -> i64>(
        &self,
        pool: &mut Pool,
        req: &mut Request<'_, R, A>,
    ) -> Option<usize> {
        let members = &pool.members;
        let eps = &self.endpoints;
        let slot_of = |k: usize| members.get(k).and_then(|&i| eps.get(i)).map(|e| e.slot);
        let tracing = self.tracing.get();
        // The in-flight count of member k, recorded as a candidate when tracing.
        let load_of = |active: &mut A, k: usize| -> Option<i64> {
            let slot = slot_of(k)?;
            let v = active(slot);
            if tracing {
                self.note(slot, v as f64);
            }
            Some(v)
        };
        let k = match &mut pool.policy {
            PolicyState::RoundRobin(rr) if self.rr_ahead > 0 => rr.peek(self.rr_ahead - 1)?,
            PolicyState::RoundRobin(rr) => rr.pick()?,
            PolicyState::LeastRequest(lr) => {
                let active = &mut req.active;
                lr.pick(req.rng, |k| load_of(active, k).unwrap_or(i64::MAX))?
            }
            PolicyState::Random(r) => r.pick(req.rng)?,
            PolicyState::PeakEwma(sampler, pool_weight) => {
                let peak = self.peak.as_ref()?;
                let (choice, k) = Self::peak_choice(
                    peak,
                    sampler,
                    *pool_weight,
                    &self.options,
                    members,
                    |i| eps.get(i).map(|e| e.slot),
                    req,
                )?;
                if tracing {
                    self.note_choice(&choice);
                }
                k
            }
            PolicyState::RingHash(ring, bounded) => {
                let h = req.hash.unwrap_or_else(|| req.rng.next_u64());
                if tracing {
                    self.note_hash(req.hash);
                }
                match bounded {
                    Some(bl) => {
                        let active = &mut req.active;
                        bl.pick(ring.walk(h), req.total_active, |k| {
                            load_of(active, k).unwrap_or(0).max(0) as u64
                        })?
                    }
                    None => ring.pick(h)?,
                }
            }
            PolicyState::Maglev(table, bounded) => {
                let h = req.hash.unwrap_or_else(|| req.rng.next_u64());
                if tracing {
                    self.note_hash(req.hash);
                }
                match bounded {
                    Some(bl) => {
                        let active = &mut req.active;
                        bl.pick(table.walk(h), req.total_active, |k| {
                            load_of(active, k).unwrap_or(0).max(0) as u64
                        })?
                    }
                    None => table.pick(h)?,
                }
            }
        };
        let i = members.get(k).copied()?;
        if tracing {
            // Policies that compare no cost (and a pool of one): the chosen one, by
            // its effective weight.
            if let Some(e) = self.endpoints.get(i) {
                let mut t = self.trace.get();
                if !t.has(e.slot) {
                    t.note(e.slot, f64::from(e.weight));
                    self.trace.set(t);
                }
            }
        }
        Some(i)
    }

    /// Every non-draining instance as the status view shows it.
    pub fn instances(&self) -> Vec<InstanceView> {
        self.candidates
            .iter()
            .map(|c| InstanceView {
                slot: c.ep.slot,
                addr: c.ep.addr,
                registry_healthy: c.healthy,
                registry_weight: c.base_weight,
                effective_weight: c.ep.weight,
                zone: c.zone.clone(),
                routable: self.slot_index.contains_key(&c.ep.slot),
                registered_ms: c.registered_ms,
            })
            .collect()
    }

    /// The share of traffic (parts per million) of each zone of the routing over all
    /// routable instances (no subset); empty when zone-aware routing is off.
    pub fn zone_shares(&self) -> Vec<(String, u32)> {
        let Some((split, _)) = self.main.as_ref().and_then(|g| g.zones.as_ref()) else {
            return Vec::new();
        };
        // The main group's zones in `build_zones` order: the endpoints' zones as
        // first seen, then (priority failover) the other candidates' zones.
        let mut names: Vec<&str> = self.zones.iter().map(String::as_str).collect();
        if !self.options.zone_priorities.is_empty() {
            for c in &self.candidates {
                if !names.contains(&c.zone.as_str()) {
                    names.push(c.zone.as_str());
                }
            }
        }
        names
            .iter()
            .zip(split.shares_ppm())
            .map(|(n, &p)| (n.to_string(), p))
            .collect()
    }

    /// The table's options (policy, zone settings).
    pub fn options(&self) -> &Options {
        &self.options
    }

    /// Starts recording the candidates of the next picks (see [`crate::explain`]).
    pub fn trace_start(&self) {
        self.trace.set(crate::explain::Trace::default());
        self.tracing.set(true);
    }

    /// Stops recording and returns what the picks since [`Self::trace_start`] looked at.
    pub fn trace_take(&self) -> crate::explain::Trace {
        self.tracing.set(false);
        self.trace.take()
    }

    fn note(&self, slot: u32, cost: f64) {
        let mut t = self.trace.get();
        t.note(slot, cost);
        self.trace.set(t);
    }

    /// Records every candidate of a `peak_ewma` pick: `cost`'s cost per weight, or
    /// what `hot_cold` compared (latency, in flight, hot, in the fast band).
    fn note_choice(&self, choice: &peak_ewma::Choice) {
        let hot_cold = self.options.peak_ewma_rule == PeakRule::HotCold;
        let mut t = self.trace.get();
        for c in choice.considered() {
            let Some(e) = self.endpoints.get(c.index) else {
                continue;
            };
            if hot_cold {
                t.note(e.slot, c.latency_ns.unwrap_or(f64::NAN));
                t.mark(e.slot, c.in_flight, c.hot, c.in_band);
            } else {
                t.note(e.slot, c.cost);
            }
        }
        self.trace.set(t);
    }

    fn note_hash(&self, hash: Option<u64>) {
        let mut t = self.trace.get();
        t.hash = hash;
        self.trace.set(t);
    }

    /// The policy's state for one instance (status view): `peak_ewma`'s cost per
    /// weight in nanoseconds and this worker's pending count.
    pub fn peak_cost(&self, slot: u32, now_ms: u64) -> Option<(f64, u32)> {
        let i = self.index_of_slot(slot)?;
        self.peak.as_ref()?.explain_cost(i, now_ms)
    }

    /// A `peak_ewma` pick in a pool: `choices` distinct weighted draws of
    /// `members`, compared by the rule. Returns the outcome, which lists every
    /// candidate with what the rule saw (endpoint indexes), and the winner's
    /// position in `members`. `hot_cold` reads the shared in-flight counts
    /// (`req.active`, `req.total_active`).
    fn peak_choice<R: Rng, A: FnMut(u32) -> i64>(
        peak: &PeakEwma,
        sampler: &WeightedSampler,
        pool_weight: u64,
        options: &Options,
        members: &[usize],
        slot_of: impl Fn(usize) -> Option<u32>,
        req: &mut Request<'_, R, A>,
    ) -> Option<(peak_ewma::Choice, usize)> {
        let mut drawn = [0usize; peak_ewma::MAX_CHOICES];
        let d = (options.peak_ewma_choices as usize).clamp(2, peak_ewma::MAX_CHOICES);
        let n = sampler.sample_distinct(req.rng, drawn.get_mut(..d)?);
        let drawn = drawn.get(..n)?;
        let choice = match options.peak_ewma_rule {
            PeakRule::HotCold => {
                let mut cands = [(0usize, 0i64); peak_ewma::MAX_CHOICES];
                for (c, &k) in cands.iter_mut().zip(drawn) {
                    let i = members.get(k).copied()?;
                    *c = (i, slot_of(i).map(&mut req.active).unwrap_or(0));
                }
                // The service's in-flight count stands for the pool's: exact for
                // the whole table, above it for a zone or a subset (fewer hot).
                let pool = peak_ewma::PoolLoad {
                    in_flight: i64::try_from(req.total_active).unwrap_or(i64::MAX),
                    weight: pool_weight,
                };
                peak.hot_cold(cands.get(..n)?, pool, req.rng, req.now_ms)
            }
            PeakRule::Cost => {
                let mut cands = [0usize; peak_ewma::MAX_CHOICES];
                for (c, &k) in cands.iter_mut().zip(drawn) {
                    *c = members.get(k).copied()?;
                }
                peak.lowest_cost(cands.get(..n)?, req.rng, req.now_ms)
            }
        }?;
        Some((choice, drawn.get(choice.chosen).copied()?))
    }

    /// Picks an endpoint.
    pub fn pick<R: Rng, A: FnMut(u32) -> i64>(
        &mut self,
        req: &mut Request<'_, R, A>,
    ) -> Option<&Endpoint> {
        let i = self.pick_index(req)?;
        self.endpoints.get(i)
    }

    /// Up to `n` distinct endpoints in the policy's order of preference: the first
    /// pick, then further picks (for retries that should go elsewhere).
    pub fn ranked<R: Rng, A: FnMut(u32) -> i64>(
        &mut self,
        n: usize,
        req: &mut Request<'_, R, A>,
    ) -> Vec<usize> {
        let mut out: Vec<usize> = Vec::with_capacity(n);
        let want = n.min(self.endpoints.len());
        let first_hash = req.hash;
        let mut uncached = None;
        for attempt in 0..want * 4 {
            if out.len() >= want {
                break;
            }
            // Hash policies: later entries come from re-hashing (different instances).
            if attempt > 0 {
                req.hash = first_hash
                    .map(|h| crate::hash_key::hash_bytes(&(h ^ attempt as u64).to_le_bytes()));
            }
            self.rr_ahead = attempt;
            let picked = self.pick_index_with(req, &mut uncached);
            self.rr_ahead = 0;
            match picked {
                Some(i) if !out.contains(&i) => out.push(i),
                Some(_) => {}
                None => break,
            }
        }
        req.hash = first_hash;
        let mut i = 0;
        while out.len() < want && i < self.endpoints.len() {
            if !out.contains(&i) {
                out.push(i);
            }
            i += 1;
        }
        out
    }

    /// Index of the endpoint in `slot`, if routable now.
    pub fn index_of_slot(&self, slot: u32) -> Option<usize> {
        self.slot_index.get(&slot).copied()
    }

    /// The address of `slot`'s instance, routable now or not: an instance on its
    /// half-open trial is out of `endpoints` while the trial runs, and the trial
    /// request must still be handed to it. A scan of the candidates when `slot` is
    /// not routable (once per trial per table).
    pub fn addr_of_slot(&self, slot: u32) -> Option<SocketAddr> {
        match self.index_of_slot(slot) {
            Some(i) => self.endpoints.get(i).map(|e| e.addr),
            None => self
                .candidates
                .iter()
                .find(|c| c.ep.slot == slot)
                .map(|c| c.ep.addr),
        }
    }

    /// `peak_ewma` bookkeeping: a request to `slot` starts.
    pub fn peak_start(&mut self, slot: u32) {
        let Some(i) = self.index_of_slot(slot) else {
            return;
        };
        if let Some(p) = self.peak.as_mut() {
            p.start(i);
        }
    }

    /// `peak_ewma` bookkeeping: a request to `slot` ended after `rtt_ns`.
    pub fn peak_end(&mut self, slot: u32, rtt_ns: Option<u64>, failed: bool, now_ms: u64) {
        let Some(i) = self.index_of_slot(slot) else {
            return;
        };
        if let Some(p) = self.peak.as_mut() {
            p.end(i);
            match (rtt_ns, failed) {
                (Some(rtt), false) => p.observe(i, rtt, now_ms),
                (Some(rtt), true) => p.observe_failure(i, rtt, now_ms),
                (None, _) => {}
            }
        }
    }

    /// Every non-draining instance: (slot, `ip:port`, registration time in Unix ms
    /// or `None`).
    pub fn hosts_by_slot(&self) -> impl Iterator<Item = (u32, SocketAddr, Option<u64>)> + '_ {
        self.candidates.iter().map(|c| {
            (
                c.ep.slot,
                c.ep.addr,
                Some(c.registered_ms).filter(|&t| t > 0),
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::instance::Instance;
    use crate::outlier::{Breaker, SlotState};
    use crate::rng::SplitMix64;
    use crate::snapshot::Entry;
    use wasm_bindgen_test::wasm_bindgen_test;

    fn opts(policy: Policy) -> Options {
        Options::new(policy)
    }

    fn entry(
        ip: &str,
        w: u32,
        state: State,
        slot: u32,
        zone: &str,
        meta: &[(&str, &str)],
    ) -> Entry {
        let mut i = Instance::new(format!("{ip}:80").parse().unwrap(), w);
        i.state = state;
        i.zone = zone.into();
        i.metadata = meta
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Entry {
            instance: i,
            source: 0,
            slot,
        }
    }

    fn snap() -> Snapshot {
        Snapshot {
            version: 3,
            entries: vec![
                entry("10.0.0.1", 5, State::Healthy, 0, "", &[]),
                entry("10.0.0.2", 1, State::Unhealthy, 1, "", &[]),
                entry("10.0.0.3", 1, State::Draining, 2, "", &[]),
                entry("10.0.0.4", 1, State::Healthy, 3, "", &[]),
            ],
            ..Default::default()
        }
    }

    fn pick_host(
        t: &mut Table,
        r: &mut SplitMix64,
        hash: Option<u64>,
        load: &dyn Fn(u32) -> i64,
    ) -> Option<String> {
        let mut req = Request {
            rng: r,
            now_ms: 0,
            hash,
            subset: None,
            active: |s| load(s),
            total_active: 0,
        };
        t.pick(&mut req).map(|e| e.host())
    }

    fn hosts(t: &Table) -> Vec<String> {
        t.endpoints.iter().map(|e| e.host()).collect()
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn only_healthy_instances_are_routable() {
        let mut r = SplitMix64(1);
        let mut t = Table::build(snap(), opts(Policy::RoundRobin), &mut r);
        assert_eq!(t.known, 4);
        assert_eq!(t.endpoints.len(), 2);
        assert!(!t.panic, "2 of 3 non-draining instances are healthy");
        let mut c = HashMap::new();
        for _ in 0..60 {
            *c.entry(pick_host(&mut t, &mut r, None, &|_| 0).unwrap())
                .or_insert(0) += 1;
        }
        assert_eq!(c["10.0.0.1:80"], 50);
        assert_eq!(c["10.0.0.4:80"], 10);
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn least_request_reads_load_by_slot() {
        let mut r = SplitMix64(1);
        let mut t = Table::build(snap(), opts(Policy::LeastRequest), &mut r);
        // Slot 3 (10.0.0.4, weight 1) is busy: it loses every pair it is in, so it
        // is chosen only when both draws are it, (1/6)^2 of the time.
        let busy = (0..1000)
            .filter(|_| {
                pick_host(&mut t, &mut r, None, &|slot| if slot == 3 { 10 } else { 0 }).as_deref()
                    == Some("10.0.0.4:80")
            })
            .count();
        assert!((10..60).contains(&busy), "{busy}");
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn empty_table_picks_nothing() {
        let mut r = SplitMix64(1);
        for p in [
            Policy::LeastRequest,
            Policy::RoundRobin,
            Policy::Random,
            Policy::PeakEwma,
            Policy::RingHash,
            Policy::Maglev,
        ] {
            let mut t = Table::build(Snapshot::default(), opts(p), &mut r);
            assert!(
                pick_host(&mut t, &mut r, Some(1), &|_| 0).is_none(),
                "{p:?}"
            );
        }
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn ejected_instances_leave_and_half_open_ones_return() {
        let mut r = SplitMix64(1);
        let mut t = Table::build(
            snap(),
            Options {
                panic_threshold: 0,
                ..opts(Policy::RoundRobin)
            },
            &mut r,
        );
        let mut o = Outliers {
            generation: 4,
            ..Default::default()
        };
        o.slots.insert(
            0,
            SlotState {
                breaker: Breaker::Open,
                until_ms: 9,
                times: 1,
            },
        );
        t.apply(&o, &|_, w| w, 0, &mut r);
        assert_eq!(hosts(&t), ["10.0.0.4:80"]);
        assert_eq!(t.outlier_generation, 4);
        o.slots.insert(
            0,
            SlotState {
                breaker: Breaker::HalfOpen,
                until_ms: 9,
                times: 1,
            },
        );
        t.apply(&o, &|_, w| w, 0, &mut r);
        assert_eq!(hosts(&t), ["10.0.0.1:80", "10.0.0.4:80"]);
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn panic_mode_spreads_over_all_non_draining() {
        let mut r = SplitMix64(1);
        let mut t = Table::build(snap(), opts(Policy::RoundRobin), &mut r);
        let mut o = Outliers::default();
        o.slots.insert(
            0,
            SlotState {
                breaker: Breaker::Open,
                until_ms: 9,
                times: 1,
            },
        );
        t.apply(&o, &|_, w| w, 0, &mut r);
        // 1 routable of 3 non-draining (33 % < 50 %): panic, the draining one stays out.
        assert!(t.panic);
        assert_eq!(hosts(&t), ["10.0.0.1:80", "10.0.0.2:80", "10.0.0.4:80"]);
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn ranked_lists_distinct_endpoints() {
        let mut r = SplitMix64(1);
        for p in [Policy::RoundRobin, Policy::RingHash, Policy::Maglev] {
            let mut t = Table::build(snap(), opts(p), &mut r);
            let mut req = Request {
                rng: &mut r,
                now_ms: 0,
                hash: Some(42),
                subset: None,
                active: |_| 0,
                total_active: 0,
            };
            let ranked = t.ranked(3, &mut req);
            assert_eq!(ranked.len(), 2, "only two routable ({p:?})");
            assert_ne!(ranked[0], ranked[1]);
        }
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn ranked_first_entries_follow_round_robin() {
        // Weights 5 and 1 routable, three entries wanted: drawing the fallbacks must
        // not move the round-robin cursor, or the first entries skip through the
        // cycle (a,a,a,a,a,b) two steps at a time and the split is lost.
        for seed in 0..6 {
            let mut r = SplitMix64(seed);
            let mut t = Table::build(snap(), opts(Policy::RoundRobin), &mut r);
            let mut firsts = Vec::new();
            for _ in 0..12 {
                let mut req = Request {
                    rng: &mut r,
                    now_ms: 0,
                    hash: None,
                    subset: None,
                    active: |_| 0,
                    total_active: 0,
                };
                let ranked = t.ranked(3, &mut req);
                assert_eq!(ranked.len(), 2);
                assert_ne!(ranked[0], ranked[1]);
                firsts.push(t.endpoints[ranked[0]].host());
            }
            let light = firsts.iter().filter(|h| *h == "10.0.0.4:80").count();
            assert_eq!(
                light, 2,
                "seed {seed}: 5:1 over 12 first entries: {firsts:?}"
            );
        }
    }

    fn fleet(n: u32) -> Snapshot {
        Snapshot {
            version: 1,
            entries: (0..n)
                .map(|i| entry(&format!("10.0.1.{i}"), 1, State::Healthy, i, "", &[]))
                .collect(),
            ..Default::default()
        }
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn hash_policies_are_sticky_and_agree_across_builds() {
        for p in [Policy::RingHash, Policy::Maglev] {
            let mut r1 = SplitMix64(1);
            let mut r2 = SplitMix64(99);
            let mut a = Table::build(fleet(8), opts(p), &mut r1);
            let mut b = Table::build(fleet(8), opts(p), &mut r2);
            for key in 0..200u64 {
                let h = crate::hash_key::hash_bytes(&key.to_le_bytes());
                let x = pick_host(&mut a, &mut r1, Some(h), &|_| 0);
                assert_eq!(
                    x,
                    pick_host(&mut a, &mut r1, Some(h), &|_| 0),
                    "{p:?} key {key} not sticky"
                );
                assert_eq!(
                    x,
                    pick_host(&mut b, &mut r2, Some(h), &|_| 0),
                    "{p:?} key {key}: builds disagree"
                );
            }
        }
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn bounded_load_moves_keys_off_a_hot_instance() {
        let mut r = SplitMix64(1);
        let mut t = Table::build(
            fleet(4),
            Options {
                bounded_load_percent: Some(125),
                ..opts(Policy::RingHash)
            },
            &mut r,
        );
        let h = 12345;
        let home = pick_host(&mut t, &mut r, Some(h), &|_| 0).unwrap();
        let home_slot = t.endpoints.iter().find(|e| e.host() == home).unwrap().slot;
        // The key's home carries 20 of 24 in flight: above 1.25 × 24/4, so the key goes elsewhere.
        let mut req = Request {
            rng: &mut r,
            now_ms: 0,
            hash: Some(h),
            subset: None,
            active: |s| if s == home_slot { 20 } else { 1 },
            total_active: 24,
        };
        let other = t.pick(&mut req).unwrap().host();
        assert_ne!(other, home);
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn selectors_past_the_subset_cache_build_once_per_request_and_share_the_fallback() {
        let s = Snapshot {
            version: 1,
            entries: (0..3u8)
                .map(|i| {
                    let v = if i == 0 { "v1" } else { "v2" };
                    entry(
                        &format!("10.0.0.{}", i + 1),
                        1,
                        State::Healthy,
                        u32::from(i),
                        "",
                        &[("version", v)],
                    )
                })
                .collect(),
            ..Default::default()
        };
        let mut r = SplitMix64(1);
        let mut t = Table::build(
            s,
            Options {
                subset_fallback: Fallback::AnyEndpoint,
                ..opts(Policy::RingHash)
            },
            &mut r,
        );
        let ranked = |t: &mut Table, sel: &Pairs, r: &mut SplitMix64| {
            let mut req = Request {
                rng: r,
                now_ms: 0,
                hash: Some(7),
                subset: Some(sel),
                active: |_| 0,
                total_active: 0,
            };
            t.ranked(3, &mut req)
        };
        let made_up = |i: usize| -> Pairs { vec![("version".into(), format!("v-{i}"))] };
        // Fill the cache with made-up selectors: a group each.
        for i in 0..MAX_CACHED_SUBSETS {
            assert_eq!(ranked(&mut t, &made_up(i), &mut r).len(), 3);
        }
        let built = t.groups_built.get();
        // 1,000 more made-up selectors: all share one fallback group.
        let mut firsts = std::collections::BTreeSet::new();
        for i in MAX_CACHED_SUBSETS..MAX_CACHED_SUBSETS + 1000 {
            let got = ranked(&mut t, &made_up(i), &mut r);
            assert_eq!(got.len(), 3);
            firsts.insert(got[0]);
        }
        assert_eq!(t.groups_built.get(), built + 1);
        assert_eq!(firsts.len(), 1, "one hash key, one ring: {firsts:?}");
        // A selector that matches, past the cache: one group for its three entries.
        let v2: Pairs = vec![("version".into(), "v2".into())];
        let got = ranked(&mut t, &v2, &mut r);
        assert_eq!(t.groups_built.get(), built + 2);
        let mut first_two: Vec<String> = got[..2].iter().map(|&i| t.endpoints[i].host()).collect();
        first_two.sort();
        assert_eq!(first_two, ["10.0.0.2:80", "10.0.0.3:80"]);
        // A new table forgets the fallback group.
        t.apply(&Outliers::default(), &|_, w| w, 0, &mut r);
        let before = t.groups_built.get();
        ranked(&mut t, &made_up(5000), &mut r);
        ranked(&mut t, &made_up(5001), &mut r);
        assert_eq!(
            t.groups_built.get(),
            before + 2,
            "the cache has room again: one group each"
        );
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn subsets_from_config_and_header_with_fallback() {
        let s = Snapshot {
            version: 1,
            entries: vec![
                entry("10.0.0.1", 1, State::Healthy, 0, "", &[("version", "v1")]),
                entry("10.0.0.2", 1, State::Healthy, 1, "", &[("version", "v2")]),
                entry("10.0.0.3", 1, State::Healthy, 2, "", &[("version", "v2")]),
            ],
            ..Default::default()
        };
        let mut r = SplitMix64(1);
        let v1: Pairs = vec![("version".into(), "v1".into())];
        let mut t = Table::build(
            s.clone(),
            Options {
                subset: Some(v1.clone()),
                subset_fallback: Fallback::AnyEndpoint,
                ..opts(Policy::RoundRobin)
            },
            &mut r,
        );
        for _ in 0..10 {
            assert_eq!(
                pick_host(&mut t, &mut r, None, &|_| 0).as_deref(),
                Some("10.0.0.1:80")
            );
        }
        let v2: Pairs = vec![("version".into(), "v2".into())];
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..10 {
            let mut req = Request {
                rng: &mut r,
                now_ms: 0,
                hash: None,
                subset: Some(&v2),
                active: |_| 0,
                total_active: 0,
            };
            seen.insert(t.pick(&mut req).unwrap().host());
        }
        assert_eq!(
            seen.into_iter().collect::<Vec<_>>(),
            ["10.0.0.2:80", "10.0.0.3:80"]
        );
        // Unknown version: fallback to any endpoint; with no fallback, nothing.
        let v9: Pairs = vec![("version".into(), "v9".into())];
        let mut req = Request {
            rng: &mut r,
            now_ms: 0,
            hash: None,
            subset: Some(&v9),
            active: |_| 0,
            total_active: 0,
        };
        assert!(t.pick(&mut req).is_some());
        let mut strict = Table::build(
            s,
            Options {
                subset: Some(v9),
                ..opts(Policy::RoundRobin)
            },
            &mut r,
        );
        assert!(pick_host(&mut strict, &mut r, None, &|_| 0).is_none());
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn zone_aware_keeps_traffic_local_and_spills_when_short() {
        let zoned =
            |local_n: u32, remote_n: u32| Snapshot {
                version: 1,
                entries: (0..local_n)
                    .map(|i| entry(&format!("10.1.0.{i}"), 1, State::Healthy, i, "a", &[]))
                    .chain((0..remote_n).map(|i| {
                        entry(&format!("10.2.0.{i}"), 1, State::Healthy, 100 + i, "b", &[])
                    }))
                    .collect(),
                ..Default::default()
            };
        let mut r = SplitMix64(5);
        let o = Options {
            local_zone: Some("a".into()),
            ..opts(Policy::RoundRobin)
        };
        // Equal capacity: everything stays in zone a.
        // Picks, of `n`, that stay in zone a (addresses 10.1.*).
        let local = |t: &mut Table, r: &mut SplitMix64, n: usize| {
            (0..n)
                .filter(|_| pick_host(t, r, None, &|_| 0).unwrap().starts_with("10.1."))
                .count()
        };
        let mut t = Table::build(zoned(3, 3), o.clone(), &mut r);
        assert_eq!(local(&mut t, &mut r, 600), 600);
        // Zone a has 1 of 4 capacity units against half the demand: about half spills.
        let mut t = Table::build(zoned(1, 3), o, &mut r);
        let local = local(&mut t, &mut r, 4000);
        assert!(
            (1800..2200).contains(&local),
            "{local} of 4000 stayed local"
        );
    }

    /// `v1_a`, `v1_b` instances of version v1 in zones a and b, and `v2_a` of v2 in
    /// zone a; v1 addresses are 10.1.* (zone a) and 10.2.* (zone b), v2 10.3.*.
    fn versions_in_zones(v1_a: u32, v1_b: u32, v2_a: u32) -> Snapshot {
        let v1 = [("version", "v1")];
        let v2 = [("version", "v2")];
        Snapshot {
            version: 1,
            entries: (0..v1_a)
                .map(|i| entry(&format!("10.1.0.{i}"), 1, State::Healthy, i, "a", &v1))
                .chain(
                    (0..v1_b).map(|i| {
                        entry(&format!("10.2.0.{i}"), 1, State::Healthy, 100 + i, "b", &v1)
                    }),
                )
                .chain(
                    (0..v2_a).map(|i| {
                        entry(&format!("10.3.0.{i}"), 1, State::Healthy, 200 + i, "a", &v2)
                    }),
                )
                .collect(),
            ..Default::default()
        }
    }

    /// Hosts of `n` picks with the request's subset selector `sel`, by address prefix.
    fn picks_by_prefix(
        t: &mut Table,
        r: &mut SplitMix64,
        sel: Option<&[(String, String)]>,
        n: usize,
    ) -> HashMap<&'static str, usize> {
        let mut c = HashMap::new();
        for _ in 0..n {
            let mut req = Request {
                rng: &mut *r,
                now_ms: 0,
                hash: None,
                subset: sel,
                active: |_| 0,
                total_active: 0,
            };
            let Some(h) = t.pick(&mut req).map(|e| e.host()) else {
                *c.entry("none").or_insert(0) += 1;
                continue;
            };
            let k = ["10.1.", "10.2.", "10.3."]
                .into_iter()
                .find(|p| h.starts_with(p))
                .unwrap();
            *c.entry(k).or_insert(0) += 1;
        }
        c
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn zone_aware_routing_applies_within_the_subset() {
        let v1: Pairs = vec![("version".into(), "v1".into())];
        let zoned = |fallback: Fallback| Options {
            local_zone: Some("a".into()),
            subset: Some(v1.clone()),
            subset_fallback: fallback,
            ..opts(Policy::RoundRobin)
        };
        let mut r = SplitMix64(11);
        // The subset has as much in zone a as in zone b: it stays in zone a.
        let mut t = Table::build(
            versions_in_zones(3, 3, 2),
            zoned(Fallback::NoFallback),
            &mut r,
        );
        let c = picks_by_prefix(&mut t, &mut r, None, 600);
        assert_eq!(c.get("10.1."), Some(&600), "{c:?}");
        // Zone a holds 1 of the subset's 4 instances: about half of the picks spill
        // to zone b of the subset, although zone a as a whole (1 + 5) is ample.
        let mut t = Table::build(
            versions_in_zones(1, 3, 5),
            zoned(Fallback::NoFallback),
            &mut r,
        );
        let c = picks_by_prefix(&mut t, &mut r, None, 4000);
        let local = c.get("10.1.").copied().unwrap_or(0);
        assert!((1800..2200).contains(&local), "{c:?}");
        assert_eq!(local + c.get("10.2.").copied().unwrap_or(0), 4000, "{c:?}");
        // The same through a request's selector.
        let c = picks_by_prefix(&mut t, &mut r, Some(&v1), 4000);
        let local = c.get("10.1.").copied().unwrap_or(0);
        assert!((1800..2200).contains(&local), "{c:?}");
        assert_eq!(local + c.get("10.2.").copied().unwrap_or(0), 4000, "{c:?}");
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn an_empty_subset_falls_back_as_configured_with_zones() {
        let v9: Pairs = vec![("version".into(), "v9".into())];
        let v1: Pairs = vec![("version".into(), "v1".into())];
        let zoned = |fallback: Fallback| Options {
            local_zone: Some("a".into()),
            subset: Some(v9.clone()),
            subset_fallback: fallback,
            ..opts(Policy::RoundRobin)
        };
        let fleet = || versions_in_zones(1, 3, 5);
        let mut r = SplitMix64(12);
        // No fallback: nothing.
        let mut t = Table::build(fleet(), zoned(Fallback::NoFallback), &mut r);
        assert_eq!(
            picks_by_prefix(&mut t, &mut r, None, 10).get("none"),
            Some(&10)
        );
        // Any endpoint: zone a has 6 of 9, more than its half: all stay in zone a.
        let mut t = Table::build(fleet(), zoned(Fallback::AnyEndpoint), &mut r);
        let c = picks_by_prefix(&mut t, &mut r, None, 600);
        assert_eq!(c.get("10.2."), None, "{c:?}");
        assert_eq!(
            c.get("10.1.").copied().unwrap_or(0) + c.get("10.3.").copied().unwrap_or(0),
            600
        );
        // The default subset (v1): zone-aware within it, about half spills to b.
        let mut t = Table::build(fleet(), zoned(Fallback::DefaultSubset(v1)), &mut r);
        let c = picks_by_prefix(&mut t, &mut r, None, 4000);
        let local = c.get("10.1.").copied().unwrap_or(0);
        assert!((1800..2200).contains(&local), "{c:?}");
        assert_eq!(local + c.get("10.2.").copied().unwrap_or(0), 4000, "{c:?}");
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn zone_priorities_apply_within_the_subset() {
        // Group 0: zone a (local); group 1: zone b. The subset (v1) has 5 in each
        // zone, of which `up` in zone a are healthy; v2 has 5 healthy in zone a.
        let fleet = |up: u32| {
            let mut s = versions_in_zones(5, 5, 5);
            for e in s.entries.iter_mut().take(5).skip(up as usize) {
                e.instance.state = State::Unhealthy;
            }
            s
        };
        let v1: Pairs = vec![("version".into(), "v1".into())];
        let o = Options {
            local_zone: Some("a".into()),
            zone_priorities: vec![vec!["a".into()], vec!["b".into()]],
            subset: Some(v1),
            panic_threshold: 0,
            ..opts(Policy::RoundRobin)
        };
        let mut r = SplitMix64(13);
        let mut t = Table::build(fleet(5), o.clone(), &mut r);
        assert_eq!(
            picks_by_prefix(&mut t, &mut r, None, 1000).get("10.1."),
            Some(&1000)
        );
        // 1 of the subset's 5 in zone a up: its health is 1.4 · 1/5 = 28 %, so
        // zone b takes 72 % (counting v2's healthy zone-a instances would hide it).
        let mut t = Table::build(fleet(1), o, &mut r);
        let c = picks_by_prefix(&mut t, &mut r, None, 4000);
        let b = c.get("10.2.").copied().unwrap_or(0);
        assert!((2760..3000).contains(&b), "{c:?}");
        assert_eq!(b + c.get("10.1.").copied().unwrap_or(0), 4000, "{c:?}");
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn zone_priorities_fail_over_to_the_next_group() {
        // Group 0: zones a (local) and b; group 1: zone c. Five instances per zone, of
        // which `up_a`, `up_b` in a and b are healthy (all of c).
        let fleet = |up_a: u32, up_b: u32| Snapshot {
            version: 1,
            entries: ["a", "b", "c"]
                .iter()
                .enumerate()
                .flat_map(|(z, name)| {
                    let up = [up_a, up_b, 5][z];
                    (0..5u32).map(move |i| {
                        let st = if i < up {
                            State::Healthy
                        } else {
                            State::Unhealthy
                        };
                        entry(
                            &format!("10.{z}.0.{i}"),
                            1,
                            st,
                            z as u32 * 10 + i,
                            name,
                            &[],
                        )
                    })
                })
                .collect(),
            ..Default::default()
        };
        let o = Options {
            local_zone: Some("a".into()),
            zone_priorities: vec![vec!["a".into(), "b".into()], vec!["c".into()]],
            // 7 of 15 healthy below: not panic mode (which ignores zones).
            panic_threshold: 0,
            ..opts(Policy::RoundRobin)
        };
        let mut r = SplitMix64(7);
        let count = |t: &mut Table, r: &mut SplitMix64| {
            let mut n = [0u32; 3];
            for _ in 0..4000 {
                let h = pick_host(t, r, None, &|_| 0).unwrap();
                n[h[3..4].parse::<usize>().unwrap()] += 1;
            }
            n
        };
        // Everything healthy: zone a keeps all.
        let mut t = Table::build(fleet(5, 5), o.clone(), &mut r);
        assert_eq!(count(&mut t, &mut r), [4000, 0, 0]);
        // 4 of 5 up in a: group 0 is 1.4·9/10 > 100 % healthy; a spills to b only.
        let mut t = Table::build(fleet(4, 5), o.clone(), &mut r);
        assert_eq!(count(&mut t, &mut r)[2], 0);
        // 1 of 5 up in a and in b: group 0 health 1.4·2/10 = 28 %, c takes 72 %.
        let mut t = Table::build(fleet(1, 1), o, &mut r);
        let n = count(&mut t, &mut r);
        assert!(
            (1000..1240).contains(&n[0]) && n[1] < 100 && (2760..3000).contains(&n[2]),
            "{n:?}"
        );
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn peak_ewma_cost_rule_with_two_choices_avoids_a_slow_instance_until_others_pile_up() {
        let mut r = SplitMix64(3);
        let mut o = opts(Policy::PeakEwma);
        o.peak_ewma_rule = PeakRule::Cost;
        o.peak_ewma_choices = 2;
        let mut t = Table::build(fleet(3), o, &mut r);
        // Slot 0 answers in 200 ms, the others in 5 ms.
        for now in 0..50u64 {
            for slot in 0..3u32 {
                t.peak_start(slot);
                t.peak_end(
                    slot,
                    Some(if slot == 0 { 200_000_000 } else { 5_000_000 }),
                    false,
                    now,
                );
            }
        }
        let slow = (0..3000)
            .filter(|_| pick_host(&mut t, &mut r, None, &|_| 0).as_deref() == Some("10.0.1.0:80"))
            .count();
        // Two distinct candidates: the slow one never wins a pair while its estimate
        // is the highest (with replacement it would get ~1/9).
        assert_eq!(slow, 0, "{slow} of 3000 to the slow instance");
        // With 40 requests pending on each fast one (5 ms × 41 > 200 ms) the slow one
        // is the cheaper choice of every pair it is in (2/3 of the pairs).
        for _ in 0..40 {
            t.peak_start(1);
            t.peak_start(2);
        }
        let slow = (0..300)
            .filter(|_| pick_host(&mut t, &mut r, None, &|_| 0).as_deref() == Some("10.0.1.0:80"))
            .count();
        assert!(
            slow > 150,
            "{slow} of 300 to the slow instance once the others are loaded"
        );
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn peak_ewma_hot_cold_reads_shared_load_and_keeps_a_slow_instance_out() {
        let mut r = SplitMix64(3);
        let mut t = Table::build(fleet(4), opts(Policy::PeakEwma), &mut r);
        // Slot 0 answers in 20 ms, the others in 2 to 2.5 ms.
        for now in 0..50u64 {
            for slot in 0..4u32 {
                t.peak_start(slot);
                let ms = [20, 2, 2, 2][slot as usize] * 1_000_000 + u64::from(slot) * 150_000;
                t.peak_end(slot, Some(ms), false, now);
            }
        }
        let slow_host = t.endpoints[t.index_of_slot(0).unwrap()].host();
        // A pick with the shared in-flight counts `load` and their total.
        let pick = |t: &mut Table, r: &mut SplitMix64, load: [i64; 4]| {
            let mut req = Request {
                rng: r,
                now_ms: 50,
                hash: None,
                subset: None,
                active: |s: u32| load[s as usize],
                total_active: load.iter().sum::<i64>() as u64,
            };
            t.pick(&mut req).map(|e| e.host()).unwrap()
        };
        let busy_host = t.endpoints[t.index_of_slot(1).unwrap()].host();
        // The fast ones have 40 requests in flight each (other workers' included):
        // the idle slow one is still out of the latency band.
        let mut seen = HashMap::new();
        for _ in 0..3000 {
            let h = pick(&mut t, &mut r, [0, 40, 40, 40]);
            *seen.entry(h).or_insert(0u32) += 1;
        }
        assert_eq!(seen.get(&slow_host), None, "{seen:?}");
        // Among the fast ones the least loaded wins: slot 1 with 30 in flight gets
        // nothing while the others have room (and is hot: 30·4 > 2·30 + 4).
        let mut seen = HashMap::new();
        for _ in 0..3000 {
            let h = pick(&mut t, &mut r, [0, 30, 0, 0]);
            *seen.entry(h).or_insert(0u32) += 1;
        }
        assert_eq!(seen.get(&busy_host), None, "{seen:?}");
        assert_eq!(seen.get(&slow_host), None, "{seen:?}");
        assert_eq!(seen.len(), 2, "{seen:?}");
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn effective_weights_apply() {
        let mut r = SplitMix64(3);
        let mut t = Table::build(fleet(2), opts(Policy::RoundRobin), &mut r);
        // Slot 1 ramps at a tenth of its weight (slow start).
        t.apply(
            &Outliers::default(),
            &|slot, w| if slot == 1 { w } else { w * 10 },
            0,
            &mut r,
        );
        let one = (0..110)
            .filter(|_| pick_host(&mut t, &mut r, None, &|_| 0).as_deref() == Some("10.0.1.1:80"))
            .count();
        assert_eq!(one, 10);
    }
}
