//! A fake Consul agent for `GET /v1/health/service/<svc>` in the modern (1.21) wire shape,
//! and the agent's registration API: `PUT /v1/agent/service/register` with a TTL
//! `Check`, `PUT /v1/agent/check/{pass,fail}/<check id>` (404 `Unknown check ID` for a
//! check the agent does not know, as current agents answer), `PUT
//! /v1/agent/service/deregister/<id>`. A TTL check not updated in time turns
//! critical; one critical for `DeregisterCriticalServiceAfter` is removed with its
//! service. [`FakeConsul::restart_agent`] forgets what the API registered.

use super::http::{percent_decode, HttpServer, Request, RequestRecord, Response};
use serde_json::{json, Map, Value};
use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

const INITIAL_INDEX: u64 = 10;
const MAX_WAIT: Duration = Duration::from_secs(600);
const DEFAULT_WAIT: Duration = Duration::from_secs(300);
const LOG_CAP: usize = 100_000;
const HEALTH_PREFIX: &str = "/v1/health/service/";

/// One service instance (one service registration on a node).
#[derive(Clone, Debug, PartialEq)]
pub struct ConsulInstance {
    pub id: String,
    /// `Service.Address`; may be "" (clients must then use `Node.Address`).
    pub address: String,
    pub node_address: String,
    pub port: u16,
    pub tags: Vec<String>,
    /// Status of the service check: "passing" | "warning" | "critical".
    pub status: String,
    pub weight_passing: u32,
    pub weight_warning: u32,
    pub meta: Vec<(String, String)>,
}

impl ConsulInstance {
    /// node_address "127.0.0.1", status "passing", weights 1/1, no tags, no meta.
    pub fn new(id: &str, address: &str, port: u16) -> Self {
        ConsulInstance {
            id: id.to_string(),
            address: address.to_string(),
            node_address: "127.0.0.1".to_string(),
            port,
            tags: Vec::new(),
            status: "passing".to_string(),
            weight_passing: 1,
            weight_warning: 1,
            meta: Vec::new(),
        }
    }
    pub fn status(mut self, s: &str) -> Self {
        self.status = s.to_string();
        self
    }
    pub fn tags(mut self, tags: &[&str]) -> Self {
        self.tags = tags.iter().map(|t| t.to_string()).collect();
        self
    }
    pub fn weights(mut self, passing: u32, warning: u32) -> Self {
        self.weight_passing = passing;
        self.weight_warning = warning;
        self
    }
    pub fn node_address(mut self, a: &str) -> Self {
        self.node_address = a.to_string();
        self
    }
    pub fn meta(mut self, k: &str, v: &str) -> Self {
        self.meta.push((k.to_string(), v.to_string()));
        self
    }
}

struct Svc {
    index: u64,
    instances: Vec<ConsulInstance>,
}

struct State {
    services: HashMap<String, Svc>,
    raft_index: u64,
    token: Option<String>,
    datacenter: String,
    stopped: bool,
    health_requests: u64,
    per_path: HashMap<String, u64>,
    log: Vec<RequestRecord>,
    error: Option<(u16, String)>,
    delay: Duration,
    /// ACL auth method: (name, accepted bearer token, token lifetime).
    auth_method: Option<(String, String, Duration)>,
    /// Tokens issued by /v1/acl/login with their expiry.
    logins: Vec<(String, Instant)>,
    /// TTL checks registered through the agent API, by check id.
    agent_checks: HashMap<String, AgentCheck>,
}

struct AgentCheck {
    service: String,
    service_id: String,
    ttl: Duration,
    /// When the check turns critical without an update.
    expires: Instant,
    deregister_after: Option<Duration>,
    critical_since: Option<Instant>,
}

