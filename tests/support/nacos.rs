//! A fake Nacos server speaking Nacos' HTTP Open API:
//! `GET /nacos/v1/ns/instance/list` (bare service object), `GET /nacos/v2/ns/instance/list`
//! (wrapped in `{code, message, data}`), and `POST /nacos/v1/auth/login` (form body →
//! `{"accessToken","tokenTtl","globalAdmin"}`). With auth on, the list wants the
//! `accessToken` query parameter and answers 403 with Nacos' texts (`user not found!`,
//! `token expired!`, `token invalid!`) otherwise. The protect threshold behaves as in
//! Nacos' `ServiceUtil`: when the healthy share is at or below it, every instance is
//! reported healthy and `reachProtectionThreshold` is true.
//!
//! Registration, as Nacos' `InstanceController` (v1) and `InstanceControllerV2`:
//! `POST /nacos/{v1,v2}/ns/instance` registers (or replaces) an ephemeral
//! instance, `PUT` updates it (`enabled`; remembered per instance and applied over
//! a later registration, as Nacos 2 keeps metadata set by an update), `DELETE`
//! removes it, `PUT .../instance/beat` (light beat; the service name must be
//! `group@@service`) answers `{"clientBeatInterval","code":10200|20404,...}`. v1
//! writes answer `ok`, v2 ones `{"code":0,"message":"success","data":"ok"}`. A
//! registered instance turns unhealthy after `preserved.heart.beat.timeout` ms
//! without a beat (default 15000) and is deleted after `preserved.ip.delete.timeout`
//! (default 30000). Nacos checks these every 5 s; the stand-in checks them at
//! every request, so its timings are the timeouts without the 5 s check period.

use super::http::{HttpServer, Request, RequestRecord, Response};
use serde_json::{json, Map, Value};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const LOG_CAP: usize = 100_000;

/// One registered instance.
#[derive(Clone, Debug, PartialEq)]
pub struct NacosInstance {
    pub ip: String,
    pub port: u16,
    pub weight: f64,
    pub healthy: bool,
    pub enabled: bool,
    pub cluster: String,
    pub metadata: Vec<(String, String)>,
    /// Registered through the API: kept by heartbeats.
    pub beat: Option<Beat>,
}

/// Heartbeat state of a registered ephemeral instance.
#[derive(Clone, Debug, PartialEq)]
pub struct Beat {
    pub last: Instant,
    pub timeout: Duration,
    pub delete: Duration,
}

impl NacosInstance {
    /// Weight 1.0, healthy, enabled, cluster `DEFAULT`.
    pub fn new(ip: &str, port: u16) -> Self {
        NacosInstance {
            ip: ip.to_string(),
            port,
            weight: 1.0,
            healthy: true,
            enabled: true,
            cluster: "DEFAULT".to_string(),
            metadata: Vec::new(),
            beat: None,
        }
    }
    pub fn weight(mut self, w: f64) -> Self {
        self.weight = w;
        self
    }
    pub fn healthy(mut self, h: bool) -> Self {
        self.healthy = h;
        self
    }
    pub fn enabled(mut self, e: bool) -> Self {
        self.enabled = e;
        self
    }
    pub fn cluster(mut self, c: &str) -> Self {
        self.cluster = c.to_string();
        self
    }
    pub fn meta(mut self, k: &str, v: &str) -> Self {
        self.metadata.push((k.to_string(), v.to_string()));
        self
    }
}

#[derive(Default)]
struct Svc {
    instances: Vec<NacosInstance>,
    protect_threshold: f64,
}

#[derive(Default)]
struct State {
    /// (namespace, group, service) → service.
    services: HashMap<(String, String, String), Svc>,
    credentials: Option<(String, String)>,
    token_ttl: Duration,
    /// token → expiry.
    tokens: HashMap<String, Instant>,
    logins: u64,
    list_requests: u64,
    expired_token_uses: u64,
    log: Vec<RequestRecord>,
    error: Option<(u16, String)>,
    /// `enabled` set by updates: (namespace, group, service, ip, port, cluster).
    updates: HashMap<(String, String, String, String, u16, String), bool>,
    beats: u64,
}

