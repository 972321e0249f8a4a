//! `registrar`: the other half of discovery — the local instance registered in the
//! registry, kept alive while the local application answers its health check, marked
//! down when it stops answering, and removed (best effort) when Envoy stops.
//!
//! A state machine per target with no host calls: [`Registrar::due`] says which HTTP
//! calls to make now (the application's health check and each target's next step),
//! [`Registrar::on_app_result`] and [`Registrar::on_answer`] take their answers, and
//! [`Registrar::leave`] gives the deregistration calls. It runs in the one root per
//! Envoy that holds the poller lease (`plugin::leader`).
//!
//! References: Eureka REST operations (register, renew, status override, cancel);
//! Consul agent HTTP API ("Register Service" with a TTL `Check`, "TTL
//! Check Pass/Fail" — current agents answer 404 `Unknown check ID`, older ones 500 `Unknown check` —
//! "Deregister Service"); etcd 3.4 gRPC gateway (`/v3/lease/grant`, `/v3/kv/put`
//! with `lease`, `/v3/lease/keepalive` — a lease etcd no longer knows answers 200
//! with no `TTL`, a put with it 404 `requested lease not found` — and
//! `/v3/lease/revoke`, which deletes the key with the lease). The etcd value is the
//! schema `registry::etcd` reads.
//!
//! Marking down: Consul `check/fail` (then `fail` again every heartbeat, which also
//! finds out when the agent forgot the check); etcd rewrites the value with
//! `"state":"unhealthy"` under the same lease and keeps the lease alive, so the
//! instance stays listed as down (as Consul's failing check) instead of vanishing
//! when the TTL runs out. A registry that forgot the instance gets it registered
//! again at once. The first passing health check registers the instance; nothing
//! is registered before it.
//!
//! Eureka (REST API, as Spring Cloud's and Netflix's clients use it): `POST
//! /apps/<APP>` with `leaseInfo.durationInSecs` = `ttl`, renewals `PUT
//! /apps/<APP>/<id>` (404: evicted → register again), `PUT .../status?value=DOWN|UP`
//! to mark down and up (renewals go on while down), `DELETE` to leave.
//!
//! Nacos (Open API v1, or v2 with `api: v2`; the server's `InstanceController`
//! and `InstanceControllerV2`): an ephemeral instance, `POST .../ns/instance`
//! with the heartbeat timings in its metadata (`preserved.heart.beat.interval`,
//! `preserved.heart.beat.timeout` = `ttl`, `preserved.ip.delete.timeout`), then
//! light beats `PUT .../ns/instance/beat` (no `beat` body, service name
//! `group@@service`), answered `{"code":10200}` — or `20404` when the server does
//! not know the instance, and it is registered again at once. Marking down and up
//! is an update, `PUT .../ns/instance` with `enabled=false|true` (readers see a
//! disabled instance as draining); every registration is followed by that update,
//! because Nacos 2 keeps metadata set by an update over a later registration's.
//! `DELETE .../ns/instance` to leave. With credentials, the login and token
//! handling of `registry::nacos` (`accessToken` in the query; a refused token
//! that was accepted before → log in again at once).
//!
//! Consul credentials are the reader's: a fixed ACL `token`, or an auth-method
//! login (`POST /v1/acl/login`; a login token refused after it was accepted → log
//! in again at once).
//!
//! Left out: Kubernetes (the kubelet owns endpoints: there is no
//! self-registration), several instances per Envoy.

use crate::config::HealthCheckConfig;
use crate::duration::Millis;
use crate::http_call::{HttpRequest, HttpResponse};
use crate::registry::excerpt;
use crate::validate::{field_err, printable, ConfigError};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use serde::Deserialize;
use std::collections::BTreeMap;

/// `"register"` of the plugin configuration.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RegisterConfig {
    /// Service name in the registry.
    pub service: String,
    /// Instance id; defaults to `<service>-<address>-<port>` (`.`/`:` as `-`).
    #[serde(default)]
    pub id: Option<String>,
    /// IP literal registered for the instance (the only address ever registered).
    pub address: String,
    pub port: u16,
    #[serde(default = "default_weight")]
    pub weight: u32,
    #[serde(default)]
    pub zone: Option<String>,
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    /// Time the registry keeps the instance without a heartbeat (whole seconds).
    #[serde(default = "default_ttl")]
    pub ttl: Millis,
    /// Time between heartbeats; defaults to a third of `ttl`.
    #[serde(default)]
    pub heartbeat_interval: Option<Millis>,
    /// Timeout of one registry call.
    #[serde(default = "default_request_timeout")]
    pub request_timeout: Millis,
    /// The local application's health check; by default through the
    /// `registry_lb_health` cluster to `address:port`.
    pub health_check: HealthCheckConfig,
    pub targets: Vec<TargetConfig>,
}