struct Inner {
    m: Mutex<State>,
    cv: Condvar,
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.m.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// See the module docs; every instance is reported on its own node, named after `node_address`.
pub struct FakeConsul {
    pub port: u16,
    inner: Arc<Inner>,
    server: HttpServer,
}

fn node_name(addr: &str) -> String {
    format!("node-{}", addr.replace(['.', ':'], "-"))
}

fn node_id(addr: &str) -> String {
    // Deterministic UUID-shaped id (two FNV-1a hashes of the address).
    let fnv = |salt: u8| {
        let mut h: u64 = 0xcbf29ce484222325;
        for b in addr.bytes().chain(std::iter::once(salt)) {
            h ^= b as u64;
            h = h.wrapping_mul(0x100000001b3);
        }
        h
    };
    let x = format!("{:016x}{:016x}", fnv(1), fnv(2));
    format!(
        "{}-{}-{}-{}-{}",
        &x[0..8],
        &x[8..12],
        &x[12..16],
        &x[16..20],
        &x[20..32]
    )
}

fn entry_json(svc: &str, inst: &ConsulInstance, dc: &str, svc_index: u64) -> Value {
    let node = node_name(&inst.node_address);
    let na = &inst.node_address;
    let mut svc_tagged = Map::new();
    if !inst.address.is_empty() {
        svc_tagged.insert(
            "lan_ipv4".into(),
            json!({"Address": inst.address, "Port": inst.port}),
        );
        svc_tagged.insert(
            "wan_ipv4".into(),
            json!({"Address": inst.address, "Port": inst.port}),
        );
    }
    let meta: Map<String, Value> = inst
        .meta
        .iter()
        .map(|(k, v)| (k.clone(), Value::String(v.clone())))
        .collect();
    json!({
        "Node": {
            "ID": node_id(na),
            "Node": node,
            "Address": na,
            "Datacenter": dc,
            "TaggedAddresses": {"lan": na, "lan_ipv4": na, "wan": na, "wan_ipv4": na},
            "Meta": {"consul-network-segment": "", "consul-version": "1.21.3"},
            "CreateIndex": 5,
            "ModifyIndex": 5
        },
        "Service": {
            "ID": inst.id,
            "Service": svc,
            "Tags": inst.tags,
            "Address": inst.address,
            "TaggedAddresses": Value::Object(svc_tagged),
            "Meta": Value::Object(meta),
            "Port": inst.port,
            "Weights": {"Passing": inst.weight_passing, "Warning": inst.weight_warning},
            "EnableTagOverride": false,
            "Proxy": {"Mode": "", "MeshGateway": {}, "Expose": {}},
            "Connect": {},
            "PeerName": "",
            "CreateIndex": svc_index,
            "ModifyIndex": svc_index
        },
        "Checks": [
            {
                "Node": node,
                "CheckID": "serfHealth",
                "Name": "Serf Health Status",
                "Status": "passing",
                "Notes": "",
                "Output": "Agent alive and reachable",
                "ServiceID": "",
                "ServiceName": "",
                "ServiceTags": [],
                "Type": "",
                "Interval": "",
                "Timeout": "",
                "ExposedPort": 0,
                "Definition": {},
                "CreateIndex": 5,
                "ModifyIndex": 5
            },
            {
                "Node": node,
                "CheckID": format!("service:{}", inst.id),
                "Name": format!("Service '{svc}' check"),
                "Status": inst.status,
                "Notes": "",
                "Output": if inst.status == "passing" { "HTTP GET: 200 OK" } else { "check failing" },
                "ServiceID": inst.id,
                "ServiceName": svc,
                "ServiceTags": inst.tags,
                "Type": "http",
                "Interval": "10s",
                "Timeout": "5s",
                "ExposedPort": 0,
                "Definition": {},
                "CreateIndex": svc_index,
                "ModifyIndex": svc_index
            }
        ]
    })
}

/// Parse a Go-style duration as Consul accepts for `wait`: "30s", "500ms", "1m", "1m30s", "2h".
pub fn parse_wait(s: &str) -> Option<Duration> {
    let s = s.trim();
    if s.is_empty() {
        return None;
    }
    let mut total = Duration::ZERO;
    let mut rest = s;
    let mut parts = 0;
    while !rest.is_empty() {
        parts += 1;
        if parts > 8 {
            return None;
        }
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        if num_len == 0 {
            return None;
        }
        let num: f64 = rest[..num_len].parse().ok()?;
        rest = &rest[num_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let unit = &rest[..unit_len];
        rest = &rest[unit_len..];
        let secs = match unit {
            "ns" => num / 1e9,
            "us" | "µs" => num / 1e6,
            "ms" => num / 1e3,
            "s" => num,
            "m" => num * 60.0,
            "h" => num * 3600.0,
            _ => return None, // Go rejects a bare number ("missing unit")
        };
        total += Duration::from_secs_f64(secs);
    }
    Some(total)
}

fn consul_headers(resp: Response, index: u64) -> Response {
    resp.header("X-Consul-Index", &index.to_string())
        .header("X-Consul-Knownleader", "true")
        .header("X-Consul-Lastcontact", "0")
        .header("X-Consul-Effective-Consistency", "leader")
        .header("X-Consul-Default-Acl-Policy", "allow")
        .header("Vary", "Accept-Encoding")
}

fn svc_index(st: &State, svc: &str) -> u64 {
    st.services
        .get(svc)
        .map(|s| s.index)
        .unwrap_or(INITIAL_INDEX)
}

/// `POST /v1/acl/login` {"AuthMethod", "BearerToken"} → {"SecretID", ...}, as Consul's
/// ACL auth methods answer; a refused login is 403 "Permission denied".
fn acl_login(inner: &Inner, req: &Request) -> Response {
    if !req.method.eq_ignore_ascii_case("POST") {
        return Response::text(405, "method not allowed");
    }
    let body: serde_json::Value = match serde_json::from_slice(&req.body) {
        Ok(v) => v,
        Err(_) => return Response::text(400, "Request decode failed"),
    };
    let mut st = inner.lock();
    let Some((method, bearer, ttl)) = st.auth_method.clone() else {
        return Response::text(403, "Permission denied");
    };
    if body["AuthMethod"] != serde_json::json!(method)
        || body["BearerToken"] != serde_json::json!(bearer)
    {
        return Response::text(403, "Permission denied");
    }
    let secret = format!("login-{}", st.logins.len() + 1);
    st.logins.push((secret.clone(), Instant::now() + ttl));
    let out = serde_json::json!({
        "AccessorID": format!("accessor-{}", st.logins.len()),
        "SecretID": secret,
        "AuthMethod": method,
        "ExpirationTTL": format!("{}s", ttl.as_secs()),
        "Local": true,
    });
    Response::json(200, &out.to_string())
}

fn handle(inner: &Inner, req: &Request) -> Option<Response> {
    let (token_cfg, dc_cfg, error, delay) = {
        let mut st = inner.lock();
        if st.log.len() < LOG_CAP {
            st.log.push((req.target.clone(), req.headers.clone()));
        }
        *st.per_path.entry(req.path.clone()).or_insert(0) += 1;
        if req.path.starts_with(HEALTH_PREFIX) {
            st.health_requests += 1;
        }
        if st.stopped {
            return None;
        }
        (
            st.token.clone(),
            st.datacenter.clone(),
            st.error.clone(),
            st.delay,
        )
    };
    if !delay.is_zero() {
        let guard = inner.lock();
        let deadline = Instant::now() + delay.min(MAX_WAIT);
        let guard = wait_while(inner, guard, deadline, |st| !st.stopped);
        if guard.stopped {
            return None;
        }
    }
    if req.path == "/v1/acl/login" {
        return Some(acl_login(inner, req));
    }
    let login_required = inner.lock().auth_method.is_some();
    if login_required {
        let got = req.header("X-Consul-Token").unwrap_or("").to_string();
        let now = Instant::now();
        let valid = inner
            .lock()
            .logins
            .iter()
            .any(|(t, exp)| *t == got && *exp > now);
        if !valid {
            return Some(Response::text(403, "ACL not found"));
        }
    }
    if req.path.starts_with("/v1/agent/") {
        if let Some(want) = &token_cfg {
            if req.header("X-Consul-Token") != Some(want.as_str()) {
                return Some(Response::text(403, "Permission denied"));
            }
        }
        let resp = agent(inner, req);
        inner.cv.notify_all();
        return Some(resp);
    }
    if !req.method.eq_ignore_ascii_case("GET") && !req.method.eq_ignore_ascii_case("HEAD") {
        return Some(Response::text(405, "method not allowed"));
    }
    let Some(raw_svc) = req.path.strip_prefix(HEALTH_PREFIX) else {
        return Some(Response::text(404, "404 page not found"));
    };
    let svc = percent_decode(raw_svc);
    if svc.is_empty() {
        return Some(Response::text(400, "Missing service name"));
    }
    let params = req.query_params();
    let param = |k: &str| {
        params
            .iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.clone().unwrap_or_default())
    };

    if let Some(want) = &token_cfg {
        let got = req
            .header("X-Consul-Token")
            .map(|s| s.to_string())
            .or_else(|| param("token"))
            .or_else(|| {
                req.header("Authorization")
                    .and_then(|a| a.strip_prefix("Bearer "))
                    .map(|s| s.trim().to_string())
            });
        if got.as_deref() != Some(want.as_str()) {
            return Some(Response::text(403, "ACL not found"));
        }
    }
    if let Some(dc) = param("dc") {
        if !dc.is_empty() && dc != dc_cfg {
            return Some(Response::text(500, "No path to datacenter"));
        }
    }
    if let Some((code, body)) = error {
        return Some(Response::text(code, &body));
    }
    let passing = match param("passing") {
        None => false,
        Some(v) => match v.to_ascii_lowercase().as_str() {
            "" | "true" | "1" | "t" => true,
            "false" | "0" | "f" => false,
            _ => return Some(Response::text(400, "Invalid value for ?passing")),
        },
    };
    let tags: Vec<String> = params
        .iter()
        .filter(|(n, _)| n == "tag")
        .map(|(_, v)| v.clone().unwrap_or_default())
        .collect();
    let index = match param("index") {
        None => None,
        Some(v) => match v.parse::<u64>() {
            Ok(n) => Some(n),
            Err(_) => return Some(Response::text(400, "Invalid index")),
        },
    };
    let wait = match param("wait") {
        None => DEFAULT_WAIT,
        Some(v) => match parse_wait(&v) {
            Some(d) => d.min(MAX_WAIT),
            None => return Some(Response::text(400, "Invalid wait time")),
        },
    };

    let mut st = inner.lock();
    if let Some(n) = index {
        let cur = svc_index(&st, &svc);
        // index > current: Consul resets to 0 and answers at once.
        if n > 0 && n <= cur {
            // Consul adds a random stagger of up to wait/16 (its `JitterFraction`).
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.subsec_nanos())
                .unwrap_or(0);
            let stagger = wait / 16 * (nanos % 1000) / 1000;
            let deadline = Instant::now() + wait + stagger;
            st = wait_while(inner, st, deadline, |s| {
                !s.stopped && svc_index(s, &svc) <= n
            });
        }
    }
    if st.stopped {
        return None;
    }
    let dc = st.datacenter.clone();
    let idx = svc_index(&st, &svc);
    let entries: Vec<Value> = st
        .services
        .get(&svc)
        .map(|s| {
            s.instances
                .iter()
                .filter(|i| !passing || i.status == "passing")
                .filter(|i| tags.iter().all(|t| i.tags.contains(t)))
                .map(|i| entry_json(&svc, i, &dc, s.index))
                .collect()
        })
        .unwrap_or_default();
    drop(st);
    let body = serde_json::to_string(&entries).unwrap_or_else(|_| "[]".into());
    Some(consul_headers(Response::json(200, &body), idx))
}