struct Inner {
    m: super::Locked<State>,
    seq: AtomicU64,
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.m.lock()
    }
}

pub struct FakeNacos {
    pub port: u16,
    inner: Arc<Inner>,
    server: HttpServer,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn host_json(svc_key: &str, i: &NacosInstance, healthy: bool) -> Value {
    let meta: Map<String, Value> = i
        .metadata
        .iter()
        .map(|(k, v)| (k.clone(), Value::String(v.clone())))
        .collect();
    json!({
        "instanceId": format!("{}#{}#{}#{}", i.ip, i.port, i.cluster, svc_key),
        "ip": i.ip,
        "port": i.port,
        "weight": i.weight,
        "healthy": healthy,
        "enabled": i.enabled,
        "ephemeral": true,
        "clusterName": i.cluster,
        "serviceName": svc_key,
        "metadata": Value::Object(meta),
        "instanceHeartBeatInterval": 5000,
        "instanceIdGenerator": "simple",
        "instanceHeartBeatTimeOut": 15000,
        "ipDeleteTimeout": 30000
    })
}

/// Nacos' answer to a request without a valid token, if auth is on.
fn refuse(st: &mut State, token: Option<String>) -> Option<Response> {
    st.credentials.as_ref()?;
    let Some(token) = token else {
        return Some(Response::text(403, "user not found!"));
    };
    match st.tokens.get(&token) {
        None => Some(Response::text(403, "token invalid!")),
        Some(exp) if *exp <= Instant::now() => {
            st.expired_token_uses += 1;
            Some(Response::text(403, "token expired!"))
        }
        Some(_) => None,
    }
}

/// Unhealthy after the beat timeout, deleted after the delete timeout.
fn expire(st: &mut State) {
    let now = Instant::now();
    for svc in st.services.values_mut() {
        svc.instances.retain(|i| {
            i.beat
                .as_ref()
                .map_or(true, |b| now.duration_since(b.last) <= b.delete)
        });
        for i in &mut svc.instances {
            if let Some(b) = &i.beat {
                if now.duration_since(b.last) > b.timeout {
                    i.healthy = false;
                }
            }
        }
    }
}

fn ok_answer(v2: bool) -> Response {
    if v2 {
        Response::json(200, r#"{"code":0,"message":"success","data":"ok"}"#)
    } else {
        Response::text(200, "ok")
    }
}

/// Register, update, deregister and beat (`op`: the path after `/ns/instance`).
fn handle_write(st: &mut State, req: &Request, v2: bool, op: &str) -> Response {
    let params = req.query_params();
    let param = |k: &str| {
        params
            .iter()
            .find(|(n, _)| n == k)
            .and_then(|(_, v)| v.clone())
            .filter(|v| !v.is_empty())
    };
    if let Some(r) = refuse(st, param("accessToken")) {
        return r;
    }
    let Some(name) = param("serviceName") else {
        return Response::text(400, "Param 'serviceName' is required.");
    };
    let (group, service) =
        match name.split_once("@@") {
            Some((g, s)) => (g.to_string(), s.to_string()),
            None if op == "/beat" => return Response::text(
                400,
                "Param 'serviceName' is illegal, it should be format as 'groupName@@serviceName'",
            ),
            None => (
                param("groupName").unwrap_or_else(|| "DEFAULT_GROUP".into()),
                name,
            ),
        };
    let ns = param("namespaceId").unwrap_or_else(|| "public".into());
    let cluster = param("clusterName").unwrap_or_else(|| "DEFAULT".into());
    let (Some(ip), Some(port)) = (
        param("ip"),
        param("port").and_then(|p| p.parse::<u16>().ok()),
    ) else {
        return Response::text(400, "Param 'ip' and 'port' are required.");
    };
    let key = (ns.clone(), group.clone(), service.clone());
    let same = |i: &NacosInstance| i.ip == ip && i.port == port && i.cluster == cluster;
    let ukey = (ns, group, service, ip.clone(), port, cluster.clone());
    match (req.method.as_str(), op) {
        ("POST", "") => {
            let meta: Vec<(String, String)> = param("metadata")
                .and_then(|m| serde_json::from_str::<HashMap<String, String>>(&m).ok())
                .map(|m| m.into_iter().collect())
                .unwrap_or_default();
            let ms = |k: &str, d: u64| {
                meta.iter()
                    .find(|(n, _)| n == k)
                    .and_then(|(_, v)| v.parse::<u64>().ok())
                    .map_or(Duration::from_millis(d), Duration::from_millis)
            };
            let ephemeral = param("ephemeral").map_or(true, |e| e != "false");
            let enabled = st
                .updates
                .get(&ukey)
                .copied()
                .unwrap_or_else(|| param("enabled").map_or(true, |e| e != "false"));
            let inst = NacosInstance {
                ip: ip.clone(),
                port,
                weight: param("weight").and_then(|w| w.parse().ok()).unwrap_or(1.0),
                healthy: param("healthy").map_or(true, |h| h != "false"),
                enabled,
                cluster: cluster.clone(),
                beat: ephemeral.then(|| Beat {
                    last: Instant::now(),
                    timeout: ms("preserved.heart.beat.timeout", 15_000),
                    delete: ms("preserved.ip.delete.timeout", 30_000),
                }),
                metadata: meta,
            };
            let svc = st.services.entry(key).or_default();
            svc.instances.retain(|i| !same(i));
            svc.instances.push(inst);
            ok_answer(v2)
        }
        ("PUT", "") => {
            let Some(svc) = st.services.get_mut(&key) else {
                return Response::text(
                    400,
                    &format!("caused: service not found, service: {}@@{};", key.1, key.2),
                );
            };
            let enabled = param("enabled").map_or(true, |e| e != "false");
            for i in svc.instances.iter_mut().filter(|i| same(i)) {
                i.enabled = enabled;
            }
            st.updates.insert(ukey, enabled);
            ok_answer(v2)
        }
        ("DELETE", "") => {
            if let Some(svc) = st.services.get_mut(&key) {
                svc.instances.retain(|i| !same(i));
            }
            ok_answer(v2)
        }
        ("PUT", "/beat") => {
            st.beats += 1;
            let found = st.services.get_mut(&key).and_then(|svc| {
                svc.instances
                    .iter_mut()
                    .find(|i| same(i) && i.beat.is_some())
            });
            let code = match found {
                Some(i) => {
                    if let Some(b) = &mut i.beat {
                        b.last = Instant::now();
                    }
                    i.healthy = true;
                    10200
                }
                None => 20404,
            };
            Response::json(
                200,
                &json!({"clientBeatInterval": 5000, "code": code, "lightBeatEnabled": true})
                    .to_string(),
            )
        }
        _ => Response::text(405, "Method Not Allowed"),
    }
}

fn handle(inner: &Inner, req: &Request) -> Option<Response> {
    let mut st = inner.lock();
    if st.log.len() < LOG_CAP {
        st.log.push((req.target.clone(), req.headers.clone()));
    }
    expire(&mut st);
    for v in ["v1", "v2"] {
        let base = format!("/nacos/{v}/ns/instance");
        if let Some(op) = req.path.strip_prefix(&base) {
            if op.is_empty() || op == "/beat" {
                return Some(handle_write(&mut st, req, v == "v2", op));
            }
        }
    }
    match (req.method.as_str(), req.path.as_str()) {
        ("POST", "/nacos/v1/auth/login") => {
            // Nacos reads the form body (and query parameters).
            let mut form: HashMap<String, String> = url::form_urlencoded::parse(&req.body)
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect();
            for (k, v) in req.query_params() {
                form.entry(k).or_insert(v.unwrap_or_default());
            }
            let ok = match &st.credentials {
                Some((u, p)) => form.get("username") == Some(u) && form.get("password") == Some(p),
                None => false,
            };
            if !ok {
                return Some(Response::text(403, "unknown user!"));
            }
            st.logins += 1;
            let token = format!(
                "fake-nacos-token-{}-{}",
                inner.seq.fetch_add(1, Ordering::SeqCst),
                now_ms()
            );
            let ttl = st.token_ttl;
            st.tokens.insert(token.clone(), Instant::now() + ttl);
            let body =
                json!({"accessToken": token, "tokenTtl": ttl.as_secs(), "globalAdmin": true});
            Some(Response::json(200, &body.to_string()))
        }
        ("GET", "/nacos/v1/ns/instance/list") | ("GET", "/nacos/v2/ns/instance/list") => {
            let v2 = req.path.starts_with("/nacos/v2/");
            st.list_requests += 1;
            let params = req.query_params();
            let param = |k: &str| {
                params
                    .iter()
                    .find(|(n, _)| n == k)
                    .and_then(|(_, v)| v.clone())
            };
            let token =
                param("accessToken").or_else(|| req.header("accessToken").map(str::to_string));
            if let Some(r) = refuse(&mut st, token) {
                return Some(r);
            }
            if let Some((code, body)) = &st.error {
                return Some(Response::text(*code, body));
            }
            let Some(service) = param("serviceName").filter(|s| !s.is_empty()) else {
                return Some(if v2 {
                    Response::json(
                        400,
                        r#"{"code":10000,"message":"Required parameter 'serviceName' type String is not present","data":null}"#,
                    )
                } else {
                    Response::text(400, "Param 'serviceName' is required.")
                });
            };
            let group = param("groupName")
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| "DEFAULT_GROUP".into());
            let ns = param("namespaceId")
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| "public".into());
            let clusters_param = if v2 { "clusterName" } else { "clusters" };
            let clusters: Vec<String> = param(clusters_param)
                .unwrap_or_default()
                .split(',')
                .filter(|c| !c.is_empty())
                .map(str::to_string)
                .collect();
            let healthy_only = param("healthyOnly").is_some_and(|v| v.eq_ignore_ascii_case("true"));
            let svc_key = format!("{group}@@{service}");
            let (instances, threshold) = st
                .services
                .get(&(ns, group.clone(), service.clone()))
                .map(|s| (s.instances.clone(), s.protect_threshold))
                .unwrap_or_default();
            drop(st);
            let selected: Vec<&NacosInstance> = instances
                .iter()
                .filter(|i| clusters.is_empty() || clusters.contains(&i.cluster))
                .collect();
            let total = selected.len();
            let healthy_count = selected.iter().filter(|i| i.healthy).count();
            // ServiceUtil.selectInstancesWithHealthyProtection: at or below the threshold,
            // every instance is reported healthy.
            let reach = total > 0 && (healthy_count as f64 / total as f64) <= threshold;
            let hosts: Vec<Value> = selected
                .iter()
                .map(|i| (i, i.healthy || reach))
                .filter(|(_, h)| !healthy_only || *h)
                .map(|(i, h)| host_json(&svc_key, i, h))
                .collect();
            let data = json!({
                "name": svc_key,
                "groupName": group,
                "clusters": clusters.join(","),
                "cacheMillis": 10000,
                "hosts": hosts,
                "lastRefTime": now_ms(),
                "checksum": "",
                "allIPs": false,
                "reachProtectionThreshold": reach,
                "valid": true
            });
            let body = if v2 {
                json!({"code": 0, "message": "success", "data": data})
            } else {
                data
            };
            Some(Response::json(200, &body.to_string()))
        }
        _ => Some(Response::text(404, "Not Found")),
    }
}

