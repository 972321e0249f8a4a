//! Plugin configuration: the JSON an operator writes in Envoy's
//! `typed_config.config.configuration`. Parsing names the offending field
//! (`services[0].sources[1].consul.wait: ...`) so Envoy's log says what to fix.

use crate::duration::Millis;
use crate::hash_key::HashOn;
use crate::subset::{parse_selector, Fallback, Pairs};
use crate::validate::printable;
use serde::Deserialize;
use std::collections::{HashMap, HashSet};

// Each registry owns its section of the configuration; these paths stay valid.
pub use crate::registry::consul::ConsulConfig;
pub use crate::registry::etcd::EtcdConfig;
pub use crate::registry::eureka::EurekaConfig;
pub use crate::registry::kubernetes::KubernetesConfig;
pub use crate::registry::nacos::{NacosApi, NacosConfig};
pub use crate::registry::static_list::{StaticConfig, StaticInstance};
pub use crate::validate::ConfigError;

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PluginConfig {
    /// The services this filter balances; a request belongs to one through its route's
    /// metadata, its route's target cluster (`upstream_clusters`) or its authority
    /// (`hosts`), in that order.
    pub services: Vec<ServiceConfig>,
    /// How the chosen instance is handed to Envoy.
    #[serde(default)]
    pub handoff: Handoff,
    /// Header used by the `header` hand-off.
    #[serde(default = "default_handoff_header")]
    pub handoff_header: String,
    /// Period of every root context's timer: workers pick up new snapshots and the
    /// poller (one per Envoy) drives its registry calls at this resolution.
    #[serde(default = "default_tick")]
    pub tick: Millis,
    /// Route metadata namespace holding `service` (`filter_metadata.<key>.service`).
    #[serde(default = "default_metadata_namespace")]
    pub metadata_namespace: String,
    /// Per-instance stats (`picks`) are kept for at most this many distinct instances
    /// per service, so instance churn cannot grow Envoy's stat table without bound.
    #[serde(default = "default_max_instance_stats")]
    pub max_instance_stats: usize,
    /// The local instance to register in a registry (see `registrar`); off when absent.
    #[serde(default)]
    pub register: Option<crate::registrar::RegisterConfig>,
    /// The status view: a path this filter answers itself (never forwarded) with
    /// every service's instances and why they are or are not routed; off when absent.
    #[serde(default)]
    pub status: Option<StatusConfig>,
    /// The decision header: on request, a response header naming the chosen
    /// instance and why; off when absent.
    #[serde(default)]
    pub explain: Option<ExplainConfig>,
    /// Puts the chosen instance (`ip:port`) in filter state `wasm.registry_lb_instance`
    /// for the access log: `%FILTER_STATE(wasm.registry_lb_instance:PLAIN)%`.
    #[serde(default)]
    pub access_log_instance: bool,
}

/// `status`: the path answered, and who may ask.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct StatusConfig {
    /// Exact path (the query string is not part of it), e.g. `/registry-lb/status`.
    pub path: String,
    /// Client addresses (CIDR) answered; others get 403. Loopback by default.
    #[serde(default = "crate::cidr::loopback")]
    pub allowed_sources: Vec<String>,
    /// Envoy takes the client address from `x-forwarded-for` unless the connection
    /// manager has `use_remote_address: true`, so by default a request carrying that
    /// header is refused whatever its address; `true` accepts it (set
    /// `use_remote_address: true`, or a trusted front proxy that rewrites the header).
    #[serde(default)]
    pub trust_forwarded_for: bool,
    /// `allowed_sources`, parsed.
    #[serde(skip)]
    pub ranges: Vec<crate::cidr::Cidr>,
}

/// `explain`: the decision header and who may ask for it.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ExplainConfig {
    /// Response header carrying the decision.
    #[serde(default = "default_explain_header")]
    pub header: String,
    /// Request header asking for it (any value).
    #[serde(default = "default_explain_request_header")]
    pub request_header: String,
    /// Client addresses (CIDR) whose ask is honored. Loopback by default.
    #[serde(default = "crate::cidr::loopback")]
    pub allowed_sources: Vec<String>,
    /// Envoy takes the client address from `x-forwarded-for` unless the connection
    /// manager has `use_remote_address: true`, so by default a request carrying that
    /// header is refused whatever its address; `true` accepts it (set
    /// `use_remote_address: true`, or a trusted front proxy that rewrites the header).
    #[serde(default)]
    pub trust_forwarded_for: bool,
    /// `allowed_sources`, parsed.
    #[serde(skip)]
    pub ranges: Vec<crate::cidr::Cidr>,
}

