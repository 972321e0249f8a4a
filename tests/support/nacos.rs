//! A fake Nacos server speaking Nacos' HTTP Open API:
//! `GET /nacos/v1/ns/instance/list` (bare service object), `GET /nacos/v2/ns/instance/list`
//! (wrapped in `{code, message, data}`), and `POST /nacos/v1/auth/login` (form body →
//! `{"accessToken","tokenTtl","globalAdmin"}`). With auth on, the list wants the
//! `accessToken` query parameter and answers 403 with Nacos' texts (`user not found!`,
//! `token expired!`, `token invalid!`) otherwise. The protect threshold behaves as in
//! Nacos' `ServiceUtil`: when the healthy share is at or below it, every instance is
//! reported healthy and `reachProtectionThreshold` is true.

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

fn handle(inner: &Inner, req: &Request) -> Option<Response> {
    let mut st = inner.lock();
    if st.log.len() < LOG_CAP {
        st.log.push((req.target.clone(), req.headers.clone()));
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
            if st.credentials.is_some() {
                let token =
                    param("accessToken").or_else(|| req.header("accessToken").map(str::to_string));
                let Some(token) = token else {
                    return Some(Response::text(403, "user not found!"));
                };
                match st.tokens.get(&token) {
                    None => return Some(Response::text(403, "token invalid!")),
                    Some(exp) if *exp <= Instant::now() => {
                        st.expired_token_uses += 1;
                        return Some(Response::text(403, "token expired!"));
                    }
                    Some(_) => {}
                }
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

    pub fn stop(&mut self) {
        self.server.stop();
    }
}