impl FakeNacos {
    pub fn start() -> FakeNacos {
        let inner = Arc::new(Inner {
            m: super::Locked::new(State {
                token_ttl: Duration::from_secs(18_000),
                ..Default::default()
            }),
            seq: AtomicU64::new(1),
        });
        let i2 = inner.clone();
        let server = HttpServer::start(0, Arc::new(move |req| handle(&i2, req)))
            .unwrap_or_else(|e| panic!("fake nacos: cannot bind: {e}"));
        FakeNacos {
            port: server.port,
            inner,
            server,
        }
    }

    /// Turn auth on (`nacos.core.auth.enabled=true`) with one user, and a token TTL.
    pub fn set_auth(&self, username: &str, password: &str, token_ttl: Duration) {
        let mut st = self.inner.lock();
        st.credentials = Some((username.to_string(), password.to_string()));
        st.token_ttl = token_ttl;
    }

    /// Forget every issued token (as after a restart with a new secret key).
    pub fn revoke_tokens(&self) {
        self.inner.lock().tokens.clear();
    }

    /// Replace the instances of `service` in namespace `public`, group `DEFAULT_GROUP`.
    pub fn set_service(&self, service: &str, instances: Vec<NacosInstance>) {
        self.set_service_in("public", "DEFAULT_GROUP", service, instances);
    }