/// Sets `status` of service instance `id` of `svc`; bumps the index on a change.
fn set_instance_status(st: &mut State, svc: &str, id: &str, status: &str) {
    let Some(s) = st.services.get_mut(svc) else {
        return;
    };
    let mut changed = false;
    for i in s.instances.iter_mut().filter(|i| i.id == id) {
        changed |= i.status != status;
        i.status = status.to_string();
    }
    if changed {
        st.raft_index += 1;
        let index = st.raft_index;
        if let Some(s) = st.services.get_mut(svc) {
            s.index = index;
        }
    }
}

/// Removes service instance `id` of `svc` (bumps the index when it was there).
fn remove_instance(st: &mut State, svc: &str, id: &str) -> bool {
    let Some(s) = st.services.get_mut(svc) else {
        return false;
    };
    let before = s.instances.len();
    s.instances.retain(|i| i.id != id);
    if s.instances.len() == before {
        return false;
    }
    st.raft_index += 1;
    let index = st.raft_index;
    if let Some(s) = st.services.get_mut(svc) {
        s.index = index;
    }
    true
}

/// TTL checks past their deadline turn critical; critical ones past
/// `DeregisterCriticalServiceAfter` are removed with their service.
fn expire_checks(st: &mut State) {
    let now = Instant::now();
    let mut critical = Vec::new();
    let mut removed = Vec::new();
    for (id, c) in st.agent_checks.iter_mut() {
        if now >= c.expires && c.critical_since.is_none() {
            c.critical_since = Some(c.expires);
            critical.push((c.service.clone(), c.service_id.clone()));
        }
        if let (Some(since), Some(after)) = (c.critical_since, c.deregister_after) {
            if now >= since + after {
                removed.push((id.clone(), c.service.clone(), c.service_id.clone()));
            }
        }
    }
    for (svc, id) in critical {
        set_instance_status(st, &svc, &id, "critical");
    }
    for (check, svc, id) in removed {
        st.agent_checks.remove(&check);
        remove_instance(st, &svc, &id);
    }
}