fn default_explain_header() -> String {
    "x-registry-lb-decision".to_string()
}
fn default_explain_request_header() -> String {
    "x-registry-lb-explain".to_string()
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum Handoff {
    /// Filter state `envoy.network.transport_socket.original_dst_address` for an
    /// `ORIGINAL_DST` cluster. Nothing reaches the upstream; clients cannot steer it.
    #[default]
    FilterState,
    /// `handoff_header: ip:port` for an `ORIGINAL_DST` cluster with `use_http_header`.
    /// Any client-sent value of that header is removed on every request.
    Header,
    /// `handoff_header: ip:port,ip:port,…` — a ranked list for Envoy's
    /// `override_host` load-balancing policy: attempt k (first try, then retries)
    /// goes to entry k. Any client-sent value is removed on every request.
    OverrideHost,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum Policy {
    /// Smooth weighted round robin (nginx), per worker.
    #[default]
    RoundRobin,
    /// Weighted power-of-two-choices on in-flight requests shared by all workers.
    LeastRequest,
    /// Weighted random.
    Random,
    /// A few weighted candidates, compared on peak-EWMA latency and requests in
    /// flight (Prequal's hot-cold rule, or Finagle's cost).
    PeakEwma,
    /// Consistent hashing on a ring (Ketama, as Envoy's ring_hash).
    RingHash,
    /// Consistent hashing with a Maglev table.
    Maglev,
}

impl Policy {
    pub fn is_hash(self) -> bool {
        matches!(self, Policy::RingHash | Policy::Maglev)
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ServiceConfig {
    pub name: String,
    /// Requests whose route targets one of these clusters (Envoy's
    /// `xds.cluster_name`, e.g. Istio's `outbound|80||web.default.svc.cluster.local`)
    /// belong to this service, unless route metadata names a service.
    #[serde(default)]
    pub upstream_clusters: Vec<String>,
    /// Requests whose `:authority` is one of these hosts (port ignored, any case)
    /// belong to this service, unless route metadata or `upstream_clusters` claim
    /// them first.
    #[serde(default)]
    pub hosts: Vec<String>,
    #[serde(default)]
    pub policy: Policy,
    /// A second policy computed beside `policy` on every request and never used for
    /// routing: its picks and disagreements are counted (`shadow_*` stats).
    #[serde(default)]
    pub shadow_policy: Option<Policy>,
    /// `ring_hash` / `maglev`: what the hash key is taken from.
    #[serde(default)]
    pub hash_on: Option<HashOnConfig>,
    /// `ring_hash` / `maglev`: consistent hashing with bounded loads — no instance
    /// above this percent of the average in-flight load (e.g. 125).
    #[serde(default)]
    pub bounded_load_percent: Option<u32>,
    /// `peak_ewma` settings.
    #[serde(default)]
    pub peak_ewma: PeakEwmaConfig,
    /// New instances ramp their weight up over a window.
    #[serde(default)]
    pub slow_start: Option<SlowStartConfig>,
    /// Zone-aware routing: prefer instances in this zone, spill over by capacity.
    #[serde(default)]
    pub local_zone: Option<String>,
    /// Priority failover: zone groups in order of preference (e.g. the local
    /// region's zones, then another region's). Zones not listed form a last group.
    #[serde(default)]
    pub zone_priorities: Option<Vec<Vec<String>>>,
    /// Envoy's overprovisioning factor for `zone_priorities`, in percent: a group
    /// keeps all traffic while at least 100/this of its weight is healthy.
    #[serde(default = "default_overprovisioning")]
    pub overprovisioning_percent: u32,
    /// Route to instances whose metadata match.
    #[serde(default)]
    pub subset: Option<SubsetConfig>,
    /// Weights follow load that backends report in a response header.
    #[serde(default)]
    pub load_report: Option<LoadReportConfig>,
    /// `least_request`: candidates compared per pick (Envoy's `choice_count`).
    #[serde(default = "default_choice_count")]
    pub choice_count: u32,
    /// Poll period for sources without blocking queries, and the pause between
    /// Consul blocking queries that returned nothing new is zero (they block instead).
    /// Default 5s; 30s for a service whose sources are all Eureka (its server answers
    /// from a cache refreshed every 30s, so polling faster reads the same bytes).
    #[serde(default = "refresh_unset")]
    pub refresh_interval: Millis,
    /// Delays the first registry call by a random time below this (default 0: at
    /// once), so a fleet restarted together spreads even its first calls; requests
    /// wait for the first snapshot up to `initial_fetch_timeout` meanwhile.
    #[serde(default)]
    pub start_jitter: Millis,
    /// How long a request may wait for the service's first snapshot after Envoy
    /// starts (as Envoy's own `initial_fetch_timeout` for EDS) before a 503.
    #[serde(default = "default_initial_fetch_timeout")]
    pub initial_fetch_timeout: Millis,
    /// Timeout of one registry call (Consul blocking queries add their `wait`).
    #[serde(default = "default_request_timeout")]
    pub request_timeout: Millis,
    /// First retry delay after a failed refresh; doubles per failure, with jitter.
    #[serde(default = "default_backoff_base")]
    pub backoff_base: Millis,
    /// Upper bound of the retry delay.
    #[serde(default = "default_backoff_max")]
    pub backoff_max: Millis,
    /// Registry answers larger than this are refused.
    #[serde(default = "default_max_response_bytes")]
    pub max_response_bytes: usize,
    /// Passive health: eject instances that keep failing.
    #[serde(default)]
    pub outlier_detection: OutlierConfig,
    /// Percent of non-draining instances that must be routable; below it, traffic
    /// goes to all of them (Envoy's `healthy_panic_threshold`). 0 disables.
    #[serde(default = "default_panic_threshold")]
    pub panic_threshold: u32,
    /// Refreshes that would drop more than this percent of the routable instances
    /// (or empty the service) are held back until seen `guard_confirmations` times
    /// in a row. 100 disables the guard.
    #[serde(default = "default_guard_max_drop_percent")]
    pub guard_max_drop_percent: u32,
    #[serde(default = "default_guard_confirmations")]
    pub guard_confirmations: u32,
    /// With the registry unreachable, keep serving the last good instances for at
    /// most this long (0 = forever), then answer 503 `registry_lb_stale`.
    #[serde(default)]
    pub max_stale: Millis,
    /// Active HTTP health checks of every instance (off when absent).
    #[serde(default)]
    pub health_check: Option<HealthCheckConfig>,
    /// `override_host` hand-off: entries in the ranked list (first try + retries).
    #[serde(default = "default_override_host_count")]
    pub override_host_count: u32,
    /// Where instances come from. Several sources are merged by `ip:port`; on a
    /// conflict the earlier source in this list wins.
    pub sources: Vec<SourceConfig>,
}

/// Active health checks, sent through an `ORIGINAL_DST` cluster with
/// `use_http_header: true` that no route targets (so clients cannot use it).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HealthCheckConfig {
    #[serde(default = "default_hc_cluster")]
    pub cluster: String,
    pub path: String,
    /// `:authority` of checks; defaults to the service name.
    #[serde(default)]
    pub host: Option<String>,
    /// Header the cluster reads the destination from.
    #[serde(default = "default_handoff_header")]
    pub header: String,
    #[serde(default = "default_hc_interval")]
    pub interval: Millis,
    #[serde(default = "default_hc_timeout")]
    pub timeout: Millis,
    #[serde(default = "default_hc_healthy")]
    pub healthy_threshold: u32,
    #[serde(default = "default_hc_unhealthy")]
    pub unhealthy_threshold: u32,
    /// Checks in flight at once, per service.
    #[serde(default = "default_hc_in_flight")]
    pub max_in_flight: u32,
}

fn default_hc_cluster() -> String {
    "registry_lb_health".to_string()
}
fn default_hc_interval() -> Millis {
    Millis::from_secs(5)
}
fn default_hc_timeout() -> Millis {
    Millis::from_secs(1)
}
fn default_hc_healthy() -> u32 {
    2
}
fn default_hc_unhealthy() -> u32 {
    3
}
fn default_hc_in_flight() -> u32 {
    64
}

/// Where the hash key of `ring_hash` / `maglev` comes from. Without a key (header
/// or cookie absent) a request gets a random instance.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(from = "HashOnSpec")]
pub struct HashOnConfig(HashOn);

/// `hash_on` as written: `{"header": "x-user"}`, `{"cookie": …}`,
/// `{"source_ip": true}` or `{"path": <strip query>}`.
#[derive(Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
enum HashOnSpec {
    Header(HeaderName),
    Cookie(String),
    /// `{"source_ip": true}`; the value is not read.
    SourceIp(#[allow(dead_code)] bool),
    Path(bool),
}

impl From<HashOnSpec> for HashOnConfig {
    fn from(spec: HashOnSpec) -> HashOnConfig {
        HashOnConfig(match spec {
            HashOnSpec::Header(HeaderName(h)) => HashOn::Header(h),
            HashOnSpec::Cookie(c) => HashOn::Cookie(c),
            HashOnSpec::SourceIp(_) => HashOn::SourceIp,
            HashOnSpec::Path(strip_query) => HashOn::Path { strip_query },
        })
    }
}

/// An HTTP header name in any case, kept lowercase (as Envoy hands headers over).
#[derive(Deserialize)]
#[serde(try_from = "String")]
struct HeaderName(String);

impl TryFrom<String> for HeaderName {
    type Error = &'static str;
    fn try_from(name: String) -> Result<HeaderName, Self::Error> {
        let lower = name.to_ascii_lowercase();
        if valid_header_name(&lower) {
            Ok(HeaderName(lower))
        } else {
            Err("must be an HTTP header name")
        }
    }
}

impl HashOnConfig {
    pub fn to_hash_on(&self) -> HashOn {
        self.0.clone()
    }
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PeakEwmaConfig {
    /// Decay window of the moving average.
    pub decay: Millis,
    /// Latency assumed for an instance with no sample yet.
    pub default_rtt: Millis,
    /// Candidates per pick (2–8).
    pub choices: u32,
    /// How the candidates are compared: `hot_cold` or `cost`.
    pub rule: crate::balancer::peak_ewma::Rule,
}

impl Default for PeakEwmaConfig {
    fn default() -> Self {
        PeakEwmaConfig {
            decay: Millis::from_secs(10),
            default_rtt: Millis(30),
            choices: crate::balancer::peak_ewma::DEFAULT_CHOICES,
            rule: crate::balancer::peak_ewma::Rule::HotCold,
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SlowStartConfig {
    pub window: Millis,
    #[serde(default = "default_aggression")]
    pub aggression: f64,
    #[serde(default = "default_min_weight_percent")]
    pub min_weight_percent: u32,
    /// Instance metadata key holding the registration time (Unix ms or s), used when
    /// the registry gives none of its own (Eureka does); "" = none.
    #[serde(default = "default_registered_at_key")]
    pub registered_at_key: String,
}

fn default_registered_at_key() -> String {
    "registered_at".to_string()
}

fn default_aggression() -> f64 {
    1.0
}
fn default_min_weight_percent() -> u32 {
    10
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(from = "SubsetSpec")]
pub struct SubsetConfig {
    /// Selector from the configuration, e.g. `"version=v1"` (`k=v,k2=v2`).
    pub selector: Option<Pairs>,
    /// Request header carrying a selector; when present it replaces `selector`.
    pub header: Option<String>,
    fallback: Fallback,
    /// `fallback: default_subset` without `default_subset`: refused by
    /// [`PluginConfig::validate`], which names the field (an error raised while reading
    /// would be placed at the object's last field, `crate::json_path`).
    default_missing: bool,
}

/// `subset` as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SubsetSpec {
    #[serde(default, deserialize_with = "selector")]
    selector: Option<Pairs>,
    #[serde(default)]
    header: Option<String>,
    /// `no_fallback` (503), `any_endpoint`, or `default_subset` (with `default_subset`).
    #[serde(default)]
    fallback: SubsetFallback,
    #[serde(default, deserialize_with = "selector")]
    default_subset: Option<Pairs>,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum SubsetFallback {
    NoFallback,
    #[default]
    AnyEndpoint,
    DefaultSubset,
}

/// Selector text (`k=v,k2=v2`), parsed as it is read.
fn selector<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Pairs>, D::Error> {
    Option::<String>::deserialize(d)?
        .map(|text| parse_selector(&text).map_err(serde::de::Error::custom))
        .transpose()
}

impl From<SubsetSpec> for SubsetConfig {
    fn from(spec: SubsetSpec) -> SubsetConfig {
        let (fallback, default_missing) = match (spec.fallback, spec.default_subset) {
            (SubsetFallback::NoFallback, _) => (Fallback::NoFallback, false),
            (SubsetFallback::AnyEndpoint, _) => (Fallback::AnyEndpoint, false),
            (SubsetFallback::DefaultSubset, Some(pairs)) => (Fallback::DefaultSubset(pairs), false),
            (SubsetFallback::DefaultSubset, None) => (Fallback::NoFallback, true),
        };
        SubsetConfig {
            selector: spec.selector,
            header: spec.header,
            fallback,
            default_missing,
        }
    }
}

impl SubsetConfig {
    /// What a request without a selector, or with an empty subset, gets.
    pub fn fallback(&self) -> Fallback {
        self.fallback.clone()
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LoadReportConfig {
    /// Response header with the load: ORCA `endpoint-load-metrics` (TEXT form) by
    /// default, or any header holding a utilization (`0.42` or `42%`).
    #[serde(default = "default_load_header")]
    pub header: String,
    #[serde(default = "default_load_smoothing")]
    pub smoothing: Millis,
    /// Weight multiplier bounds.
    #[serde(default = "default_load_min")]
    pub min_multiplier: f64,
    #[serde(default = "default_load_max")]
    pub max_multiplier: f64,
}

fn default_load_header() -> String {
    "endpoint-load-metrics".to_string()
}
fn default_load_smoothing() -> Millis {
    Millis::from_secs(10)
}
fn default_load_min() -> f64 {
    0.1
}
fn default_load_max() -> f64 {
    10.0
}

/// Outlier detection (Envoy's names and defaults).
#[derive(Debug, Clone, Copy, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct OutlierConfig {
    /// Consecutive 5xx (including connect failures, resets and timeouts) that eject
    /// an instance; 0 disables outlier detection.
    pub consecutive_5xx: u32,
    pub base_ejection_time: Millis,
    pub max_ejection_time: Millis,
    pub max_ejection_percent: u32,
}

impl Default for OutlierConfig {
    fn default() -> Self {
        OutlierConfig {
            consecutive_5xx: 5,
            base_ejection_time: Millis::from_secs(30),
            max_ejection_time: Millis::from_secs(300),
            max_ejection_percent: 10,
        }
    }
}

impl HealthCheckConfig {
    /// Checks what the types cannot; `at` names this section in errors.
    pub fn validate(&self, at: &str) -> Result<(), ConfigError> {
        let err = |field: String, msg: &str| Err(ConfigError(format!("{field}: {msg}")));
        if self.cluster.is_empty() {
            return err(
                format!("{at}.cluster"),
                "must name an ORIGINAL_DST cluster with use_http_header",
            );
        }
        if !self.path.starts_with('/')
            || self
                .path
                .chars()
                .any(|c| c.is_whitespace() || c.is_control())
        {
            return err(
                format!("{at}.path"),
                "must start with '/' and contain no spaces",
            );
        }
        if self.interval.0 < 100 || self.timeout.0 == 0 || self.timeout > self.interval {
            return err(
                format!("{at}.interval"),
                "interval must be >= 100ms and timeout in (0, interval]",
            );
        }
        if self.healthy_threshold == 0 || self.unhealthy_threshold == 0 || self.max_in_flight == 0 {
            return err(
                at.to_string(),
                "thresholds and max_in_flight must be at least 1",
            );
        }
        if !valid_header_name(&self.header) {
            return err(
                format!("{at}.header"),
                "must be a lowercase HTTP header name",
            );
        }
        Ok(())
    }

    pub fn settings(&self, service: &str) -> crate::health_check::Settings {
        crate::health_check::Settings {
            cluster: self.cluster.clone(),
            authority: self.host.clone().unwrap_or_else(|| service.to_string()),
            path: self.path.clone(),
            header: self.header.clone(),
            interval_ms: self.interval.0,
            timeout_ms: self.timeout.0,
            healthy_threshold: self.healthy_threshold,
            unhealthy_threshold: self.unhealthy_threshold,
            max_in_flight: self.max_in_flight as usize,
        }
    }
}

impl OutlierConfig {
    pub fn policy(&self) -> crate::outlier::Policy {
        crate::outlier::Policy {
            consecutive_5xx: self.consecutive_5xx,
            base_ejection_ms: self.base_ejection_time.0,
            max_ejection_ms: self.max_ejection_time.0,
            max_ejection_percent: self.max_ejection_percent,
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum SourceConfig {
    Consul(ConsulConfig),
    Etcd(EtcdConfig),
    Static(StaticConfig),
    Nacos(NacosConfig),
    Eureka(EurekaConfig),
    Kubernetes(KubernetesConfig),
}

impl SourceConfig {
    pub fn kind(&self) -> &'static str {
        match self {
            SourceConfig::Consul(_) => "consul",
            SourceConfig::Etcd(_) => "etcd",
            SourceConfig::Static(_) => "static",
            SourceConfig::Nacos(_) => "nacos",
            SourceConfig::Eureka(_) => "eureka",
            SourceConfig::Kubernetes(_) => "kubernetes",
        }
    }
}

fn default_panic_threshold() -> u32 {
    50
}
fn default_guard_max_drop_percent() -> u32 {
    50
}
fn default_guard_confirmations() -> u32 {
    3
}
fn default_override_host_count() -> u32 {
    3
}
fn default_choice_count() -> u32 {
    2
}
fn default_tick() -> Millis {
    Millis(50)
}
fn default_handoff_header() -> String {
    "x-envoy-original-dst-host".to_string()
}
fn default_metadata_namespace() -> String {
    "registry_lb".to_string()
}
fn default_max_instance_stats() -> usize {
    256
}
/// `refresh_interval` when not configured: replaced after parsing by 5s, or 30s for a
/// service fed only by Eureka.
const REFRESH_UNSET: Millis = Millis(u64::MAX);
fn refresh_unset() -> Millis {
    REFRESH_UNSET
}
fn default_initial_fetch_timeout() -> Millis {
    Millis::from_secs(5)
}
fn default_request_timeout() -> Millis {
    Millis::from_secs(5)
}
fn default_backoff_base() -> Millis {
    Millis(500)
}
fn default_backoff_max() -> Millis {
    Millis::from_secs(30)
}
fn default_max_response_bytes() -> usize {
    32 * 1024 * 1024
}
fn default_overprovisioning() -> u32 {
    crate::zone::DEFAULT_OVERPROVISIONING_PERCENT
}

impl ServiceConfig {
    /// `peak_ewma` with the `hot_cold` rule, as the policy or its shadow: it reads
    /// the Envoy-wide in-flight counts.
    pub fn hot_cold(&self) -> bool {
        (self.policy == Policy::PeakEwma || self.shadow_policy == Some(Policy::PeakEwma))
            && self.peak_ewma.rule == crate::balancer::peak_ewma::Rule::HotCold
    }

    /// The service keeps per-instance in-flight gauges shared by all workers
    /// (`slot_<n>.rq_active`): `least_request`, `hot_cold` or bounded loads, as the
    /// policy or its shadow.
    pub fn shared_in_flight(&self) -> bool {
        self.policy == Policy::LeastRequest
            || self.shadow_policy == Some(Policy::LeastRequest)
            || self.hot_cold()
            || self.bounded_load_percent.is_some()
    }

    /// What the service's registry sources need to know of it.
    pub fn for_registry(&self) -> crate::registry::ServiceRef<'_> {
        crate::registry::ServiceRef {
            name: &self.name,
            request_timeout_ms: self.request_timeout.0,
        }
    }
}

impl PluginConfig {
    /// Parses and validates. Every error names the field it is about.
    pub fn parse(bytes: &[u8]) -> Result<PluginConfig, ConfigError> {
        let de = &mut serde_json::Deserializer::from_slice(bytes);
        let mut cfg: PluginConfig = PluginConfig::deserialize(de).map_err(|e| {
            // serde_json says where (line, column); the path there names the field.
            let end = crate::json_path::offset_of(bytes, e.line(), e.column());
            // A missing field is reported after its object's '}', any other error after
            // the value it is about (and then after the '}' or ']' closing it if that
            // value came last): see crate::json_path.
            let msg = e.to_string();
            let whole = msg.starts_with("missing field");
            let mut path = crate::json_path::path_at(bytes, end, !whole);
            // An externally tagged enum's variant is an object key: when it is refused,
            // the error is the enum's (`hash_on: unknown variant`), read just before ':'.
            let variant = msg
                .strip_prefix("unknown variant `")
                .and_then(|r| r.split('`').next());
            let before_colon = bytes
                .get(end..)
                .and_then(|r| r.iter().find(|b| !b.is_ascii_whitespace()))
                == Some(&b':');
            if let (Some(v), true) = (variant, before_colon) {
                if let Some(p) = path.strip_suffix(&format!(".{v}")) {
                    path = p.to_string();
                }
            }
            if path == "." {
                ConfigError(msg)
            } else {
                ConfigError(format!("{path}: {msg}"))
            }
        })?;
        // Eureka `fetch: auto`: `/apps` where two or more sources share a server.
        let mut per_server: HashMap<_, usize> = HashMap::new();
        for s in &cfg.services {
            for src in &s.sources {
                if let SourceConfig::Eureka(e) = src {
                    *per_server.entry(e.server_key()).or_default() += 1;
                }
            }
        }
        let shared: Vec<_> = cfg
            .services
            .iter()
            .map(|s| {
                s.sources
                    .iter()
                    .map(|src| match src {
                        SourceConfig::Eureka(e) => match e.fetch {
                            crate::registry::eureka::Fetch::All => true,
                            crate::registry::eureka::Fetch::App => false,
                            crate::registry::eureka::Fetch::Auto => {
                                per_server.get(&e.server_key()).copied().unwrap_or(0) > 1
                            }
                        },
                        _ => false,
                    })
                    .collect::<Vec<bool>>()
            })
            .collect();
        for (s, all) in cfg.services.iter_mut().zip(shared) {
            for (src, all) in s.sources.iter_mut().zip(all) {
                if let SourceConfig::Eureka(e) = src {
                    e.fetch_all = all;
                }
            }
        }
        for s in &mut cfg.services {
            if s.refresh_interval == REFRESH_UNSET {
                let eureka_only = !s.sources.is_empty()
                    && s.sources
                        .iter()
                        .all(|c| matches!(c, SourceConfig::Eureka(_)));
                s.refresh_interval = Millis::from_secs(if eureka_only { 30 } else { 5 });
            }
        }
        cfg.validate()?;
        if let Some(st) = cfg.status.as_mut() {
            st.ranges = crate::cidr::parse_list("status.allowed_sources", &st.allowed_sources)
                .map_err(ConfigError)?;
        }
        if let Some(x) = cfg.explain.as_mut() {
            x.ranges = crate::cidr::parse_list("explain.allowed_sources", &x.allowed_sources)
                .map_err(ConfigError)?;
        }
        Ok(cfg)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let err = |field: String, msg: &str| Err(ConfigError(format!("{field}: {msg}")));
        if self.services.is_empty() {
            return err("services".into(), "at least one service is required");
        }
        if !(10..=10_000).contains(&self.tick.0) {
            return err("tick".into(), "must be between 10ms and 10s");
        }
        if !valid_name(&self.metadata_namespace) {
            return err(
                "metadata_namespace".into(),
                "use letters, digits, '_', '-' and '.' only",
            );
        }
        if !valid_header_name(&self.handoff_header) {
            return err(
                "handoff_header".into(),
                "must be a lowercase HTTP header name",
            );
        }
        if let Some(r) = &self.register {
            r.validate()?;
        }
        if let Some(st) = &self.status {
            if !st.path.starts_with('/') || !printable(&st.path) || st.path.contains('?') {
                return err(
                    "status.path".into(),
                    "must be a printable path starting with '/' and without '?'",
                );
            }
        }
        if let Some(x) = &self.explain {
            for (field, h) in [("header", &x.header), ("request_header", &x.request_header)] {
                if !valid_header_name(h) {
                    return err(
                        format!("explain.{field}"),
                        "must be a lowercase HTTP header name",
                    );
                }
            }
        }
        let mut seen = HashSet::new();
        // Cluster (as written) and host (lowercase) → the service that claims it.
        let mut clusters: HashMap<&str, &str> = HashMap::new();
        let mut hosts: HashMap<String, &str> = HashMap::new();
        for (i, s) in self.services.iter().enumerate() {
            let at = format!("services[{i}]");
            if !valid_name(&s.name) || s.name.contains('.') {
                return err(
                    format!("{at}.name"),
                    "must be 1..64 characters of letters, digits, '_' and '-'",
                );
            }
            if !seen.insert(s.name.as_str()) {
                return err(
                    format!("{at}.name"),
                    &format!("service `{}` is defined twice", s.name),
                );
            }
            if s.sources.is_empty() {
                return err(format!("{at}.sources"), "at least one source is required");
            }
            for (k, c) in s.upstream_clusters.iter().enumerate() {
                let at = format!("{at}.upstream_clusters[{k}]");
                if c.is_empty() || !printable(c) {
                    return err(at, "a cluster name is non-empty and printable");
                }
                if let Some(other) = clusters.insert(c, &s.name) {
                    return err(at, &claimed_twice("cluster", c, other, &s.name));
                }
            }
            for (k, h) in s.hosts.iter().enumerate() {
                let at = format!("{at}.hosts[{k}]");
                if let Err(msg) = check_host(h) {
                    return err(at, msg);
                }
                if let Some(other) = hosts.insert(h.to_ascii_lowercase(), &s.name) {
                    return err(at, &claimed_twice("host", h, other, &s.name));
                }
            }
            if s.panic_threshold > 100 {
                return err(format!("{at}.panic_threshold"), "is a percentage (0-100)");
            }
            if s.guard_max_drop_percent > 100
                || s.guard_confirmations == 0
                || s.guard_confirmations > 100
            {
                return err(
                    format!("{at}.guard_max_drop_percent"),
                    "must be 0-100, with guard_confirmations 1-100",
                );
            }
            if !(1..=8).contains(&s.override_host_count) {
                return err(
                    format!("{at}.override_host_count"),
                    "must be between 1 and 8",
                );
            }
            if s.shadow_policy == Some(s.policy) {
                return err(
                    format!("{at}.shadow_policy"),
                    "is the same as policy: a shadow compares another policy",
                );
            }
            let any_hash = s.policy.is_hash() || s.shadow_policy.is_some_and(Policy::is_hash);
            if !any_hash && s.hash_on.is_some() {
                return err(
                    format!("{at}.hash_on"),
                    "is only used by ring_hash and maglev",
                );
            }
            if let Some(c) = s.bounded_load_percent {
                if !(100..=10_000).contains(&c) {
                    return err(
                        format!("{at}.bounded_load_percent"),
                        "must be between 100 and 10000",
                    );
                }
                if !s.policy.is_hash() {
                    return err(
                        format!("{at}.bounded_load_percent"),
                        "is only used by ring_hash and maglev",
                    );
                }
            }
            if let Some(groups) = &s.zone_priorities {
                let mut seen_zone = HashSet::new();
                if groups.is_empty() {
                    return err(
                        format!("{at}.zone_priorities"),
                        "list at least one group of zones",
                    );
                }
                for (g, zones) in groups.iter().enumerate() {
                    if zones.is_empty() {
                        return err(
                            format!("{at}.zone_priorities[{g}]"),
                            "a group lists at least one zone",
                        );
                    }
                    for z in zones {
                        if z.is_empty() || !printable(z) || !seen_zone.insert(z.as_str()) {
                            return err(
                                format!("{at}.zone_priorities[{g}]"),
                                "zones are non-empty and listed once",
                            );
                        }
                    }
                }
                if s.policy.is_hash() {
                    return err(
                        format!("{at}.zone_priorities"),
                        "ring_hash and maglev ignore zones (a key keeps its instance)",
                    );
                }
            }
            if !(100..=1_000).contains(&s.overprovisioning_percent) {
                return err(
                    format!("{at}.overprovisioning_percent"),
                    "must be between 100 and 1000",
                );
            }
            if s.peak_ewma.decay.0 == 0 || s.peak_ewma.default_rtt.0 == 0 {
                return err(
                    format!("{at}.peak_ewma"),
                    "decay and default_rtt must be greater than zero",
                );
            }
            if !(2..=crate::balancer::peak_ewma::MAX_CHOICES as u32).contains(&s.peak_ewma.choices)
            {
                return err(format!("{at}.peak_ewma.choices"), "must be between 2 and 8");
            }
            if let Some(ss) = &s.slow_start {
                if ss.window.0 == 0
                    || !(ss.aggression.is_finite() && ss.aggression > 0.0)
                    || ss.min_weight_percent > 100
                {
                    return err(
                        format!("{at}.slow_start"),
                        "window > 0, aggression > 0, min_weight_percent 0-100",
                    );
                }
                if !printable(&ss.registered_at_key) {
                    return err(
                        format!("{at}.slow_start.registered_at_key"),
                        "must be printable",
                    );
                }
            }
            if let Some(sub) = &s.subset {
                if sub.default_missing {
                    return err(
                        format!("{at}.subset"),
                        "default_subset is required with fallback default_subset",
                    );
                }
                if let Some(h) = &sub.header {
                    if !valid_header_name(h) {
                        return err(
                            format!("{at}.subset.header"),
                            "must be a lowercase HTTP header name",
                        );
                    }
                }
            }
            if let Some(lr) = &s.load_report {
                let bounds_ok = lr.min_multiplier > 0.0
                    && lr.max_multiplier >= lr.min_multiplier
                    && lr.max_multiplier <= 1000.0;
                if !(valid_header_name(&lr.header) && bounds_ok) {
                    return err(
                        format!("{at}.load_report"),
                        "needs a lowercase header and 0 < min_multiplier <= max_multiplier <= 1000",
                    );
                }
            }
            if let Some(hc) = &s.health_check {
                hc.validate(&format!("{at}.health_check"))?;
            }
            let od = &s.outlier_detection;
            if od.max_ejection_percent > 100 {
                return err(
                    format!("{at}.outlier_detection.max_ejection_percent"),
                    "is a percentage (0-100)",
                );
            }
            if od.consecutive_5xx > 0
                && (od.base_ejection_time.0 == 0 || od.max_ejection_time < od.base_ejection_time)
            {
                return err(
                    format!("{at}.outlier_detection.base_ejection_time"),
                    "must be > 0 and not above max_ejection_time",
                );
            }
            if !(2..=16).contains(&s.choice_count) {
                return err(format!("{at}.choice_count"), "must be between 2 and 16");
            }
            if s.refresh_interval.0 < 100 || s.refresh_interval.0 > 3_600_000 {
                return err(
                    format!("{at}.refresh_interval"),
                    "must be between 100ms and 1h",
                );
            }
            if s.start_jitter.0 > 60_000 {
                return err(format!("{at}.start_jitter"), "must be at most 60s");
            }
            if s.initial_fetch_timeout.0 > 60_000 {
                return err(format!("{at}.initial_fetch_timeout"), "must be at most 60s");
            }
            if s.request_timeout.0 == 0 {
                return err(format!("{at}.request_timeout"), "must be greater than zero");
            }
            if s.backoff_base.0 == 0 || s.backoff_max < s.backoff_base {
                return err(
                    format!("{at}.backoff_base"),
                    "must be > 0 and not above backoff_max",
                );
            }
            if s.max_response_bytes < 1024 {
                return err(format!("{at}.max_response_bytes"), "must be at least 1024");
            }
            for (j, src) in s.sources.iter().enumerate() {
                let at = format!("{at}.sources[{j}].{}", src.kind());
                match src {
                    SourceConfig::Consul(c) => c.validate(&at)?,
                    SourceConfig::Etcd(e) => e.validate(&at)?,
                    SourceConfig::Static(st) => st.validate(&at)?,
                    SourceConfig::Nacos(n) => n.validate(&at)?,
                    SourceConfig::Eureka(e) => e.validate(&at)?,
                    SourceConfig::Kubernetes(k) => k.validate(&at, &s.name)?,
                }
            }
        }
        Ok(())
    }

    pub fn service(&self, name: &str) -> Option<(usize, &ServiceConfig)> {
        self.services
            .iter()
            .enumerate()
            .find(|(_, s)| s.name == name)
    }
}

/// The error for a cluster or host that two services (or one, twice) claim.
fn claimed_twice(what: &str, value: &str, first: &str, second: &str) -> String {
    if first == second {
        format!("{what} `{value}` is listed twice in service `{first}`")
    } else {
        format!("{what} `{value}` is claimed by services `{first}` and `{second}`")
    }
}

/// A `hosts` entry: a host name or IP as a request's authority carries it, without
/// its port (the port of a request's authority is not compared).
fn check_host(h: &str) -> Result<(), &'static str> {
    if h.is_empty() || !printable(h) || h.chars().any(char::is_whitespace) {
        return Err("a host is non-empty and printable, without spaces");
    }
    if h.contains('*') {
        return Err("wildcards are not supported: list each host");
    }
    if h.contains('/') || h.contains('@') {
        return Err("a host is a name or an IP, not a URL");
    }
    if authority_host(h.as_bytes()).len() != h.len() {
        return Err("write the host without a port: the port of a request's authority is ignored");
    }
    Ok(())
}

/// The host part of an authority (`name`, `name:port`, `[v6]`, `[v6]:port`):
/// a trailing `:digits` is dropped. Anything else is returned whole.
pub fn authority_host(authority: &[u8]) -> &[u8] {
    let Some(colon) = authority.iter().rposition(|&b| b == b':') else {
        return authority;
    };
    let (host, port) = (&authority[..colon], &authority[colon + 1..]);
    if !port.iter().all(u8::is_ascii_digit) {
        return authority;
    }
    let bracketed = host.first() == Some(&b'[') && host.last() == Some(&b']');
    if bracketed || !host.contains(&b':') {
        host
    } else {
        authority // an IPv6 address without brackets: no port to drop
    }
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
}

fn valid_header_name(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;
    use wasm_bindgen_test::wasm_bindgen_test;

    fn parse(s: &str) -> Result<PluginConfig, ConfigError> {
        PluginConfig::parse(s.as_bytes())
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn minimal_static_config_gets_defaults() {
        let c = parse(r#"{"services":[{"name":"web","sources":[{"static":{"instances":[{"address":"127.0.0.1","port":8080}]}}]}]}"#).unwrap();
        assert_eq!(c.handoff, Handoff::FilterState);
        assert_eq!(c.tick, Millis(50));
        assert_eq!(c.services[0].policy, Policy::RoundRobin);
        assert_eq!(c.services[0].refresh_interval, Millis(5000));
        match &c.services[0].sources[0] {
            SourceConfig::Static(s) => assert_eq!(s.instances()[0].weight, 1),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn consul_and_etcd_sources_parse() {
        let c = parse(r#"{"services":[{"name":"web","policy":"least_request","refresh_interval":"2s",
            "sources":[{"consul":{"cluster":"consul","token":"t","datacenter":"dc1","tag":"v1","wait":"10s"}},
                       {"etcd":{"cluster":"etcd","prefix":"/services/web/","username":"u","password":"p"}}]}]}"#).unwrap();
        let s = &c.services[0];
        assert_eq!(s.policy, Policy::LeastRequest);
        match &s.sources[0] {
            SourceConfig::Consul(k) => {
                assert!(k.blocking);
                assert_eq!(k.wait, Millis(10_000));
                assert_eq!(k.authority(), "consul");
            }
            other => panic!("unexpected {other:?}"),
        }
        assert_eq!(s.sources[1].kind(), "etcd");
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn zone_priorities_are_checked() {
        let svc = |extra: &str| {
            format!(
                r#"{{"services":[{{"name":"web",{extra}"sources":[{{"static":{{"instances":[{{"address":"10.0.0.1","port":80}}]}}}}]}}]}}"#
            )
        };
        let c = parse(&svc(
            r#""local_zone":"a","zone_priorities":[["a","b"],["c"]],"#,
        ))
        .unwrap();
        assert_eq!(
            c.services[0].zone_priorities.as_ref().map(Vec::len),
            Some(2)
        );
        assert_eq!(c.services[0].overprovisioning_percent, 140);
        for (extra, want) in [
            (r#""zone_priorities":[],"#, "services[0].zone_priorities: "),
            (
                r#""zone_priorities":[["a"],[]],"#,
                "services[0].zone_priorities[1]: ",
            ),
            (
                r#""zone_priorities":[["a"],["b","a"]],"#,
                "services[0].zone_priorities[1]: zones are non-empty and listed once",
            ),
            (
                r#""policy":"maglev","zone_priorities":[["a"]],"#,
                "services[0].zone_priorities: ring_hash and maglev",
            ),
            (
                r#""overprovisioning_percent":99,"#,
                "services[0].overprovisioning_percent: ",
            ),
        ] {
            let e = parse(&svc(extra)).unwrap_err();
            assert!(e.0.starts_with(want), "{extra}: {}", e.0);
        }
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn errors_name_the_field() {
        let e = parse(
            r#"{"services":[{"name":"web","sources":[{"consul":{"cluster":"c","wait":"soon"}}]}]}"#,
        )
        .unwrap_err();
        assert!(
            e.0.starts_with("services[0].sources[0].consul.wait:"),
            "{}",
            e.0
        );
        let e = parse(r#"{"services":[{"name":"web","polcy":"x","sources":[]}]}"#).unwrap_err();
        assert!(e.0.contains("polcy"), "{}", e.0);
        let e =
            parse(r#"{"services":[{"name":"web","policy":"fastest","sources":[]}]}"#).unwrap_err();
        assert!(e.0.starts_with("services[0].policy:"), "{}", e.0);
        let e = parse(r#"{"services":[{"name":"web","sources":[{"static":{"instances":[{"address":"web.local","port":80}]}}]}]}"#).unwrap_err();
        assert_eq!(
            e.0,
            "services[0].sources[0].static.instances[0]: address `web.local` is not an IP literal at line 1 column 96"
        );
        let e = parse(r#"{"services":[]}"#).unwrap_err();
        assert_eq!(e.0, "services: at least one service is required");
        let e = parse("not json").unwrap_err();
        assert!(!e.0.is_empty());
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn semantic_checks() {
        let base = |svc: &str| format!(r#"{{"services":[{svc}]}}"#);
        let e = parse(&base(r#"{"name":"we b","sources":[{"static":{"instances":[{"address":"1.2.3.4","port":1}]}}]}"#)).unwrap_err();
        assert!(e.0.starts_with("services[0].name"), "{}", e.0);
        let e = parse(&base(r#"{"name":"web","sources":[]}"#)).unwrap_err();
        assert_eq!(e.0, "services[0].sources: at least one source is required");
        let e = parse(&base(
            r#"{"name":"web","sources":[{"etcd":{"cluster":"e","username":"u"}}]}"#,
        ))
        .unwrap_err();
        assert!(e.0.contains("username and password"), "{}", e.0);
        let e = parse(&base(r#"{"name":"web","sources":[{"static":{"instances":[{"address":"1.2.3.4","port":0}]}}]}"#)).unwrap_err();
        assert!(e.0.contains("port 0"), "{}", e.0);
        let twice = r#"{"name":"web","sources":[{"static":{"instances":[{"address":"1.2.3.4","port":1}]}}]}"#;
        let e = parse(&format!(r#"{{"services":[{twice},{twice}]}}"#)).unwrap_err();
        assert!(e.0.contains("defined twice"), "{}", e.0);
        let e = parse(&format!(r#"{{"tick":"1ms","services":[{twice}]}}"#)).unwrap_err();
        assert!(e.0.starts_with("tick:"), "{}", e.0);
        let e = parse(&format!(
            r#"{{"handoff_header":"X-Bad Header","services":[{twice}]}}"#
        ))
        .unwrap_err();
        assert!(e.0.starts_with("handoff_header:"), "{}", e.0);
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn status_explain_and_shadow_are_read_and_checked() {
        let top = |t: &str| {
            parse(&format!(
                r#"{{{t}"services":[{{"name":"web","sources":[{{"static":{{"instances":[{{"address":"10.0.0.1","port":80}}]}}}}]}}]}}"#
            ))
        };
        let c = top(r#""status":{"path":"/s"},"explain":{},"access_log_instance":true,"#).unwrap();
        let st = c.status.unwrap();
        assert_eq!(st.allowed_sources, ["127.0.0.0/8", "::1/128"]);
        assert_eq!(st.ranges.len(), 2);
        assert!(!st.trust_forwarded_for);
        let x = c.explain.unwrap();
        assert_eq!(
            (x.header.as_str(), x.request_header.as_str()),
            ("x-registry-lb-decision", "x-registry-lb-explain")
        );
        assert!(c.access_log_instance);
        assert!(top("").unwrap().status.is_none());
        for (t, want) in [
            (r#""status":{"path":"/s","allowed_sources":["10.0.0.1/8"]},"#,
             "status.allowed_sources[0]: `10.0.0.1/8` has bits set past its prefix length (did you mean 10.0.0.0/8?)"),
            (r#""explain":{"allowed_sources":["::1/128","nope"]},"#,
             "explain.allowed_sources[1]: `nope` is not an IPv4 or IPv6 address"),
            (r#""status":{"path":"s"},"#, "status.path: must be a printable path"),
            (r#""status":{"path":"/s?x"},"#, "status.path: must be a printable path"),
            (r#""status":{},"#, "status: missing field `path`"),
            (r#""explain":{"header":"X Bad"},"#, "explain.header: must be a lowercase HTTP header name"),
            (r#""explain":{"colour":1},"#, "explain.colour: unknown field `colour`"),
        ] {
            let e = top(t).unwrap_err();
            assert!(e.0.starts_with(want), "{t}: {}", e.0);
        }
        let c =
            web(r#""policy":"round_robin","shadow_policy":"maglev","hash_on":{"header":"x-u"},"#)
                .unwrap();
        assert_eq!(c.services[0].shadow_policy, Some(Policy::Maglev));
        let e = web(r#""policy":"random","shadow_policy":"random","#).unwrap_err();
        assert!(
            e.0.starts_with("services[0].shadow_policy: is the same as policy"),
            "{}",
            e.0
        );
        let e = web(r#""shadow_policy":"fastest","#).unwrap_err();
        assert!(
            e.0.starts_with("services[0].shadow_policy: unknown variant `fastest`"),
            "{}",
            e.0
        );
    }

    fn web(extra: &str) -> Result<PluginConfig, ConfigError> {
        parse(&format!(
            r#"{{"services":[{{"name":"web",{extra}"sources":[{{"static":{{"instances":[{{"address":"10.0.0.1","port":80}}]}}}}]}}]}}"#
        ))
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn peak_ewma_choices_and_rule_have_defaults_and_are_checked() {
        use crate::balancer::peak_ewma::Rule;
        let c = web(r#""policy":"peak_ewma","#).unwrap();
        assert_eq!(c.services[0].peak_ewma.choices, 3);
        assert_eq!(c.services[0].peak_ewma.rule, Rule::HotCold);
        let c = web(r#""policy":"peak_ewma","peak_ewma":{"choices":2,"rule":"cost"},"#).unwrap();
        assert_eq!(c.services[0].peak_ewma.choices, 2);
        assert_eq!(c.services[0].peak_ewma.rule, Rule::Cost);
        assert_eq!(c.services[0].peak_ewma.decay, Millis::from_secs(10));
        for bad in [r#"{"choices":1}"#, r#"{"choices":9}"#] {
            let e = web(&format!(r#""peak_ewma":{bad},"#)).unwrap_err();
            assert!(e.0.contains("peak_ewma.choices"), "{}", e.0);
            assert!(e.0.contains("between 2 and 8"), "{}", e.0);
        }
        let e = web(r#""peak_ewma":{"rule":"fastest"},"#).unwrap_err();
        assert!(e.0.contains("peak_ewma.rule"), "{}", e.0);
    }

    fn pairs(p: &[(&str, &str)]) -> crate::subset::Pairs {
        p.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn subset_selectors_are_parsed_once_when_read() {
        let c =
            web(r#""subset":{"selector":"version=v1, stage=prod","header":"x-subset"},"#).unwrap();
        let sub = c.services[0].subset.as_ref().unwrap();
        assert_eq!(
            sub.selector,
            Some(pairs(&[("stage", "prod"), ("version", "v1")]))
        );
        assert_eq!(sub.header.as_deref(), Some("x-subset"));
        assert_eq!(sub.fallback(), crate::subset::Fallback::AnyEndpoint);
        let c = web(r#""subset":{"fallback":"default_subset","default_subset":"version=v1"},"#)
            .unwrap();
        let sub = c.services[0].subset.as_ref().unwrap();
        assert_eq!(sub.selector, None);
        assert_eq!(
            sub.fallback(),
            crate::subset::Fallback::DefaultSubset(pairs(&[("version", "v1")]))
        );
        let c =
            web(r#""subset":{"fallback":"no_fallback","default_subset":"version=v1"},"#).unwrap();
        assert_eq!(
            c.services[0].subset.as_ref().unwrap().fallback(),
            crate::subset::Fallback::NoFallback
        );
        for (extra, want) in [
            (
                r#""subset":{"selector":"=v1"},"#,
                "services[0].subset.selector: selector has an empty key",
            ),
            (
                r#""subset":{"default_subset":"a=1,a=2"},"#,
                "services[0].subset.default_subset: selector names key `a` twice",
            ),
            (
                r#""subset":{"fallback":"default_subset"},"#,
                "services[0].subset: default_subset is required with fallback default_subset",
            ),
            (
                r#""subset":{"header":"X-Subset"},"#,
                "services[0].subset.header: must be a lowercase HTTP header name",
            ),
            (
                r#""subset":{"selectr":"a=1"},"#,
                "services[0].subset.selectr: unknown field `selectr`",
            ),
        ] {
            let e = web(extra).unwrap_err();
            assert!(e.0.starts_with(want), "{extra}: {}", e.0);
        }
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn hash_on_is_read_into_its_key_source() {
        for (hash_on, want) in [
            (r#"{"header":"X-User"}"#, HashOn::Header("x-user".into())),
            (r#"{"cookie":"Session"}"#, HashOn::Cookie("Session".into())),
            (r#"{"source_ip":true}"#, HashOn::SourceIp),
            (r#"{"path":true}"#, HashOn::Path { strip_query: true }),
        ] {
            let c = web(&format!(r#""policy":"maglev","hash_on":{hash_on},"#)).unwrap();
            let on = c.services[0].hash_on.as_ref().map(HashOnConfig::to_hash_on);
            assert_eq!(on, Some(want), "{hash_on}");
        }
        for (extra, want) in [
            (
                r#""policy":"ring_hash","hash_on":{"header":"x user"},"#,
                "services[0].hash_on.header: must be an HTTP header name",
            ),
            (
                r#""policy":"ring_hash","hash_on":{"query":"u"},"#,
                "services[0].hash_on: unknown variant `query`",
            ),
            (
                r#""hash_on":{"header":"x-user"},"#,
                "services[0].hash_on: is only used by ring_hash and maglev",
            ),
        ] {
            let e = web(extra).unwrap_err();
            assert!(e.0.starts_with(want), "{extra}: {}", e.0);
        }
    }
    #[wasm_bindgen_test(unsupported = test)]
    fn upstream_clusters_and_hosts_parse_and_are_checked() {
        let c = web(r#""upstream_clusters":["outbound|80||web.default.svc.cluster.local"],"hosts":["Legacy.service.consul","web","[fd00::1]"],"#).unwrap();
        assert_eq!(
            c.services[0].upstream_clusters,
            ["outbound|80||web.default.svc.cluster.local"]
        );
        assert_eq!(c.services[0].hosts.len(), 3);
        let c = web("").unwrap();
        assert!(c.services[0].upstream_clusters.is_empty() && c.services[0].hosts.is_empty());
        for (extra, want) in [
            (
                r#""upstream_clusters":[""],"#,
                "services[0].upstream_clusters[0]: a cluster name is non-empty and printable",
            ),
            (
                r#""upstream_clusters":["a","b\n"],"#,
                "services[0].upstream_clusters[1]: a cluster name is non-empty and printable",
            ),
            (
                r#""upstream_clusters":["a","a"],"#,
                "services[0].upstream_clusters[1]: cluster `a` is listed twice in service `web`",
            ),
            (
                r#""hosts":[""],"#,
                "services[0].hosts[0]: a host is non-empty and printable, without spaces",
            ),
            (
                r#""hosts":["a b"],"#,
                "services[0].hosts[0]: a host is non-empty and printable, without spaces",
            ),
            (
                r#""hosts":["legacy.service.consul:8080"],"#,
                "services[0].hosts[0]: write the host without a port",
            ),
            (
                r#""hosts":["[fd00::1]:80"],"#,
                "services[0].hosts[0]: write the host without a port",
            ),
            (
                r#""hosts":["*.example.com"],"#,
                "services[0].hosts[0]: wildcards are not supported",
            ),
            (
                r#""hosts":["http://web/"],"#,
                "services[0].hosts[0]: a host is a name or an IP, not a URL",
            ),
            (
                r#""hosts":["web","WEB"],"#,
                "services[0].hosts[1]: host `WEB` is listed twice in service `web`",
            ),
            (
                r#""hosts":"web","#,
                "services[0].hosts: invalid type: string",
            ),
        ] {
            let e = web(extra).unwrap_err();
            assert!(e.0.starts_with(want), "{extra}: {}", e.0);
        }
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn a_cluster_or_host_claimed_by_two_services_names_both() {
        let two = |a: &str, b: &str| {
            let svc = |name: &str, extra: &str| {
                format!(
                    r#"{{"name":"{name}",{extra}"sources":[{{"static":{{"instances":[{{"address":"10.0.0.1","port":80}}]}}}}]}}"#
                )
            };
            parse(&format!(
                r#"{{"services":[{},{}]}}"#,
                svc("web", a),
                svc("api", b)
            ))
        };
        let e = two(
            r#""upstream_clusters":["x","outbound|80||web"],"#,
            r#""upstream_clusters":["outbound|80||web"],"#,
        )
        .unwrap_err();
        assert_eq!(
            e.0,
            "services[1].upstream_clusters[0]: cluster `outbound|80||web` is claimed by services `web` and `api`"
        );
        let e = two(
            r#""hosts":["Legacy.Consul"],"#,
            r#""hosts":["legacy.consul"],"#,
        )
        .unwrap_err();
        assert_eq!(
            e.0,
            "services[1].hosts[0]: host `legacy.consul` is claimed by services `web` and `api`"
        );
        // The same name as a cluster of one and a host of the other is no conflict.
        two(r#""upstream_clusters":["web"],"#, r#""hosts":["web"],"#).unwrap();
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn an_authority_loses_its_port_only() {
        for (authority, host) in [
            ("web", "web"),
            ("web:8080", "web"),
            ("web:", "web"),
            ("Web.Example:80", "Web.Example"),
            ("10.0.0.1:80", "10.0.0.1"),
            ("[fd00::1]:443", "[fd00::1]"),
            ("[fd00::1]", "[fd00::1]"),
            ("fd00::1", "fd00::1"),
            ("web:http", "web:http"),
            ("a:1:2", "a:1:2"),
            ("", ""),
        ] {
            assert_eq!(
                authority_host(authority.as_bytes()),
                host.as_bytes(),
                "{authority}"
            );
        }
    }
}