    pub fn set_service_in(
        &self,
        namespace: &str,
        group: &str,
        service: &str,
        instances: Vec<NacosInstance>,
    ) {
        let mut st = self.inner.lock();
        let svc = st
            .services
            .entry((
                namespace.to_string(),
                group.to_string(),
                service.to_string(),
            ))
            .or_default();
        svc.instances = instances;
    }

    /// The service's protect threshold (0..1; Nacos' default 0 never triggers).
    pub fn set_protect_threshold(&self, service: &str, threshold: f64) {
        let mut st = self.inner.lock();
        st.services
            .entry((
                "public".to_string(),
                "DEFAULT_GROUP".to_string(),
                service.to_string(),
            ))
            .or_default()
            .protect_threshold = threshold;
    }

    /// Answer every list call (after the auth check) with this status and text.
    pub fn set_error(&self, err: Option<(u16, &str)>) {
        self.inner.lock().error = err.map(|(c, b)| (c, b.to_string()));
    }

    pub fn logins(&self) -> u64 {
        self.inner.lock().logins
    }

    pub fn list_requests(&self) -> u64 {
        self.inner.lock().list_requests
    }

    /// List calls refused because their token had expired.
    pub fn expired_token_uses(&self) -> u64 {
        self.inner.lock().expired_token_uses
    }