/// The agent registration API (see the module docs).
fn agent(inner: &Inner, req: &Request) -> Response {
    if !req.method.eq_ignore_ascii_case("PUT") {
        return Response::text(405, "method not allowed");
    }
    let mut st = inner.lock();
    if req.path == "/v1/agent/service/register" {
        let b: Value = match serde_json::from_slice(&req.body) {
            Ok(v) => v,
            Err(e) => return Response::text(400, &format!("Request decode failed: {e}")),
        };
        let (Some(name), Some(port)) = (b["Name"].as_str(), b["Port"].as_u64()) else {
            return Response::text(400, "Invalid service: missing Name or Port");
        };
        let id = b["ID"].as_str().unwrap_or(name).to_string();
        let mut inst = ConsulInstance::new(&id, b["Address"].as_str().unwrap_or(""), port as u16)
            .weights(
                b["Weights"]["Passing"].as_u64().unwrap_or(1) as u32,
                b["Weights"]["Warning"].as_u64().unwrap_or(1) as u32,
            );
        if let Some(meta) = b["Meta"].as_object() {
            for (k, v) in meta {
                inst = inst.meta(k, v.as_str().unwrap_or(""));
            }
        }
        let check = &b["Check"];
        if let Some(ttl) = check["TTL"].as_str() {
            let Some(ttl) = parse_wait(ttl) else {
                return Response::text(400, "Invalid check: TTL");
            };
            // A TTL check starts critical unless its Status says otherwise.
            let status = check["Status"].as_str().unwrap_or("critical");
            inst.status = status.to_string();
            let check_id = check["CheckID"]
                .as_str()
                .map_or_else(|| format!("service:{id}"), str::to_string);
            let now = Instant::now();
            st.agent_checks.insert(
                check_id,
                AgentCheck {
                    service: name.to_string(),
                    service_id: id.clone(),
                    ttl,
                    expires: now + ttl,
                    deregister_after: check["DeregisterCriticalServiceAfter"]
                        .as_str()
                        .and_then(parse_wait),
                    critical_since: (status == "critical").then_some(now),
                },
            );
        }
        let mut v = st
            .services
            .get(name)
            .map(|s| s.instances.clone())
            .unwrap_or_default();
        v.retain(|i| i.id != id);
        v.push(inst);
        st.raft_index += 1;
        let index = st.raft_index;
        st.services.insert(
            name.to_string(),
            Svc {
                index,
                instances: v,
            },
        );
        return Response::new(200, "");
    }
    for (prefix, status) in [
        ("/v1/agent/check/pass/", "passing"),
        ("/v1/agent/check/fail/", "critical"),
        ("/v1/agent/check/warn/", "warning"),
    ] {
        let Some(raw) = req.path.strip_prefix(prefix) else {
            continue;
        };
        let check_id = percent_decode(raw);
        let Some(c) = st.agent_checks.get_mut(&check_id) else {
            return Response::text(
                404,
                &format!("Unknown check ID \"{check_id}\". Ensure that the check ID is passed, not the check name."),
            );
        };
        c.expires = Instant::now() + c.ttl;
        c.critical_since = (status == "critical").then(Instant::now);
        let (svc, id) = (c.service.clone(), c.service_id.clone());
        set_instance_status(&mut st, &svc, &id, status);
        return Response::new(200, "");
    }
    if let Some(raw) = req.path.strip_prefix("/v1/agent/service/deregister/") {
        let id = percent_decode(raw);
        let svc = st
            .agent_checks
            .values()
            .find(|c| c.service_id == id)
            .map(|c| c.service.clone())
            .or_else(|| {
                st.services
                    .iter()
                    .find(|(_, s)| s.instances.iter().any(|i| i.id == id))
                    .map(|(n, _)| n.clone())
            });
        let Some(svc) = svc else {
            return Response::text(404, &format!("Unknown service ID \"{id}\""));
        };
        st.agent_checks.retain(|_, c| c.service_id != id);
        remove_instance(&mut st, &svc, &id);
        return Response::new(200, "");
    }
    Response::text(404, "404 page not found")
}