fn default_weight() -> u32 {
    1
}
fn default_ttl() -> Millis {
    Millis::from_secs(10)
}
fn default_request_timeout() -> Millis {
    Millis::from_secs(2)
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum TargetConfig {
    Consul(ConsulTarget),
    Etcd(EtcdTarget),
    Eureka(EurekaTarget),
    Nacos(NacosTarget),
    /// Parsed only to be refused with a clear error.
    Kubernetes(serde_json::Value),
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ConsulTarget {
    /// Envoy cluster that reaches the local Consul agent.
    pub cluster: String,
    #[serde(default)]
    pub authority: Option<String>,
    /// ACL token (`X-Consul-Token`) with `service:write` on the service.
    #[serde(default)]
    pub token: Option<String>,
    /// Log in through a Consul ACL auth method (`POST /v1/acl/login`) with this
    /// bearer token instead of a fixed `token`, as the reader does.
    #[serde(default)]
    pub auth_method: Option<String>,
    #[serde(default)]
    pub bearer_token: Option<String>,
    /// Consul removes the service after its check has been critical this long.
    #[serde(default = "default_deregister_after")]
    pub deregister_critical_service_after: Millis,
}

fn default_deregister_after() -> Millis {
    Millis::from_secs(60)
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EtcdTarget {
    /// Envoy cluster that reaches etcd's JSON gateway.
    pub cluster: String,
    #[serde(default)]
    pub authority: Option<String>,
    /// Key prefix; the key is `<prefix><id>`. Defaults to `/services/<service>/`.
    #[serde(default)]
    pub prefix: Option<String>,
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub password: Option<String>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EurekaTarget {
    /// Envoy cluster that reaches the Eureka server.
    pub cluster: String,
    #[serde(default)]
    pub authority: Option<String>,
    /// Application name; defaults to `service`. Sent with ASCII letters uppercased.
    #[serde(default)]
    pub app: Option<String>,
    /// Path of the REST API (`/eureka` for Spring Cloud, `/eureka/v2` for Netflix's war).
    #[serde(default = "default_eureka_prefix")]
    pub path_prefix: String,
    /// HTTP basic auth.
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub password: Option<String>,
}

fn default_eureka_prefix() -> String {
    "/eureka".to_string()
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct NacosTarget {
    /// Envoy cluster that reaches the Nacos server's HTTP API (port 8848).
    pub cluster: String,
    #[serde(default)]
    pub authority: Option<String>,
    #[serde(default = "default_nacos_group")]
    pub group: String,
    /// Namespace id (Nacos' default is `public`).
    #[serde(default)]
    pub namespace: Option<String>,
    /// The Nacos cluster of the instance (what readers see as its zone); defaults
    /// to `zone`, else `DEFAULT`.
    #[serde(default)]
    pub cluster_name: Option<String>,
    /// `v1` (`/nacos/v1/ns/instance`, Nacos 1.2+) or `v2` (`/nacos/v2/ns/instance`, 2.2+).
    #[serde(default)]
    pub api: crate::registry::nacos::NacosApi,
    /// With `password`: log in at `/nacos/v1/auth/login` and send `accessToken`.
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub password: Option<String>,
    /// Nacos deletes the instance after no heartbeat for this long (its
    /// `preserved.ip.delete.timeout`; Nacos' default 30 s). At least `ttl`.
    #[serde(default = "default_nacos_delete_after")]
    pub delete_after: Millis,
}

fn default_nacos_group() -> String {
    "DEFAULT_GROUP".to_string()
}
fn default_nacos_delete_after() -> Millis {
    Millis::from_secs(30)
}

impl RegisterConfig {
    /// The instance id (configured or derived).
    pub fn instance_id(&self) -> String {
        self.id.clone().unwrap_or_else(|| {
            format!("{}-{}-{}", self.service, self.address, self.port)
                .chars()
                .map(|c| if c == '.' || c == ':' { '-' } else { c })
                .collect()
        })
    }

    pub fn heartbeat_ms(&self) -> u64 {
        self.heartbeat_interval
            .map_or(self.ttl.0 / 3, |h| h.0)
            .max(1)
    }

    /// Checks what the types cannot; errors name the field (`register.<field>`).
    pub fn validate(&self) -> Result<(), ConfigError> {
        let at = "register";
        let id_ok = |s: &str| {
            !s.is_empty()
                && s.len() <= 128
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        };
        if !id_ok(&self.service) {
            return field_err(
                at,
                "service",
                "must be 1..128 letters, digits, '-', '_', '.'",
            );
        }
        if self.id.is_some() && !id_ok(&self.instance_id()) {
            return field_err(at, "id", "must be 1..128 letters, digits, '-', '_', '.'");
        }
        if self.address.parse::<std::net::IpAddr>().is_err() {
            return field_err(
                at,
                "address",
                "must be an IP literal (it is what readers route to)",
            );
        }
        if self.port == 0 {
            return field_err(at, "port", "must be 1..65535");
        }
        if !(1..=crate::instance::MAX_WEIGHT).contains(&self.weight) {
            return field_err(at, "weight", "must be 1..100000");
        }
        if self
            .zone
            .as_deref()
            .is_some_and(|z| z.is_empty() || !printable(z))
        {
            return field_err(at, "zone", "must be non-empty printable text");
        }
        for (k, v) in &self.metadata {
            if k.is_empty() || !printable(k) || !printable(v) {
                return field_err(
                    at,
                    "metadata",
                    "keys must be non-empty, keys and values printable",
                );
            }
        }
        if self.ttl.0 < 2000 || self.ttl.0 % 1000 != 0 || self.ttl.0 > 3_600_000 {
            return field_err(
                at,
                "ttl",
                "must be whole seconds between 2s and 1h (etcd leases and Consul TTLs count seconds)",
            );
        }
        if self.heartbeat_ms() < 100 || self.heartbeat_ms() >= self.ttl.0 {
            return field_err(
                at,
                "heartbeat_interval",
                "must be at least 100ms and below ttl",
            );
        }
        if self.request_timeout.0 == 0 || self.request_timeout.0 > self.ttl.0 {
            return field_err(at, "request_timeout", "must be in (0, ttl]");
        }
        self.health_check.validate(&format!("{at}.health_check"))?;
        if self.targets.is_empty() {
            return field_err(
                at,
                "targets",
                "name at least one registry (consul, etcd, eureka or nacos)",
            );
        }
        for (i, t) in self.targets.iter().enumerate() {
            let at = format!("{at}.targets[{i}]");
            match t {
                TargetConfig::Consul(c) => {
                    if c.cluster.is_empty() {
                        return field_err(&at, "consul.cluster", "must name an Envoy cluster");
                    }
                    if c.token.as_deref().is_some_and(|t| !printable(t)) {
                        return field_err(&at, "consul.token", "must be printable");
                    }
                    if c.auth_method.is_some() != c.bearer_token.is_some() {
                        return field_err(&at, "consul.auth_method", "auth_method and bearer_token go together");
                    }
                    if c.auth_method.is_some() && c.token.is_some() {
                        return field_err(&at, "consul.token", "use either token or auth_method, not both");
                    }
                    let d = c.deregister_critical_service_after.0;
                    if d < 60_000 || d % 1000 != 0 {
                        return field_err(
                            &at,
                            "consul.deregister_critical_service_after",
                            "must be whole seconds, at least 1m (Consul's minimum)",
                        );
                    }
                }
                TargetConfig::Etcd(e) => {
                    if e.cluster.is_empty() {
                        return field_err(&at, "etcd.cluster", "must name an Envoy cluster");
                    }
                    if e.prefix.as_deref().is_some_and(|p| p.is_empty() || !printable(p)) {
                        return field_err(&at, "etcd.prefix", "must be non-empty printable text");
                    }
                    if e.username.is_some() != e.password.is_some() {
                        return field_err(&at, "etcd.username", "username and password go together");
                    }
                }
                TargetConfig::Kubernetes(_) => {
                    return field_err(
                        &at,
                        "kubernetes",
                        "Kubernetes has no self-registration: the kubelet owns a pod's endpoints (use a readiness probe)",
                    )
                }
                TargetConfig::Eureka(e) => {
                    if e.cluster.is_empty() {
                        return field_err(&at, "eureka.cluster", "must name an Envoy cluster");
                    }
                    let app_ok = |a: &str| {
                        !a.is_empty()
                            && a.chars()
                                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
                    };
                    if e.app.as_deref().is_some_and(|a| !app_ok(a)) {
                        return field_err(&at, "eureka.app", "must be letters, digits, '-', '_', '.'");
                    }
                    if !e.path_prefix.starts_with('/') || !printable(&e.path_prefix) || e.path_prefix.contains(' ') {
                        return field_err(&at, "eureka.path_prefix", "must start with '/' and contain no spaces");
                    }
                    crate::registry::eureka::validate_basic_auth(
                        &format!("{at}.eureka"),
                        e.username.as_deref(),
                        e.password.as_deref(),
                    )?;
                }
                TargetConfig::Nacos(n) => {
                    if n.cluster.is_empty() {
                        return field_err(&at, "nacos.cluster", "must name an Envoy cluster");
                    }
                    let name_ok = |s: &str| {
                        !s.is_empty()
                            && s.len() <= 128
                            && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_.:".contains(c))
                    };
                    if !name_ok(&n.group) {
                        return field_err(&at, "nacos.group", "must be 1..128 letters, digits, '-', '_', '.', ':'");
                    }
                    if n.namespace.as_deref().is_some_and(|s| !name_ok(s)) {
                        return field_err(&at, "nacos.namespace", "must be 1..128 letters, digits, '-', '_', '.', ':'");
                    }
                    if n.cluster_name.as_deref().is_some_and(|s| !name_ok(s)) {
                        return field_err(&at, "nacos.cluster_name", "must be 1..128 letters, digits, '-', '_', '.', ':'");
                    }
                    if n.cluster_name.is_none() && self.zone.as_deref().is_some_and(|z| !name_ok(z)) {
                        return field_err(&at, "nacos.cluster_name", "the zone is not a valid Nacos cluster name: set cluster_name");
                    }
                    if self.weight > 10_000 {
                        return field_err(&at, "nacos", "Nacos takes weights up to 10000: lower `register.weight`");
                    }
                    if n.username.is_some() != n.password.is_some() {
                        return field_err(&at, "nacos.username", "username and password go together");
                    }
                    if [&n.username, &n.password].iter().any(|v| v.as_deref().is_some_and(|v| !printable(v))) {
                        return field_err(&at, "nacos.username", "credentials must be printable");
                    }
                    let d = n.delete_after.0;
                    if d < self.ttl.0 || d % 1000 != 0 {
                        return field_err(&at, "nacos.delete_after", "must be whole seconds, at least ttl");
                    }
                }
            }
        }
        Ok(())
    }
}

impl TargetConfig {
    pub fn kind(&self) -> &'static str {
        match self {
            TargetConfig::Consul(_) => "consul",
            TargetConfig::Etcd(_) => "etcd",
            TargetConfig::Nacos(_) => "nacos",
            TargetConfig::Eureka(_) => "eureka",
            TargetConfig::Kubernetes(_) => "kubernetes",
        }
    }
}

/// Which call an answer belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Who {
    /// The application's health check.
    App,
    /// Target `i` of `targets`.
    Target(usize),
    /// Target `i`'s deregistration.
    Leave(usize),
}

/// What an answer meant, for logs and stats.
#[derive(Debug, PartialEq, Eq)]
pub enum Event {
    /// Nothing worth reporting (a login, a lease granted).
    Step,
    /// The instance is in the registry (first time or again), up or down.
    Registered {
        up: bool,
    },
    Heartbeat,
    /// The registry now shows the instance down (true) or up again (false).
    Marked {
        down: bool,
    },
    /// The registry no longer knows the instance: it is registered again at once.
    Forgotten(String),
    /// The call failed; tried again after `retry` ms.
    Failed(String),
    Deregistered,
}

/// A change of the application's health.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub enum AppChange {
    Up,
    Down,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    Login,
    Grant,
    Put(bool),
    KeepAlive,
    Register(bool),
    Check(bool),
    Leave,
}

#[derive(Debug)]
enum Kind {
    Consul {
        cfg: ConsulTarget,
        /// Token from an auth-method login.
        login: Option<String>,
        /// The login token has been accepted once (a refusal then means "expired").
        login_used: bool,
    },
    Eureka {
        cfg: EurekaTarget,
        /// The application name, uppercased.
        app: String,
        /// `Authorization` of HTTP basic auth.
        authorization: Option<String>,
    },
    Etcd {
        cfg: EtcdTarget,
        key: String,
        lease: Option<String>,
        token: Option<String>,
    },
    Nacos {
        cfg: NacosTarget,
        /// The instance's Nacos cluster.
        cluster_name: String,
        token: Option<String>,
        /// The token has been accepted once (a refusal then means "expired").
        token_used: bool,
        /// `enabled` was set by an update after the registration: Nacos 2 keeps
        /// metadata set by updates and applies it over a new registration's, so a
        /// registration is always followed by the update that states `enabled`.
        confirmed: bool,
        /// When the next beat is due: an update does not renew the instance, so
        /// beats go on even while updates fail.
        beat_due_ms: u64,
    },
}

#[derive(Debug)]
struct Target {
    kind: Kind,
    /// What the registry shows now: `Some(up)` once registered.
    shown: Option<bool>,
    next_ms: u64,
    in_flight: Option<Op>,
    /// A deregistration is awaited.
    leave_pending: bool,
}

#[derive(Debug)]
pub struct Registrar {
    cfg: RegisterConfig,
    id: String,
    hb_ms: u64,
    retry_ms: u64,
    /// `None` until the first check answers.
    app: Option<bool>,
    app_run: u32,
    app_next_ms: u64,
    app_in_flight: bool,
    /// The application has passed a check once: registrations may start.
    ever_up: bool,
    targets: Vec<Target>,
    leaving: bool,
}

impl Registrar {
    pub fn new(cfg: &RegisterConfig, now_ms: u64) -> Registrar {
        let id = cfg.instance_id();
        let targets = cfg
            .targets
            .iter()
            .filter_map(|t| {
                let kind = match t {
                    TargetConfig::Consul(c) => Kind::Consul {
                        cfg: c.clone(),
                        login: None,
                        login_used: false,
                    },
                    TargetConfig::Eureka(e) => Kind::Eureka {
                        cfg: e.clone(),
                        app: e
                            .app
                            .as_deref()
                            .unwrap_or(&cfg.service)
                            .to_ascii_uppercase(),
                        authorization: crate::registry::eureka::basic_authorization(
                            e.username.as_deref(),
                            e.password.as_deref(),
                        ),
                    },
                    TargetConfig::Nacos(n) => Kind::Nacos {
                        cfg: n.clone(),
                        cluster_name: n
                            .cluster_name
                            .clone()
                            .or_else(|| cfg.zone.clone())
                            .unwrap_or_else(|| "DEFAULT".to_string()),
                        token: None,
                        token_used: false,
                        confirmed: false,
                        beat_due_ms: 0,
                    },
                    TargetConfig::Etcd(e) => {
                        let prefix = e
                            .prefix
                            .clone()
                            .unwrap_or_else(|| format!("/services/{}/", cfg.service));
                        Kind::Etcd {
                            cfg: e.clone(),
                            key: format!("{prefix}{id}"),
                            lease: None,
                            token: None,
                        }
                    }
                    // Refused by validation.
                    _ => return None,
                };
                Some(Target {
                    kind,
                    shown: None,
                    next_ms: now_ms,
                    in_flight: None,
                    leave_pending: false,
                })
            })
            .collect();
        let hb_ms = cfg.heartbeat_ms();
        Registrar {
            id,
            hb_ms,
            retry_ms: hb_ms.min(1000),
            cfg: cfg.clone(),
            app: None,
            app_run: 0,
            app_next_ms: now_ms,
            app_in_flight: false,
            ever_up: false,
            targets,
            leaving: false,
        }
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// The application's health as last decided (`None` before the first check).
    pub fn app_healthy(&self) -> Option<bool> {
        self.app
    }

    /// `(kind, cluster)` of target `i`, for logs.
    pub fn target_name(&self, i: usize) -> String {
        match self.targets.get(i).map(|t| &t.kind) {
            Some(Kind::Consul { cfg, .. }) => format!("consul via cluster `{}`", cfg.cluster),
            Some(Kind::Eureka { cfg, .. }) => format!("eureka via cluster `{}`", cfg.cluster),
            Some(Kind::Etcd { cfg, .. }) => format!("etcd via cluster `{}`", cfg.cluster),
            Some(Kind::Nacos { cfg, .. }) => format!("nacos via cluster `{}`", cfg.cluster),
            None => format!("target {i}"),
        }
    }

    /// Calls to make now.
    pub fn due(&mut self, now_ms: u64) -> Vec<(Who, HttpRequest)> {
        let mut out = Vec::new();
        if self.leaving {
            return out;
        }
        if !self.app_in_flight && now_ms >= self.app_next_ms {
            self.app_in_flight = true;
            out.push((Who::App, self.app_request()));
        }
        let Some(up) = self.app else { return out };
        if !self.ever_up {
            return out;
        }
        for i in 0..self.targets.len() {
            let t = &self.targets[i];
            let changed = t.shown.is_some_and(|s| s != up);
            if t.in_flight.is_some() || (now_ms < t.next_ms && !changed) {
                continue;
            }
            let op = next_op(t, up, now_ms);
            if let Some(req) = self.request(i, op) {
                self.targets[i].in_flight = Some(op);
                out.push((Who::Target(i), req));
            }
        }
        out
    }

    fn app_request(&self) -> HttpRequest {
        let s = self.cfg.health_check.settings(&self.cfg.service);
        HttpRequest {
            cluster: s.cluster,
            method: "GET",
            authority: s.authority,
            path: s.path,
            headers: vec![(
                s.header,
                self.cfg
                    .address
                    .parse::<std::net::IpAddr>()
                    .map(|ip| std::net::SocketAddr::new(ip, self.cfg.port).to_string())
                    .unwrap_or_default(),
            )],
            body: Vec::new(),
            timeout_ms: s.timeout_ms,
        }
    }

    /// The application's check answered `status` (0: no answer). The first answer
    /// decides at once; later ones need the thresholds in a row.
    pub fn on_app_result(&mut self, status: u16, now_ms: u64) -> Option<AppChange> {
        self.app_in_flight = false;
        self.app_next_ms = now_ms + self.cfg.health_check.interval.0;
        let ok = (200..400).contains(&status);
        let change = match self.app {
            None => Some(ok),
            Some(cur) if cur == ok => {
                self.app_run = 0;
                None
            }
            Some(cur) => {
                self.app_run += 1;
                let hc = &self.cfg.health_check;
                let needed = if cur {
                    hc.unhealthy_threshold
                } else {
                    hc.healthy_threshold
                };
                (self.app_run >= needed.max(1)).then_some(ok)
            }
        }?;
        self.app = Some(change);
        self.ever_up |= change;
        self.app_run = 0;
        Some(if change {
            AppChange::Up
        } else {
            AppChange::Down
        })
    }

    /// A target's call could not be sent or got no answer.
    pub fn on_failure(&mut self, i: usize, why: String, now_ms: u64) -> Event {
        let (retry, leaving) = (self.retry_ms, self.leaving);
        let Some(t) = self.targets.get_mut(i) else {
            return Event::Step;
        };
        t.in_flight = None;
        if leaving {
            // Only the deregistration matters now.
            return Event::Step;
        }
        t.next_ms = now_ms + retry;
        Event::Failed(why)
    }

    /// The answer to target `i`'s call.
    pub fn on_answer(&mut self, i: usize, resp: &HttpResponse, now_ms: u64) -> Event {
        let (hb, retry, leaving) = (self.hb_ms, self.retry_ms, self.leaving);
        let Some(t) = self.targets.get_mut(i) else {
            return Event::Step;
        };
        let Some(op) = t.in_flight.take() else {
            return Event::Step;
        };
        if leaving {
            // An answer to a call sent before the deregistration: nothing follows.
            return Event::Step;
        }
        let body = resp.body;
        let status = resp.status;
        let fail = |t: &mut Target, what: &str| {
            t.next_ms = now_ms + retry;
            Event::Failed(format!("{what}: {status} {}", excerpt(body)))
        };
        match &mut t.kind {
            Kind::Etcd { lease, token, .. } => {
                if status == 401 && token.is_some() {
                    *token = None;
                    t.next_ms = now_ms;
                    return Event::Step;
                }
                match (op, status) {
                    (Op::Login, 200) => {
                        match serde_json::from_slice::<serde_json::Value>(body)
                            .ok()
                            .and_then(|v| v.get("token")?.as_str().map(str::to_string))
                        {
                            Some(tk) => {
                                *token = Some(tk);
                                t.next_ms = now_ms;
                                Event::Step
                            }
                            None => fail(t, "etcd authenticate"),
                        }
                    }
                    (Op::Grant, 200) => match json_str(body, &["ID"]) {
                        Some(id) => {
                            *lease = Some(id);
                            t.shown = None;
                            t.next_ms = now_ms;
                            Event::Step
                        }
                        None => fail(t, "etcd lease grant without ID"),
                    },
                    (Op::Put(up), 200) => {
                        let before = t.shown.replace(up);
                        t.next_ms = now_ms + hb;
                        match before {
                            None => Event::Registered { up },
                            Some(_) => Event::Marked { down: !up },
                        }
                    }
                    (Op::Put(_), 404) if lease_not_found(body) => {
                        forget(t, now_ms, "etcd: requested lease not found".into())
                    }
                    (Op::KeepAlive, 200) => {
                        let ttl = json_str(body, &["result", "TTL"])
                            .and_then(|s| s.parse::<i64>().ok())
                            .unwrap_or(0);
                        if ttl > 0 {
                            t.next_ms = now_ms + hb;
                            Event::Heartbeat
                        } else {
                            forget(
                                t,
                                now_ms,
                                "etcd: the lease expired (keepalive without TTL)".into(),
                            )
                        }
                    }
                    (Op::KeepAlive, 404) if lease_not_found(body) => {
                        forget(t, now_ms, "etcd: requested lease not found".into())
                    }
                    (Op::Login, _) => fail(t, "etcd authenticate"),
                    (Op::Grant, _) => fail(t, "etcd lease grant"),
                    (Op::Put(_), _) => fail(t, "etcd put"),
                    _ => fail(t, "etcd keepalive"),
                }
            }
            Kind::Nacos {
                cfg,
                token,
                token_used,
                confirmed,
                beat_due_ms,
                ..
            } => {
                if matches!(status, 401 | 403) && token.is_some() && op != Op::Login {
                    // "token expired!" / "token invalid!": log in again at once, unless
                    // the token was never accepted (then the user lacks the right).
                    let was_used = std::mem::take(token_used);
                    *token = None;
                    if was_used {
                        t.next_ms = now_ms;
                        return Event::Step;
                    }
                    return fail(t, "nacos refused a token it just issued");
                }
                let v2 = cfg.api == crate::registry::nacos::NacosApi::V2;
                match (op, status) {
                    (Op::Login, 200) => match json_str(body, &["accessToken"]) {
                        Some(tk) if !tk.is_empty() => {
                            *token = Some(tk);
                            *token_used = false;
                            t.next_ms = now_ms;
                            Event::Step
                        }
                        _ => fail(t, "nacos login without accessToken"),
                    },
                    (Op::Register(up), 200) if nacos_ok(body, v2) => {
                        *token_used = true;
                        *confirmed = false;
                        *beat_due_ms = now_ms + hb;
                        t.shown = Some(up);
                        // The update that states `enabled` follows at once.
                        t.next_ms = now_ms;
                        Event::Registered { up }
                    }
                    (Op::Check(up), 200) if nacos_ok(body, v2) => {
                        *token_used = true;
                        let first = !std::mem::replace(confirmed, true);
                        let before = t.shown.replace(up);
                        // An update does not renew the instance: the next call is
                        // the beat, when it is due.
                        t.next_ms = (*beat_due_ms).max(now_ms);
                        if first && before == Some(up) {
                            Event::Step
                        } else {
                            Event::Marked { down: !up }
                        }
                    }
                    (Op::KeepAlive, 200) => match nacos_beat_code(body) {
                        Some(10200) => {
                            *token_used = true;
                            *beat_due_ms = now_ms + hb;
                            // An update still owed goes out at once.
                            t.next_ms = if *confirmed { now_ms + hb } else { now_ms };
                            Event::Heartbeat
                        }
                        // NamingResponseCode.RESOURCE_NOT_FOUND: a light beat for an
                        // instance the server does not know (expired, or a restart).
                        Some(20404) => {
                            *token_used = true;
                            forget(t, now_ms, "nacos: instance not found (code 20404)".into())
                        }
                        _ => fail(t, "nacos beat"),
                    },
                    // An update of an instance the server no longer has.
                    (Op::Check(_), 400 | 404 | 500)
                        if {
                            let b = String::from_utf8_lossy(body);
                            b.contains("not exist") || b.contains("not found")
                        } =>
                    {
                        forget(t, now_ms, format!("nacos: {}", excerpt(body)))
                    }
                    (Op::Login, _) => fail(t, "nacos login"),
                    (Op::Register(_), _) => fail(t, "nacos register"),
                    (Op::Check(_), _) => fail(t, "nacos update"),
                    _ => fail(t, "nacos beat"),
                }
            }
            Kind::Eureka { .. } => match (op, status) {
                (Op::Register(up), 200 | 204) => {
                    t.shown = Some(up);
                    t.next_ms = now_ms + hb;
                    Event::Registered { up }
                }
                (Op::KeepAlive, 200) => {
                    t.next_ms = now_ms + hb;
                    Event::Heartbeat
                }
                (Op::Check(up), 200) => {
                    t.shown = Some(up);
                    t.next_ms = now_ms + hb;
                    Event::Marked { down: !up }
                }
                // Eureka answers 404 to a renewal or status change of an instance it
                // does not know (evicted, or the server restarted).
                (Op::KeepAlive | Op::Check(_), 404) => {
                    forget(t, now_ms, "eureka: instance not found (404)".into())
                }
                (Op::Register(_), _) => fail(t, "eureka register"),
                (Op::Check(_), _) => fail(t, "eureka status"),
                _ => fail(t, "eureka renew"),
            },
            Kind::Consul {
                login, login_used, ..
            } => {
                if status == 403 && login.is_some() && op != Op::Login {
                    // "ACL not found": the login token expired or was revoked. Log in
                    // again at once, unless it was never accepted (it lacks the right).
                    let was_used = std::mem::take(login_used);
                    *login = None;
                    if was_used {
                        t.next_ms = now_ms;
                        return Event::Step;
                    }
                    return fail(t, "consul refused a token it just issued");
                }
                if status == 200 && op != Op::Login {
                    *login_used = true;
                }
                consul_answer(t, op, status, body, now_ms, hb, fail)
            }
        }
    }
}

/// Consul's answer to `op` (auth handled by the caller).
fn consul_answer(
    t: &mut Target,
    op: Op,
    status: u16,
    body: &[u8],
    now_ms: u64,
    hb: u64,
    fail: impl Fn(&mut Target, &str) -> Event,
) -> Event {
    match (op, status) {
        (Op::Login, 200) => {
            #[derive(Deserialize)]
            struct Login {
                #[serde(rename = "SecretID")]
                secret_id: String,
            }
            match serde_json::from_slice::<Login>(body) {
                Ok(l) if !l.secret_id.is_empty() => {
                    if let Kind::Consul {
                        login, login_used, ..
                    } = &mut t.kind
                    {
                        *login = Some(l.secret_id);
                        *login_used = false;
                    }
                    t.next_ms = now_ms;
                    Event::Step
                }
                _ => fail(t, "consul ACL login without SecretID"),
            }
        }
        (Op::Login, _) => fail(t, "consul ACL login"),
        (Op::Register(up), 200) => {
            t.shown = Some(up);
            t.next_ms = now_ms + hb;
            Event::Registered { up }
        }
        (Op::Check(up), 200) => {
            let before = t.shown.replace(up);
            t.next_ms = now_ms + hb;
            if before == Some(up) {
                Event::Heartbeat
            } else {
                Event::Marked { down: !up }
            }
        }
        (Op::Check(_), 404 | 500) if String::from_utf8_lossy(body).contains("Unknown check") => {
            forget(t, now_ms, format!("consul: {}", excerpt(body)))
        }
        (Op::Register(_), _) => fail(t, "consul register"),
        _ => fail(t, "consul check update"),
    }
}

impl Registrar {
    /// Deregistration calls for every target that shows the instance; no further
    /// calls after this. Best effort: the TTL removes what these miss.
    pub fn leave(&mut self) -> Vec<(usize, HttpRequest)> {
        self.leaving = true;
        let mut out = Vec::new();
        for i in 0..self.targets.len() {
            let t = &self.targets[i];
            let registered = match &t.kind {
                Kind::Etcd { lease, .. } => lease.is_some(),
                Kind::Consul { .. } | Kind::Eureka { .. } | Kind::Nacos { .. } => t.shown.is_some(),
            };
            if !registered {
                continue;
            }
            if let Some(req) = self.request(i, Op::Leave) {
                self.targets[i].leave_pending = true;
                out.push((i, req));
            }
        }
        out
    }

    /// The answer to target `i`'s deregistration (`status` 0: none). 404 counts as
    /// done: the registry no longer knows the instance.
    pub fn on_leave_answer(&mut self, i: usize, status: u16, body: &[u8]) -> Event {
        let Some(t) = self.targets.get_mut(i) else {
            return Event::Step;
        };
        t.leave_pending = false;
        t.shown = None;
        if (200..300).contains(&status) || status == 404 {
            Event::Deregistered
        } else {
            Event::Failed(format!("deregister: {status} {}", excerpt(body)))
        }
    }

    /// Deregistrations still awaited.
    pub fn leaving(&self) -> usize {
        self.targets.iter().filter(|t| t.leave_pending).count()
    }

    /// The call of `op` for target `i`.
    fn request(&self, i: usize, op: Op) -> Option<HttpRequest> {
        let t = self.targets.get(i)?;
        let c = &self.cfg;
        let timeout_ms = c.request_timeout.0;
        match &t.kind {
            Kind::Consul { cfg: k, login, .. } => {
                let mut headers =
                    vec![("content-type".to_string(), "application/json".to_string())];
                if op == Op::Login {
                    let body = serde_json::json!({
                        "AuthMethod": k.auth_method.clone().unwrap_or_default(),
                        "BearerToken": k.bearer_token.clone().unwrap_or_default(),
                    });
                    return Some(HttpRequest {
                        cluster: k.cluster.clone(),
                        method: "POST",
                        authority: k.authority.clone().unwrap_or_else(|| k.cluster.clone()),
                        path: "/v1/acl/login".to_string(),
                        headers,
                        body: body.to_string().into_bytes(),
                        timeout_ms,
                    });
                }
                if let Some(tok) = login.as_ref().or(k.token.as_ref()) {
                    headers.push(("x-consul-token".to_string(), tok.clone()));
                }
                let check = format!("service:{}", self.id);
                let (path, body) = match op {
                    Op::Register(up) => {
                        let mut meta = c.metadata.clone();
                        if let Some(z) = &c.zone {
                            meta.insert("zone".into(), z.clone());
                        }
                        let body = serde_json::json!({
                            "ID": self.id,
                            "Name": c.service,
                            "Address": c.address,
                            "Port": c.port,
                            "Meta": meta,
                            "Weights": { "Passing": c.weight, "Warning": 1 },
                            "Check": {
                                "CheckID": check,
                                "Name": "registry-lb heartbeat",
                                "TTL": format!("{}s", c.ttl.0 / 1000),
                                "Status": if up { "passing" } else { "critical" },
                                "DeregisterCriticalServiceAfter":
                                    format!("{}s", k.deregister_critical_service_after.0 / 1000),
                            },
                        });
                        ("/v1/agent/service/register".to_string(), body.to_string())
                    }
                    Op::Check(up) => (
                        format!(
                            "/v1/agent/check/{}/{check}",
                            if up { "pass" } else { "fail" }
                        ),
                        String::new(),
                    ),
                    Op::Leave => (
                        format!("/v1/agent/service/deregister/{}", self.id),
                        String::new(),
                    ),
                    _ => return None,
                };
                Some(HttpRequest {
                    cluster: k.cluster.clone(),
                    method: "PUT",
                    authority: k.authority.clone().unwrap_or_else(|| k.cluster.clone()),
                    path,
                    headers,
                    body: body.into_bytes(),
                    timeout_ms,
                })
            }
            Kind::Eureka {
                cfg,
                app,
                authorization,
            } => {
                let mut headers = vec![
                    ("content-type".to_string(), "application/json".to_string()),
                    ("accept".to_string(), "application/json".to_string()),
                ];
                if let Some(a) = authorization {
                    headers.push(("authorization".to_string(), a.clone()));
                }
                let base = format!("{}/apps/{app}", cfg.path_prefix.trim_end_matches('/'));
                let one = format!("{base}/{}", self.id);
                let (method, path, body) = match op {
                    Op::Register(up) => {
                        let mut meta = c.metadata.clone();
                        if let Some(z) = &c.zone {
                            meta.insert("zone".into(), z.clone());
                        }
                        meta.insert("weight".into(), c.weight.to_string());
                        let body = serde_json::json!({ "instance": {
                            "instanceId": self.id,
                            "hostName": c.address,
                            "app": app,
                            "ipAddr": c.address,
                            "vipAddress": c.service,
                            "status": if up { "UP" } else { "DOWN" },
                            "port": { "$": c.port, "@enabled": "true" },
                            "securePort": { "$": 443, "@enabled": "false" },
                            "dataCenterInfo": {
                                "@class": "com.netflix.appinfo.InstanceInfo$DefaultDataCenterInfo",
                                "name": "MyOwn",
                            },
                            "leaseInfo": {
                                "renewalIntervalInSecs": (self.hb_ms / 1000).max(1),
                                "durationInSecs": c.ttl.0 / 1000,
                            },
                            "metadata": meta,
                        }});
                        ("POST", base, body.to_string())
                    }
                    Op::KeepAlive => ("PUT", one, String::new()),
                    Op::Check(up) => (
                        "PUT",
                        format!("{one}/status?value={}", if up { "UP" } else { "DOWN" }),
                        String::new(),
                    ),
                    Op::Leave => ("DELETE", one, String::new()),
                    _ => return None,
                };
                Some(HttpRequest {
                    cluster: cfg.cluster.clone(),
                    method,
                    authority: cfg.authority.clone().unwrap_or_else(|| cfg.cluster.clone()),
                    path,
                    headers,
                    body: body.into_bytes(),
                    timeout_ms,
                })
            }
            Kind::Nacos {
                cfg,
                cluster_name,
                token,
                ..
            } => {
                let enc = crate::registry::encode_component;
                let v = match cfg.api {
                    crate::registry::nacos::NacosApi::V1 => "v1",
                    crate::registry::nacos::NacosApi::V2 => "v2",
                };
                let headers = vec![
                    (
                        "content-type".to_string(),
                        "application/x-www-form-urlencoded".to_string(),
                    ),
                    ("accept".to_string(), "application/json".to_string()),
                ];
                if op == Op::Login {
                    let body = format!(
                        "username={}&password={}",
                        enc(cfg.username.as_deref().unwrap_or("")),
                        enc(cfg.password.as_deref().unwrap_or(""))
                    );
                    return Some(HttpRequest {
                        cluster: cfg.cluster.clone(),
                        method: "POST",
                        authority: cfg.authority.clone().unwrap_or_else(|| cfg.cluster.clone()),
                        path: "/nacos/v1/auth/login".to_string(),
                        headers,
                        body: body.into_bytes(),
                        timeout_ms,
                    });
                }
                // Every parameter goes in the query string, as Nacos' own client
                // sends them (servlet containers parse form bodies of POST only).
                let mut q = Vec::new();
                if let Some(ns) = &cfg.namespace {
                    q.push(format!("namespaceId={}", enc(ns)));
                }
                let (method, path) = match op {
                    Op::KeepAlive => {
                        // The beat wants the grouped name (`group@@service`).
                        q.push(format!(
                            "serviceName={}",
                            enc(&format!("{}@@{}", cfg.group, c.service))
                        ));
                        ("PUT", format!("/nacos/{v}/ns/instance/beat"))
                    }
                    Op::Register(_) | Op::Check(_) => {
                        q.push(format!("serviceName={}", enc(&c.service)));
                        q.push(format!("groupName={}", enc(&cfg.group)));
                        let method = if matches!(op, Op::Register(_)) {
                            "POST"
                        } else {
                            "PUT"
                        };
                        (method, format!("/nacos/{v}/ns/instance"))
                    }
                    Op::Leave => {
                        q.push(format!("serviceName={}", enc(&c.service)));
                        q.push(format!("groupName={}", enc(&cfg.group)));
                        ("DELETE", format!("/nacos/{v}/ns/instance"))
                    }
                    _ => return None,
                };
                q.push(format!("ip={}", enc(&c.address)));
                q.push(format!("port={}", c.port));
                q.push(format!("clusterName={}", enc(cluster_name)));
                q.push("ephemeral=true".to_string());
                if let Op::Register(up) | Op::Check(up) = op {
                    let mut meta: BTreeMap<String, String> = c.metadata.clone();
                    // Nacos' heartbeat timings for this instance (milliseconds).
                    meta.insert(
                        "preserved.heart.beat.interval".into(),
                        self.hb_ms.to_string(),
                    );
                    meta.insert("preserved.heart.beat.timeout".into(), c.ttl.0.to_string());
                    meta.insert(
                        "preserved.ip.delete.timeout".into(),
                        cfg.delete_after.0.to_string(),
                    );
                    q.push(format!("weight={}", c.weight));
                    q.push("healthy=true".to_string());
                    q.push(format!("enabled={up}"));
                    q.push(format!(
                        "metadata={}",
                        enc(&serde_json::to_string(&meta).unwrap_or_default())
                    ));
                }
                if let Some(tk) = token {
                    q.push(format!("accessToken={}", enc(tk)));
                }
                Some(HttpRequest {
                    cluster: cfg.cluster.clone(),
                    method,
                    authority: cfg.authority.clone().unwrap_or_else(|| cfg.cluster.clone()),
                    path: format!("{path}?{}", q.join("&")),
                    headers,
                    body: Vec::new(),
                    timeout_ms,
                })
            }
            Kind::Etcd {
                cfg,
                key,
                lease,
                token,
            } => {
                let mut headers =
                    vec![("content-type".to_string(), "application/json".to_string())];
                if let (Some(tk), false) = (token, op == Op::Login) {
                    headers.push(("authorization".to_string(), tk.clone()));
                }
                let lease_id = lease.clone().unwrap_or_default();
                let (path, body) = match op {
                    Op::Login => (
                        "/v3/auth/authenticate",
                        serde_json::json!({
                            "name": cfg.username.clone().unwrap_or_default(),
                            "password": cfg.password.clone().unwrap_or_default(),
                        }),
                    ),
                    Op::Grant => (
                        "/v3/lease/grant",
                        serde_json::json!({ "TTL": (c.ttl.0 / 1000).to_string() }),
                    ),
                    Op::Put(up) => {
                        let mut value = serde_json::json!({
                            "address": c.address,
                            "port": c.port,
                            "weight": c.weight,
                            "state": if up { "healthy" } else { "unhealthy" },
                            "metadata": c.metadata,
                        });
                        if let (Some(z), Some(obj)) = (&c.zone, value.as_object_mut()) {
                            obj.insert("zone".into(), serde_json::Value::String(z.clone()));
                        }
                        (
                            "/v3/kv/put",
                            serde_json::json!({
                                "key": B64.encode(key.as_bytes()),
                                "value": B64.encode(value.to_string().as_bytes()),
                                "lease": lease_id,
                            }),
                        )
                    }
                    Op::KeepAlive => ("/v3/lease/keepalive", serde_json::json!({ "ID": lease_id })),
                    Op::Leave => ("/v3/lease/revoke", serde_json::json!({ "ID": lease_id })),
                    _ => return None,
                };
                Some(HttpRequest {
                    cluster: cfg.cluster.clone(),
                    method: "POST",
                    authority: cfg.authority.clone().unwrap_or_else(|| cfg.cluster.clone()),
                    path: path.to_string(),
                    headers,
                    body: body.to_string().into_bytes(),
                    timeout_ms,
                })
            }
        }
    }
}

/// The next step of a target that is due, with the application `up` or not.
fn next_op(t: &Target, up: bool, now_ms: u64) -> Op {
    match &t.kind {
        Kind::Etcd {
            cfg, lease, token, ..
        } => {
            if cfg.username.is_some() && token.is_none() {
                Op::Login
            } else if lease.is_none() {
                Op::Grant
            } else if t.shown != Some(up) {
                Op::Put(up)
            } else {
                Op::KeepAlive
            }
        }
        Kind::Consul { cfg, login, .. } => match t.shown {
            _ if cfg.auth_method.is_some() && login.is_none() => Op::Login,
            None => Op::Register(up),
            Some(_) => Op::Check(up),
        },
        Kind::Eureka { .. } => match t.shown {
            None => Op::Register(up),
            Some(s) if s != up => Op::Check(up),
            Some(_) => Op::KeepAlive,
        },
        Kind::Nacos {
            cfg,
            token,
            confirmed,
            beat_due_ms,
            ..
        } => {
            if cfg.username.is_some() && token.is_none() {
                Op::Login
            } else if t.shown.is_none() {
                Op::Register(up)
            } else if t.shown != Some(up) || (!*confirmed && now_ms < *beat_due_ms) {
                // A change of the application first; the update owed after a
                // registration while no beat is due.
                Op::Check(up)
            } else {
                // A beat is due (also while that update keeps failing: the instance
                // must not expire meanwhile).
                Op::KeepAlive
            }
        }
    }
}

/// A Nacos write answered `ok` (v1: the text `ok`; v2: `{"code":0,...}`).
fn nacos_ok(body: &[u8], v2: bool) -> bool {
    if v2 {
        serde_json::from_slice::<serde_json::Value>(body)
            .ok()
            .and_then(|v| v.get("code")?.as_i64())
            == Some(0)
    } else {
        body.trim_ascii() == b"ok"
    }
}

/// `code` of a Nacos beat answer (10200 OK, 20404 not found); also inside `data`
/// should a server wrap it.
fn nacos_beat_code(body: &[u8]) -> Option<i64> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    v.get("data")
        .and_then(|d| d.get("code"))
        .or_else(|| v.get("code"))?
        .as_i64()
}

/// The registry forgot the instance: register again now.
fn forget(t: &mut Target, now_ms: u64, why: String) -> Event {
    t.shown = None;
    match &mut t.kind {
        Kind::Etcd { lease, .. } => *lease = None,
        Kind::Nacos { confirmed, .. } => *confirmed = false,
        _ => {}
    }
    t.next_ms = now_ms;
    Event::Forgotten(why)
}

fn lease_not_found(body: &[u8]) -> bool {
    String::from_utf8_lossy(body).contains("lease not found")
}

/// A string (or number) at `path` of a JSON body.
fn json_str(body: &[u8], path: &[&str]) -> Option<String> {
    let mut v: serde_json::Value = serde_json::from_slice(body).ok()?;
    for p in path {
        v = v.get_mut(*p)?.take();
    }
    match v {
        serde_json::Value::String(s) => Some(s),
        serde_json::Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wasm_bindgen_test::wasm_bindgen_test;

    fn cfg(targets: &str, extra: &str) -> Result<RegisterConfig, ConfigError> {
        let text = format!(
            r#"{{ "service": "web", "address": "10.0.0.7", "port": 8080, "weight": 3,
                "zone": "z1", "metadata": {{ "version": "v2" }}, "ttl": "3s",
                "heartbeat_interval": "1s", {extra}
                "health_check": {{ "cluster": "app", "path": "/healthz", "interval": "500ms",
                                  "timeout": "200ms", "healthy_threshold": 2, "unhealthy_threshold": 2 }},
                "targets": [{targets}] }}"#
        );
        let c: RegisterConfig =
            serde_json::from_str(&text).map_err(|e| ConfigError(e.to_string()))?;
        c.validate()?;
        Ok(c)
    }

    fn ok(status: u16, body: &str) -> (u16, Vec<u8>) {
        (status, body.as_bytes().to_vec())
    }

    fn answer(r: &mut Registrar, i: usize, (status, body): (u16, Vec<u8>), now: u64) -> Event {
        r.on_answer(
            i,
            &HttpResponse {
                status,
                headers: &[],
                body: &body,
            },
            now,
        )
    }

    /// The target calls due at `now` (the application's check is answered 200 at
    /// once; its first answer makes the registration due at the same instant).
    fn calls(r: &mut Registrar, now: u64) -> Vec<HttpRequest> {
        let mut out = Vec::new();
        for _ in 0..2 {
            for (who, req) in r.due(now) {
                match who {
                    Who::App => {
                        let _ = r.on_app_result(200, now);
                    }
                    Who::Target(_) | Who::Leave(_) => out.push(req),
                }
            }
        }
        out
    }

    fn json(req: &HttpRequest) -> serde_json::Value {
        serde_json::from_slice(&req.body).unwrap_or(serde_json::Value::Null)
    }

    fn unb64(v: &serde_json::Value) -> String {
        String::from_utf8(B64.decode(v.as_str().unwrap_or("")).unwrap_or_default())
            .unwrap_or_default()
    }

    const ETCD: &str = r#"{ "etcd": { "cluster": "etcd" } }"#;
    const CONSUL: &str = r#"{ "consul": { "cluster": "consul", "token": "s3cret" } }"#;

    #[wasm_bindgen_test(unsupported = test)]
    fn errors_name_the_field_and_kubernetes_is_refused() {
        let err = |targets: &str, extra: &str| cfg(targets, extra).err().map(|e| e.0);
        assert_eq!(err(ETCD, ""), None);
        assert!(err(r#"{ "kubernetes": {} }"#, "").is_some_and(|e| e
            .starts_with("register.targets[0].kubernetes: Kubernetes has no self-registration")));
        assert!(err(r#"{ "nacos": { "cluster": "nacos" } }"#, "").is_none());
        assert!(err(r#"{ "nacos": { "cluster": "" } }"#, "")
            .is_some_and(|e| e.starts_with("register.targets[0].nacos.cluster:")));
        assert!(
            err(r#"{ "nacos": { "cluster": "n", "group": "a b" } }"#, "")
                .is_some_and(|e| e.starts_with("register.targets[0].nacos.group:"))
        );
        assert!(
            err(r#"{ "nacos": { "cluster": "n", "username": "u" } }"#, "")
                .is_some_and(|e| e.starts_with("register.targets[0].nacos.username:"))
        );
        assert!(err(
            r#"{ "nacos": { "cluster": "n", "delete_after": "2s" } }"#,
            ""
        )
        .is_some_and(|e| e.starts_with("register.targets[0].nacos.delete_after:")));
        let mut heavy =
            cfg(r#"{ "nacos": { "cluster": "n" } }"#, "").unwrap_or_else(|e| panic!("{e}"));
        heavy.weight = 20_000;
        assert!(heavy.validate().is_err_and(|e| e
            .0
            .starts_with("register.targets[0].nacos: Nacos takes weights up to 10000")));
        assert!(err(ETCD, r#""id": "a/b","#).is_some_and(|e| e.starts_with("register.id:")));
        assert!(err(ETCD, r#""request_timeout": "4s","#)
            .is_some_and(|e| e.starts_with("register.request_timeout:")));
        assert!(err("", "").is_some_and(|e| e.starts_with("register.targets:")));
        assert!(
            err(r#"{ "etcd": { "cluster": "etcd", "username": "u" } }"#, "")
                .is_some_and(|e| e.starts_with("register.targets[0].etcd.username:"))
        );
        // Eureka's basic auth is checked as the reader's is: a ':' cannot be in the user-id.
        assert!(err(
            r#"{ "eureka": { "cluster": "eureka", "username": "a:b", "password": "p" } }"#,
            ""
        )
        .is_some_and(|e| e
            .starts_with("register.targets[0].eureka.username: must be non-empty, without ':'")));
        assert!(
            err(
                r#"{ "eureka": { "cluster": "eureka", "username": "u" } }"#,
                ""
            )
            .is_some_and(|e| e.starts_with(
                "register.targets[0].eureka.username: username and password go together"
            ))
        );
        let ttl = r#"{ "service": "web", "address": "10.0.0.7", "port": 1, "ttl": "2500ms",
            "health_check": { "path": "/" }, "targets": [{ "etcd": { "cluster": "e" } }] }"#;
        let c: RegisterConfig = serde_json::from_str(ttl).unwrap_or_else(|e| panic!("{e}"));
        assert!(c
            .validate()
            .is_err_and(|e| e.0.starts_with("register.ttl:")));
        let host = ttl.replace("10.0.0.7", "app.local").replace("2500ms", "3s");
        let c: RegisterConfig = serde_json::from_str(&host).unwrap_or_else(|e| panic!("{e}"));
        assert!(c
            .validate()
            .is_err_and(|e| e.0.starts_with("register.address:")));
        assert_eq!(c.instance_id(), "web-app-local-1");
        assert_eq!(c.heartbeat_ms(), 1000, "a third of ttl by default");
        let hc = r#""health_check": { "path": "/", "interval": "50ms" }"#;
        let bad_hc = host
            .replace("app.local", "10.0.0.7")
            .replace(r#""health_check": { "path": "/" }"#, hc);
        let c: RegisterConfig = serde_json::from_str(&bad_hc).unwrap_or_else(|e| panic!("{e}"));
        assert!(c
            .validate()
            .is_err_and(|e| e.0.starts_with("register.health_check.interval:")));
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn nothing_is_registered_before_the_application_answers_its_check() {
        let c = cfg(ETCD, "").unwrap_or_else(|e| panic!("{e}"));
        let mut r = Registrar::new(&c, 0);
        let due = r.due(0);
        assert_eq!(due.len(), 1, "only the application's check");
        assert_eq!(due[0].0, Who::App);
        let check = &due[0].1;
        assert_eq!(
            (check.cluster.as_str(), check.path.as_str()),
            ("app", "/healthz")
        );
        assert_eq!(check.headers[0].1, "10.0.0.7:8080");
        assert!(
            r.due(100).is_empty(),
            "one check at a time, no registration yet"
        );
        assert_eq!(r.on_app_result(503, 100), Some(AppChange::Down));
        assert!(
            r.due(200).is_empty(),
            "a failing application is not registered (first check at 600)"
        );
        assert!(r.due(600).iter().all(|(w, _)| *w == Who::App));
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn etcd_lease_value_keepalive_mark_down_and_forgotten_lease() {
        let c = cfg(ETCD, "").unwrap_or_else(|e| panic!("{e}"));
        let mut r = Registrar::new(&c, 0);
        let grant = calls(&mut r, 0);
        assert_eq!(grant.len(), 1);
        assert_eq!(grant[0].path, "/v3/lease/grant");
        assert_eq!(json(&grant[0])["TTL"], "3");
        assert_eq!(
            answer(&mut r, 0, ok(200, r#"{"ID":"7587","TTL":"3"}"#), 10),
            Event::Step
        );
        let put = calls(&mut r, 10);
        assert_eq!(put[0].path, "/v3/kv/put");
        let body = json(&put[0]);
        assert_eq!(body["lease"], "7587");
        assert_eq!(unb64(&body["key"]), "/services/web/web-10-0-0-7-8080");
        let value: serde_json::Value =
            serde_json::from_str(&unb64(&body["value"])).unwrap_or_default();
        assert_eq!(
            value,
            serde_json::json!({"address":"10.0.0.7","port":8080,"weight":3,"zone":"z1",
                "state":"healthy","metadata":{"version":"v2"}})
        );
        // The value is one registry-lb's etcd reader takes.
        let inst = crate::registry::etcd::parse_value(value.to_string().as_bytes());
        assert!(inst.is_ok_and(|i| i.is_some_and(|i| i.weight == 3
            && i.zone == "z1"
            && i.addr.to_string() == "10.0.0.7:8080")));
        assert_eq!(
            answer(&mut r, 0, ok(200, "{}"), 20),
            Event::Registered { up: true }
        );
        assert!(calls(&mut r, 500).is_empty(), "next heartbeat at 1020");
        let ka = calls(&mut r, 1020);
        assert_eq!(
            (ka[0].path.as_str(), json(&ka[0])["ID"].as_str()),
            ("/v3/lease/keepalive", Some("7587"))
        );
        let alive = r#"{"result":{"header":{"revision":"2"},"ID":"7587","TTL":"3"}}"#;
        assert_eq!(answer(&mut r, 0, ok(200, alive), 1030), Event::Heartbeat);
        // Two failed checks in a row: marked down at once, not at the next heartbeat.
        assert_eq!(r.on_app_result(0, 1100), None);
        assert_eq!(r.on_app_result(503, 1200), Some(AppChange::Down));
        let down = r.due(1210);
        let put = &down
            .iter()
            .find(|(w, _)| *w == Who::Target(0))
            .unwrap_or_else(|| panic!("{down:?}"))
            .1;
        let value = unb64(&json(put)["value"]);
        assert!(value.contains(r#""state":"unhealthy""#), "{value}");
        assert_eq!(
            json(put)["lease"],
            "7587",
            "same lease: listed as down, not deleted"
        );
        assert_eq!(
            answer(&mut r, 0, ok(200, "{}"), 1220),
            Event::Marked { down: true }
        );
        // Down, the lease is still kept alive; etcd forgot it (TTL absent): grant again at once.
        let ka = r.due(2300);
        assert!(ka
            .iter()
            .any(|(w, q)| *w == Who::Target(0) && q.path == "/v3/lease/keepalive"));
        let expired = r#"{"result":{"header":{"revision":"3"},"ID":"7587"}}"#;
        assert!(matches!(
            answer(&mut r, 0, ok(200, expired), 2310),
            Event::Forgotten(_)
        ));
        let again = r.due(2310);
        assert!(
            again
                .iter()
                .any(|(w, q)| *w == Who::Target(0) && q.path == "/v3/lease/grant"),
            "{again:?}"
        );
        assert_eq!(
            answer(&mut r, 0, ok(200, r#"{"ID":"99","TTL":"3"}"#), 2320),
            Event::Step
        );
        let put = r.due(2320);
        assert!(put
            .iter()
            .any(|(_, q)| q.path == "/v3/kv/put" && json(q)["lease"] == "99"));
        assert_eq!(
            answer(&mut r, 0, ok(200, "{}"), 2330),
            Event::Registered { up: false }
        );
        // A put whose lease etcd lost (404) also registers again.
        assert_eq!(r.on_app_result(200, 2400), None);
        assert_eq!(r.on_app_result(200, 2500), Some(AppChange::Up));
        let up = r.due(2510);
        assert!(up.iter().any(|(_, q)| q.path == "/v3/kv/put"
            && unb64(&json(q)["value"]).contains(r#""state":"healthy""#)));
        let lost = r#"{"error":"etcdserver: requested lease not found","message":"etcdserver: requested lease not found","code":5}"#;
        assert!(matches!(
            answer(&mut r, 0, ok(404, lost), 2520),
            Event::Forgotten(_)
        ));
        // Leaving: no lease, nothing to revoke until one is granted.
        assert!(r.leave().is_empty());
        assert!(r.due(9999).is_empty(), "no calls once leaving");
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn etcd_failures_retry_and_leaving_revokes_the_lease() {
        let c = cfg(ETCD, "").unwrap_or_else(|e| panic!("{e}"));
        let mut r = Registrar::new(&c, 0);
        assert_eq!(calls(&mut r, 0).len(), 1);
        assert!(matches!(
            r.on_failure(0, "reset".into(), 5),
            Event::Failed(_)
        ));
        assert!(
            calls(&mut r, 500).is_empty(),
            "retried after one second at most"
        );
        assert_eq!(calls(&mut r, 1005)[0].path, "/v3/lease/grant");
        assert!(
            matches!(answer(&mut r, 0, ok(500, "boom"), 1010), Event::Failed(e) if e.contains("500 boom"))
        );
        assert_eq!(calls(&mut r, 2010)[0].path, "/v3/lease/grant");
        answer(&mut r, 0, ok(200, r#"{"ID":"5","TTL":"3"}"#), 2020);
        assert_eq!(calls(&mut r, 2020)[0].path, "/v3/kv/put");
        let leave = r.leave();
        assert_eq!(leave.len(), 1, "the put in flight does not stop the revoke");
        assert_eq!(
            (leave[0].1.path.as_str(), json(&leave[0].1)["ID"].as_str()),
            ("/v3/lease/revoke", Some("5"))
        );
        assert_eq!(r.leaving(), 1);
        // The put's answer arrives after: nothing follows from it, the revoke is still awaited.
        assert_eq!(answer(&mut r, 0, ok(200, "{}"), 2030), Event::Step);
        assert_eq!(r.leaving(), 1);
        assert_eq!(r.on_leave_answer(0, 200, b"{}"), Event::Deregistered);
        assert_eq!(r.leaving(), 0);
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn etcd_logs_in_and_again_when_the_token_is_refused() {
        let t = r#"{ "etcd": { "cluster": "etcd", "prefix": "/svc/", "username": "u", "password": "p" } }"#;
        let c = cfg(t, "").unwrap_or_else(|e| panic!("{e}"));
        let mut r = Registrar::new(&c, 0);
        let login = calls(&mut r, 0);
        assert_eq!(login[0].path, "/v3/auth/authenticate");
        assert_eq!(
            json(&login[0]),
            serde_json::json!({"name":"u","password":"p"})
        );
        answer(&mut r, 0, ok(200, r#"{"token":"tok.1"}"#), 1);
        let grant = calls(&mut r, 1);
        assert!(grant[0]
            .headers
            .contains(&("authorization".into(), "tok.1".into())));
        assert_eq!(
            answer(&mut r, 0, ok(401, "invalid auth token"), 2),
            Event::Step
        );
        assert_eq!(calls(&mut r, 2)[0].path, "/v3/auth/authenticate");
        answer(&mut r, 0, ok(200, r#"{"token":"tok.2"}"#), 3);
        answer(&mut r, 0, ok(200, r#"{"ID":"1"}"#), 3);
        let grant = calls(&mut r, 3);
        answer(&mut r, 0, ok(200, r#"{"ID":"1"}"#), 4);
        assert!(grant[0]
            .headers
            .contains(&("authorization".into(), "tok.2".into())));
        let put = calls(&mut r, 4);
        assert_eq!(unb64(&json(&put[0])["key"]), "/svc/web-10-0-0-7-8080");
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn consul_ttl_check_pass_fail_unknown_check_and_deregister() {
        let c = cfg(CONSUL, r#""id": "web-a","#).unwrap_or_else(|e| panic!("{e}"));
        let mut r = Registrar::new(&c, 0);
        let reg = calls(&mut r, 0);
        assert_eq!(
            (reg[0].method, reg[0].path.as_str()),
            ("PUT", "/v1/agent/service/register")
        );
        assert!(reg[0]
            .headers
            .contains(&("x-consul-token".into(), "s3cret".into())));
        assert_eq!(
            json(&reg[0]),
            serde_json::json!({"ID":"web-a","Name":"web","Address":"10.0.0.7","Port":8080,
                "Meta":{"version":"v2","zone":"z1"},"Weights":{"Passing":3,"Warning":1},
                "Check":{"CheckID":"service:web-a","Name":"registry-lb heartbeat","TTL":"3s",
                    "Status":"passing","DeregisterCriticalServiceAfter":"60s"}})
        );
        assert_eq!(
            answer(&mut r, 0, ok(200, ""), 10),
            Event::Registered { up: true }
        );
        let pass = calls(&mut r, 1010);
        assert_eq!(pass[0].path, "/v1/agent/check/pass/service:web-a");
        assert_eq!(answer(&mut r, 0, ok(200, ""), 1020), Event::Heartbeat);
        r.on_app_result(0, 1100);
        assert_eq!(r.on_app_result(0, 1200), Some(AppChange::Down));
        let fail = r.due(1201);
        assert!(
            fail.iter()
                .any(|(_, q)| q.path == "/v1/agent/check/fail/service:web-a"),
            "{fail:?}"
        );
        assert_eq!(
            answer(&mut r, 0, ok(200, ""), 1210),
            Event::Marked { down: true }
        );
        // Agent restarted: current agents answer 404, older ones 500.
        let unknown = r#"Unknown check ID "service:web-a". Ensure that the check ID is passed, not the check name."#;
        calls(&mut r, 2210);
        assert!(matches!(
            answer(&mut r, 0, ok(404, unknown), 2220),
            Event::Forgotten(_)
        ));
        let reg = r.due(2220);
        let reg = &reg
            .iter()
            .find(|(w, _)| *w == Who::Target(0))
            .unwrap_or_else(|| panic!("{reg:?}"))
            .1;
        assert_eq!(reg.path, "/v1/agent/service/register");
        assert_eq!(
            json(reg)["Check"]["Status"],
            "critical",
            "registered again as down"
        );
        assert_eq!(
            answer(&mut r, 0, ok(200, ""), 2230),
            Event::Registered { up: false }
        );
        calls(&mut r, 3230);
        assert!(matches!(
            answer(&mut r, 0, ok(500, r#"Unknown check "service:web-a""#), 3240),
            Event::Forgotten(_)
        ));
        calls(&mut r, 3240);
        answer(&mut r, 0, ok(200, ""), 3250);
        // An ACL refusal is a failure, not a forgotten instance.
        calls(&mut r, 4250);
        assert!(matches!(
            answer(&mut r, 0, ok(403, "Permission denied"), 4260),
            Event::Failed(_)
        ));
        let leave = r.leave();
        assert_eq!(
            (leave[0].1.method, leave[0].1.path.as_str()),
            ("PUT", "/v1/agent/service/deregister/web-a")
        );
        assert!(r.due(99_999).is_empty(), "no heartbeats once leaving");
        assert!(
            matches!(r.on_leave_answer(0, 500, b"rpc error"), Event::Failed(e) if e.contains("500 rpc error"))
        );
        assert_eq!(
            r.leaving(),
            0,
            "a failed deregistration is not retried: the TTL removes it"
        );
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn eureka_register_renew_status_evicted_and_cancel() {
        let t = r#"{ "eureka": { "cluster": "eureka", "username": "u", "password": "p" } }"#;
        let c = cfg(t, r#""id": "web-a","#).unwrap_or_else(|e| panic!("{e}"));
        let mut r = Registrar::new(&c, 0);
        let reg = calls(&mut r, 0);
        assert_eq!(
            (reg[0].method, reg[0].path.as_str()),
            ("POST", "/eureka/apps/WEB")
        );
        let basic = format!("Basic {}", B64.encode("u:p"));
        assert!(reg[0].headers.contains(&("authorization".into(), basic)));
        let inst = &json(&reg[0])["instance"];
        assert_eq!(
            (
                &inst["instanceId"],
                &inst["ipAddr"],
                &inst["status"],
                &inst["port"]["$"]
            ),
            (
                &serde_json::json!("web-a"),
                &serde_json::json!("10.0.0.7"),
                &serde_json::json!("UP"),
                &serde_json::json!(8080)
            )
        );
        assert_eq!(inst["leaseInfo"]["durationInSecs"], 3);
        assert_eq!(
            inst["metadata"],
            serde_json::json!({"version":"v2","zone":"z1","weight":"3"})
        );
        // What registry-lb's Eureka reader makes of it.
        let listed = serde_json::json!({"application":{"name":"WEB","instance":[inst]}});
        let ecfg: crate::config::EurekaConfig =
            serde_json::from_str(r#"{ "cluster": "eureka" }"#).unwrap_or_else(|e| panic!("{e}"));
        let (got, rejected) =
            crate::registry::eureka::parse(listed.to_string().as_bytes(), "WEB", &ecfg)
                .unwrap_or_else(|e| panic!("{e}"));
        assert!(rejected.is_empty(), "{rejected:?}");
        assert_eq!(
            (got[0].addr.to_string(), got[0].weight, got[0].zone.as_str()),
            ("10.0.0.7:8080".into(), 3, "z1")
        );
        assert_eq!(
            answer(&mut r, 0, ok(204, ""), 10),
            Event::Registered { up: true }
        );
        let renew = calls(&mut r, 1010);
        assert_eq!(
            (renew[0].method, renew[0].path.as_str()),
            ("PUT", "/eureka/apps/WEB/web-a")
        );
        assert_eq!(answer(&mut r, 0, ok(200, ""), 1020), Event::Heartbeat);
        r.on_app_result(0, 1100);
        assert_eq!(r.on_app_result(0, 1200), Some(AppChange::Down));
        let down = r.due(1201);
        let down = &down
            .iter()
            .find(|(w, _)| *w == Who::Target(0))
            .unwrap_or_else(|| panic!("{down:?}"))
            .1;
        assert_eq!(
            (down.method, down.path.as_str()),
            ("PUT", "/eureka/apps/WEB/web-a/status?value=DOWN")
        );
        assert_eq!(
            answer(&mut r, 0, ok(200, ""), 1210),
            Event::Marked { down: true }
        );
        // Down, renewals go on; evicted (404) → registered again, as DOWN.
        let renew = r.due(2300);
        assert!(
            renew
                .iter()
                .any(|(_, q)| q.method == "PUT" && q.path == "/eureka/apps/WEB/web-a"),
            "{renew:?}"
        );
        assert!(matches!(
            answer(&mut r, 0, ok(404, ""), 2310),
            Event::Forgotten(_)
        ));
        let again = r.due(2310);
        let again = &again
            .iter()
            .find(|(w, _)| *w == Who::Target(0))
            .unwrap_or_else(|| panic!("{again:?}"))
            .1;
        assert_eq!(again.method, "POST");
        assert_eq!(json(again)["instance"]["status"], "DOWN");
        assert_eq!(
            answer(&mut r, 0, ok(204, ""), 2320),
            Event::Registered { up: false }
        );
        let leave = r.leave();
        assert_eq!(
            (leave[0].1.method, leave[0].1.path.as_str()),
            ("DELETE", "/eureka/apps/WEB/web-a")
        );
        assert_eq!(r.on_leave_answer(0, 200, b""), Event::Deregistered);
    }

    /// The query parameters of a request's path, decoded.
    fn query(req: &HttpRequest) -> std::collections::HashMap<String, String> {
        let q = req.path.split_once('?').map_or("", |(_, q)| q);
        let decode = |s: &str| -> String {
            let b = s.as_bytes();
            let mut out = Vec::new();
            let mut i = 0;
            while i < b.len() {
                let hex = b
                    .get(i + 1..i + 3)
                    .and_then(|h| std::str::from_utf8(h).ok());
                match (b[i], hex.and_then(|h| u8::from_str_radix(h, 16).ok())) {
                    (b'%', Some(v)) => {
                        out.push(v);
                        i += 3;
                    }
                    (c, _) => {
                        out.push(c);
                        i += 1;
                    }
                }
            }
            String::from_utf8(out).unwrap_or_default()
        };
        q.split('&')
            .filter(|p| !p.is_empty())
            .map(|p| {
                let (k, v) = p.split_once('=').unwrap_or((p, ""));
                (decode(k), decode(v))
            })
            .collect()
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn nacos_login_register_confirm_beat_mark_down_not_found_and_deregister() {
        let t = r#"{ "nacos": { "cluster": "nacos", "namespace": "prod", "username": "u", "password": "p&q" } }"#;
        let c = cfg(t, "").unwrap_or_else(|e| panic!("{e}"));
        let mut r = Registrar::new(&c, 0);
        let login = calls(&mut r, 0);
        assert_eq!(
            (login[0].method, login[0].path.as_str()),
            ("POST", "/nacos/v1/auth/login")
        );
        assert_eq!(login[0].body, b"username=u&password=p%26q");
        assert_eq!(
            answer(
                &mut r,
                0,
                ok(200, r#"{"accessToken":"tk1","tokenTtl":18000}"#),
                5
            ),
            Event::Step
        );
        // Registered as an ephemeral instance, with the heartbeat timings in metadata.
        let reg = calls(&mut r, 5);
        assert_eq!(reg[0].method, "POST");
        assert!(
            reg[0].path.starts_with("/nacos/v1/ns/instance?"),
            "{}",
            reg[0].path
        );
        let q = query(&reg[0]);
        let want = [
            ("namespaceId", "prod"),
            ("serviceName", "web"),
            ("groupName", "DEFAULT_GROUP"),
            ("ip", "10.0.0.7"),
            ("port", "8080"),
            ("clusterName", "z1"),
            ("ephemeral", "true"),
            ("weight", "3"),
            ("enabled", "true"),
            ("accessToken", "tk1"),
        ];
        for (k, v) in want {
            assert_eq!(q.get(k).map(String::as_str), Some(v), "{k} in {q:?}");
        }
        let meta: serde_json::Value =
            serde_json::from_str(&q["metadata"]).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            meta,
            serde_json::json!({"version": "v2", "preserved.heart.beat.interval": "1000",
                "preserved.heart.beat.timeout": "3000", "preserved.ip.delete.timeout": "30000"})
        );
        assert_eq!(
            answer(&mut r, 0, ok(200, "ok"), 10),
            Event::Registered { up: true }
        );
        // The update that states `enabled` follows at once (Nacos 2 keeps metadata
        // set by an earlier update over a new registration's).
        let confirm = calls(&mut r, 10);
        assert_eq!(confirm[0].method, "PUT");
        assert_eq!(
            query(&confirm[0]).get("enabled").map(String::as_str),
            Some("true")
        );
        assert_eq!(answer(&mut r, 0, ok(200, "ok"), 12), Event::Step);
        assert!(
            calls(&mut r, 500).is_empty(),
            "next beat one interval later"
        );
        // Light beats: the grouped service name, no `beat` body.
        let beat = calls(&mut r, 1012);
        assert_eq!(beat[0].method, "PUT");
        assert!(beat[0].path.starts_with("/nacos/v1/ns/instance/beat?"));
        let bq = query(&beat[0]);
        assert_eq!(bq["serviceName"], "DEFAULT_GROUP@@web");
        assert!(!bq.contains_key("beat") && !bq.contains_key("metadata"));
        let beat_ok = r#"{"clientBeatInterval":5000,"code":10200,"lightBeatEnabled":true}"#;
        assert_eq!(answer(&mut r, 0, ok(200, beat_ok), 1015), Event::Heartbeat);
        // A beat answered with something else is a failure, retried.
        calls(&mut r, 2015);
        assert!(matches!(
            answer(&mut r, 0, ok(200, "{}"), 2016),
            Event::Failed(_)
        ));
        // The application fails: `enabled=false` by an update, not a deletion.
        r.on_app_result(0, 2100);
        assert_eq!(r.on_app_result(0, 2200), Some(AppChange::Down));
        let down = r.due(2201);
        let down = &down
            .iter()
            .find(|(w, _)| *w == Who::Target(0))
            .unwrap_or_else(|| panic!("{down:?}"))
            .1;
        assert_eq!(down.method, "PUT");
        assert_eq!(
            query(down).get("enabled").map(String::as_str),
            Some("false")
        );
        assert_eq!(
            answer(&mut r, 0, ok(200, "ok"), 2210),
            Event::Marked { down: true }
        );
        // The token expires: one login, then the beat again at once.
        let beat = r.due(3300);
        assert!(beat.iter().any(|(w, _)| *w == Who::Target(0)), "{beat:?}");
        assert_eq!(
            answer(&mut r, 0, ok(403, "token expired!"), 3301),
            Event::Step
        );
        let relogin = calls(&mut r, 3301);
        assert_eq!(relogin[0].path, "/nacos/v1/auth/login");
        answer(&mut r, 0, ok(200, r#"{"accessToken":"tk2"}"#), 3302);
        let beat = calls(&mut r, 3302);
        assert_eq!(
            query(&beat[0]).get("accessToken").map(String::as_str),
            Some("tk2")
        );
        // 20404: the server does not know the instance → registered again at once,
        // as disabled, and confirmed.
        let gone = r#"{"clientBeatInterval":5000,"code":20404,"lightBeatEnabled":true}"#;
        assert!(matches!(
            answer(&mut r, 0, ok(200, gone), 3303),
            Event::Forgotten(_)
        ));
        let again = calls(&mut r, 3303);
        assert_eq!(again[0].method, "POST");
        assert_eq!(
            query(&again[0]).get("enabled").map(String::as_str),
            Some("false")
        );
        assert_eq!(
            answer(&mut r, 0, ok(200, "ok"), 3304),
            Event::Registered { up: false }
        );
        let confirm = calls(&mut r, 3304);
        assert_eq!(
            (confirm[0].method, query(&confirm[0])["enabled"].as_str()),
            ("PUT", "false")
        );
        answer(&mut r, 0, ok(200, "ok"), 3305);
        let leave = r.leave();
        assert_eq!(leave[0].1.method, "DELETE");
        let lq = query(&leave[0].1);
        assert_eq!(
            (
                lq["serviceName"].as_str(),
                lq["ip"].as_str(),
                lq["port"].as_str(),
                lq["clusterName"].as_str()
            ),
            ("web", "10.0.0.7", "8080", "z1")
        );
        assert_eq!(r.on_leave_answer(0, 200, b"ok"), Event::Deregistered);
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn nacos_v2_answers_and_a_refused_fresh_token_waits() {
        let t = r#"{ "nacos": { "cluster": "nacos", "api": "v2", "cluster_name": "c1", "username": "u", "password": "p" } }"#;
        let c = cfg(t, "").unwrap_or_else(|e| panic!("{e}"));
        let mut r = Registrar::new(&c, 0);
        calls(&mut r, 0);
        answer(&mut r, 0, ok(200, r#"{"accessToken":"tk"}"#), 1);
        let reg = calls(&mut r, 1);
        assert!(reg[0].path.starts_with("/nacos/v2/ns/instance?"));
        assert_eq!(query(&reg[0])["clusterName"], "c1");
        // A token refused before it was ever accepted: no login loop, a retry later.
        assert!(matches!(
            answer(&mut r, 0, ok(403, "authorization failed!"), 2),
            Event::Failed(_)
        ));
        assert!(calls(&mut r, 3).is_empty());
        let login = calls(&mut r, 1002);
        assert_eq!(login[0].path, "/nacos/v1/auth/login");
        answer(&mut r, 0, ok(200, r#"{"accessToken":"tk"}"#), 1003);
        calls(&mut r, 1003);
        // v2 writes answer `{code, message, data}`; "ok" alone is not v2's success.
        assert!(matches!(
            answer(&mut r, 0, ok(200, "ok"), 1004),
            Event::Failed(_)
        ));
        calls(&mut r, 2004);
        assert_eq!(
            answer(
                &mut r,
                0,
                ok(200, r#"{"code":0,"message":"success","data":"ok"}"#),
                2005
            ),
            Event::Registered { up: true }
        );
        calls(&mut r, 2005);
        answer(
            &mut r,
            0,
            ok(200, r#"{"code":0,"message":"success","data":"ok"}"#),
            2006,
        );
        let beat = calls(&mut r, 3006);
        assert!(beat[0].path.starts_with("/nacos/v2/ns/instance/beat?"));
        assert_eq!(
            answer(
                &mut r,
                0,
                ok(200, r#"{"clientBeatInterval":5000,"code":10200}"#),
                3007
            ),
            Event::Heartbeat
        );
        // An update of an instance the server no longer has → registered again.
        r.on_app_result(0, 3100);
        r.on_app_result(0, 3200);
        let down = calls(&mut r, 3201);
        assert_eq!(down[0].method, "PUT");
        assert!(matches!(
            answer(
                &mut r,
                0,
                ok(400, r#"{"code":20004,"message":"instance not exist"}"#),
                3202
            ),
            Event::Forgotten(_)
        ));
        assert_eq!(calls(&mut r, 3202)[0].method, "POST");
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn consul_auth_method_login_and_again_when_the_token_expires() {
        let t = r#"{ "consul": { "cluster": "consul", "auth_method": "kubernetes", "bearer_token": "jwt" } }"#;
        let c = cfg(t, "").unwrap_or_else(|e| panic!("{e}"));
        let mut r = Registrar::new(&c, 0);
        let login = calls(&mut r, 0);
        assert_eq!(
            (login[0].method, login[0].path.as_str()),
            ("POST", "/v1/acl/login")
        );
        assert_eq!(
            json(&login[0]),
            serde_json::json!({"AuthMethod": "kubernetes", "BearerToken": "jwt"})
        );
        assert_eq!(
            answer(
                &mut r,
                0,
                ok(200, r#"{"SecretID":"s1","AccessorID":"a"}"#),
                1
            ),
            Event::Step
        );
        let reg = calls(&mut r, 1);
        assert_eq!(reg[0].path, "/v1/agent/service/register");
        assert!(reg[0]
            .headers
            .contains(&("x-consul-token".into(), "s1".into())));
        assert_eq!(
            answer(&mut r, 0, ok(200, ""), 2),
            Event::Registered { up: true }
        );
        // The token expires: Consul answers 403 "ACL not found"; log in at once.
        let pass = calls(&mut r, 1002);
        assert_eq!(
            pass[0].path,
            "/v1/agent/check/pass/service:web-10-0-0-7-8080"
        );
        assert_eq!(
            answer(&mut r, 0, ok(403, "ACL not found"), 1003),
            Event::Step
        );
        let again = calls(&mut r, 1003);
        assert_eq!(again[0].path, "/v1/acl/login");
        answer(&mut r, 0, ok(200, r#"{"SecretID":"s2"}"#), 1004);
        let pass = calls(&mut r, 1004);
        assert!(pass[0]
            .headers
            .contains(&("x-consul-token".into(), "s2".into())));
        // A token refused before it was ever accepted: a failure and a retry later,
        // not a login loop.
        assert!(matches!(
            answer(&mut r, 0, ok(403, "Permission denied"), 1005),
            Event::Failed(_)
        ));
        assert!(calls(&mut r, 1006).is_empty());
        assert_eq!(calls(&mut r, 2005)[0].path, "/v1/acl/login");
        // A refused login is a failure.
        assert!(matches!(
            answer(&mut r, 0, ok(403, "Permission denied"), 2006),
            Event::Failed(_)
        ));
        let err = |t: &str| cfg(t, "").err().map(|e| e.0);
        assert!(
            err(r#"{ "consul": { "cluster": "c", "auth_method": "k" } }"#)
                .is_some_and(|e| e.starts_with("register.targets[0].consul.auth_method:"))
        );
        assert!(err(r#"{ "consul": { "cluster": "c", "token": "t", "auth_method": "k", "bearer_token": "j" } }"#)
            .is_some_and(|e| e.starts_with("register.targets[0].consul.token:")));
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn nacos_beats_go_on_while_the_update_after_a_registration_keeps_failing() {
        let c = cfg(r#"{ "nacos": { "cluster": "nacos" } }"#, "").unwrap_or_else(|e| panic!("{e}"));
        let mut r = Registrar::new(&c, 0);
        assert_eq!(calls(&mut r, 0)[0].method, "POST");
        assert_eq!(
            answer(&mut r, 0, ok(200, "ok"), 1),
            Event::Registered { up: true }
        );
        // The update fails, again and again (retried within the second).
        let mut now = 1;
        let mut beat_at = None;
        while now < 3_000 && beat_at.is_none() {
            for q in calls(&mut r, now) {
                if q.path.starts_with("/nacos/v1/ns/instance/beat?") {
                    beat_at = Some(now);
                    let b = r#"{"clientBeatInterval":5000,"code":10200}"#;
                    assert_eq!(answer(&mut r, 0, ok(200, b), now), Event::Heartbeat);
                } else {
                    assert_eq!(q.method, "PUT", "{q:?}");
                    assert!(matches!(
                        answer(&mut r, 0, ok(500, "busy"), now),
                        Event::Failed(_)
                    ));
                }
            }
            now += 10;
        }
        // The beat went out on time (heartbeat 1 s after the registration), so the
        // instance does not expire while the update is owed...
        assert!(
            beat_at.is_some_and(|t| (1_001..=1_100).contains(&t)),
            "{beat_at:?}"
        );
        // ...and the update is tried again right after the beat.
        let next = calls(&mut r, beat_at.unwrap_or(0));
        assert_eq!(next[0].method, "PUT", "{next:?}");
        assert_eq!(
            query(&next[0]).get("enabled").map(String::as_str),
            Some("true")
        );
    }
}