    /// Every request as (path?query, headers), oldest first.
    pub fn request_log(&self) -> Vec<RequestRecord> {
        self.inner.lock().log.clone()
    }

    /// Instances registered through the API in `service` (public, DEFAULT_GROUP):
    /// (ip, port, enabled, healthy), after applying the heartbeat timeouts.
    pub fn registered(&self, service: &str) -> Vec<(String, u16, bool, bool)> {
        let mut st = self.inner.lock();
        expire(&mut st);
        st.services
            .get(&(
                "public".to_string(),
                "DEFAULT_GROUP".to_string(),
                service.to_string(),
            ))
            .map(|s| {
                s.instances
                    .iter()
                    .filter(|i| i.beat.is_some())
                    .map(|i| (i.ip.clone(), i.port, i.enabled, i.healthy))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Heartbeats received.
    pub fn beats(&self) -> u64 {
        self.inner.lock().beats
    }

    /// A restart: ephemeral instances and remembered updates are gone (tokens,
    /// signed with the server's key, stay valid).
    pub fn restart(&self) {
        let mut st = self.inner.lock();
        for svc in st.services.values_mut() {
            svc.instances.retain(|i| i.beat.is_none());
        }
        st.updates.clear();
    }

    pub fn stop(&mut self) {
        self.server.stop();
    }
}