/// Wait on the condvar while `cond` holds, until `deadline`. Bounded by the deadline.
fn wait_while<'a>(
    inner: &'a Inner,
    mut g: MutexGuard<'a, State>,
    deadline: Instant,
    cond: impl Fn(&State) -> bool,
) -> MutexGuard<'a, State> {
    while cond(&g) {
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        g = match inner.cv.wait_timeout(g, deadline - now) {
            Ok((g, _)) => g,
            Err(p) => p.into_inner().0,
        };
    }
    g
}

impl FakeConsul {
    /// On a free port.
    pub fn start() -> FakeConsul {
        Self::start_on(0)
    }

    pub fn start_on(port: u16) -> FakeConsul {
        let inner = Arc::new(Inner {
            m: Mutex::new(State {
                services: HashMap::new(),
                raft_index: INITIAL_INDEX,
                token: None,
                auth_method: None,
                logins: Vec::new(),
                agent_checks: HashMap::new(),
                datacenter: "dc1".to_string(),
                stopped: false,
                health_requests: 0,
                per_path: HashMap::new(),
                log: Vec::new(),
                error: None,
                delay: Duration::ZERO,
            }),
            cv: Condvar::new(),
        });
        let i2 = inner.clone();
        // TTL checks expire on their own, waking blocked queries; bounded by `stop`.
        let i3 = inner.clone();
        std::thread::spawn(move || loop {
            std::thread::sleep(Duration::from_millis(20));
            let mut st = i3.lock();
            if st.stopped {
                break;
            }
            let before = st.raft_index;
            expire_checks(&mut st);
            let moved = st.raft_index != before;
            drop(st);
            if moved {
                i3.cv.notify_all();
            }
        });
        let server = HttpServer::start(port, Arc::new(move |req| handle(&i2, req)))
            .unwrap_or_else(|e| panic!("fake consul: cannot bind 127.0.0.1:{port}: {e}"));
        FakeConsul {
            port: server.port,
            inner,
            server,
        }
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Require a token from `POST /v1/acl/login` with this auth method and bearer
    /// token; issued tokens expire after `ttl`.
    pub fn set_auth_method(&self, method: &str, bearer: &str, ttl: Duration) {
        self.inner.lock().auth_method = Some((method.to_string(), bearer.to_string(), ttl));
    }

    /// Tokens issued by ACL logins so far.
    pub fn logins(&self) -> usize {
        self.inner.lock().logins.len()
    }

    /// Require this ACL token (None = no ACLs).
    pub fn set_token(&self, token: Option<&str>) {
        self.inner.lock().token = token.map(|s| s.to_string());
    }

    /// The agent's datacenter (default "dc1"); `?dc=` naming another gives 500.
    pub fn set_datacenter(&self, dc: &str) {
        self.inner.lock().datacenter = dc.to_string();
    }

    /// Replace the instances of `svc`; bumps its index and wakes blocked queries.
    pub fn set_service(&self, svc: &str, instances: Vec<ConsulInstance>) {
        self.update_service(svc, |v| *v = instances);
    }

    /// Edit the instances of `svc` in place (bumps the index, wakes blocked queries).
    pub fn update_service(&self, svc: &str, f: impl FnOnce(&mut Vec<ConsulInstance>)) {
        let mut st = self.inner.lock();
        let mut v = st
            .services
            .get(svc)
            .map(|s| s.instances.clone())
            .unwrap_or_default();
        f(&mut v);
        st.raft_index += 1;
        let index = st.raft_index;
        st.services.insert(
            svc.to_string(),
            Svc {
                index,
                instances: v,
            },
        );
        drop(st);
        self.inner.cv.notify_all();
    }

    /// Set the service-check status of one instance ("passing" | "warning" | "critical").
    pub fn set_status(&self, svc: &str, id: &str, status: &str) {
        self.update_service(svc, |v| {
            for i in v.iter_mut().filter(|i| i.id == id) {
                i.status = status.to_string();
            }
        });
    }

    /// Current X-Consul-Index of `svc` (10 for a service never set).
    pub fn index(&self, svc: &str) -> u64 {
        svc_index(&self.inner.lock(), svc)
    }

    /// Answer every health query with this status and text body (after ACL/dc checks);
    /// None restores normal answers. Blocking is skipped while set.
    pub fn set_error(&self, err: Option<(u16, &str)>) {
        self.inner.lock().error = err.map(|(c, b)| (c, b.to_string()));
    }

    /// Delay every answer by `d` (before any blocking wait).
    pub fn set_delay(&self, d: Duration) {
        self.inner.lock().delay = d;
    }

    /// Total requests to /v1/health/service/*.
    pub fn requests(&self) -> u64 {
        self.inner.lock().health_requests
    }

    /// Requests to an exact path (without query), e.g. "/v1/health/service/web".
    pub fn requests_for(&self, path: &str) -> u64 {
        self.inner.lock().per_path.get(path).copied().unwrap_or(0)
    }

    /// Every request as (path?query, headers as sent), oldest first.
    pub fn request_log(&self) -> Vec<RequestRecord> {
        self.inner.lock().log.clone()
    }

    /// The agent restarts without its state: services and checks registered through
    /// the API are forgotten (removed from the catalog too).
    pub fn restart_agent(&self) {
        let mut st = self.inner.lock();
        let checks: Vec<(String, String)> = st
            .agent_checks
            .drain()
            .map(|(_, c)| (c.service, c.service_id))
            .collect();
        for (svc, id) in checks {
            remove_instance(&mut st, &svc, &id);
        }
        drop(st);
        self.inner.cv.notify_all();
    }

    /// The instances of `svc` as (id, status).
    pub fn instances(&self, svc: &str) -> Vec<(String, String)> {
        self.inner
            .lock()
            .services
            .get(svc)
            .map(|s| {
                s.instances
                    .iter()
                    .map(|i| (i.id.clone(), i.status.clone()))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Close the listener and all connections; blocked queries end without an answer.
    pub fn stop(&mut self) {
        self.inner.lock().stopped = true;
        self.inner.cv.notify_all();
        self.server.stop();
    }
}

impl Drop for FakeConsul {
    fn drop(&mut self) {
        self.stop();
    }
}
