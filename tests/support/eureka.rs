//! A fake Eureka server: `GET <prefix>/apps/<APP>` and `GET <prefix>/apps` (every
//! application with instances, as `{"applications":{"versions__delta":…,
//! "apps__hashcode":"UP_3_",…,"application":[…]}}`) as Eureka's REST API answers them.
//! JSON only when `Accept` mentions json (XML otherwise, as Eureka's resources do);
//! 404 with an empty body for an application it does not know (or that has lost its
//! last instance); optional HTTP basic auth (401 with `WWW-Authenticate`, as Spring
//! Security answers). Two wire shapes:
//! - `Modern`: the Jackson codec of Eureka 1.x today — `instance` always an array,
//!   `port.$` a number, `@enabled` a string, an empty metadata map written as
//!   `{"@class":"java.util.Collections$EmptyMap"}`;
//! - `Old`: the older XStream/Jettison codec — `port.$` a string, and a single
//!   instance written as an object instead of an array.
//!
//! Registration, as Eureka's REST operations: `POST <prefix>/apps/<APP>` with
//! `{"instance":{…}}` → 204; renew `PUT <prefix>/apps/<APP>/<id>` → 200, or 404 for an
//! instance it does not know; `PUT …/<id>/status?value=DOWN|UP` → 200 / 404; `DELETE
//! …/<id>` → 200 / 404. An instance not renewed within its `leaseInfo.durationInSecs`
//! is evicted at once (the real server's eviction task runs every 60 s by default and
//! self-preservation may hold it back). [`FakeEureka::restart`] forgets registrations.

use super::http::{HttpServer, Request, RequestRecord, Response};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use serde_json::{json, Map, Value};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

const LOG_CAP: usize = 100_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shape {
    Modern,
    Old,
}

#[derive(Clone, Debug, PartialEq)]
pub struct EurekaInstance {
    pub id: String,
    pub ip: String,
    pub port: u16,
    pub port_enabled: bool,
    pub secure_port: u16,
    pub secure_enabled: bool,
    /// UP | DOWN | STARTING | OUT_OF_SERVICE | UNKNOWN
    pub status: String,
    pub metadata: Vec<(String, String)>,
}

impl EurekaInstance {
    /// Status UP, port enabled, secure port 443 disabled, no metadata.
    pub fn new(id: &str, ip: &str, port: u16) -> Self {
        EurekaInstance {
            id: id.to_string(),
            ip: ip.to_string(),
            port,
            port_enabled: true,
            secure_port: 443,
            secure_enabled: false,
            status: "UP".to_string(),
            metadata: Vec::new(),
        }
    }
    pub fn status(mut self, s: &str) -> Self {
        self.status = s.to_string();
        self
    }
    pub fn meta(mut self, k: &str, v: &str) -> Self {
        self.metadata.push((k.to_string(), v.to_string()));
        self
    }
    pub fn port_enabled(mut self, e: bool) -> Self {
        self.port_enabled = e;
        self
    }
    pub fn secure(mut self, port: u16, enabled: bool) -> Self {
        self.secure_port = port;
        self.secure_enabled = enabled;
        self
    }
}

#[derive(Default)]
struct State {
    prefix: String,
    apps: HashMap<String, Vec<EurekaInstance>>,
    basic: Option<String>,
    shape: Option<Shape>,
    requests: u64,
    log: Vec<RequestRecord>,
    /// Registered instances' leases: (APP, id) → (duration, expiry).
    leases: HashMap<(String, String), (Duration, Instant)>,
    stopped: bool,
}

/// Evicts the instances whose lease ran out.
fn evict(st: &mut State) {
    let now = Instant::now();
    let gone: Vec<(String, String)> = st
        .leases
        .iter()
        .filter(|(_, (_, exp))| *exp <= now)
        .map(|(k, _)| k.clone())
        .collect();
    for (app, id) in gone {
        st.leases.remove(&(app.clone(), id.clone()));
        if let Some(v) = st.apps.get_mut(&app) {
            v.retain(|i| i.id != id);
        }
    }
}

/// The registration operations (see the module docs).
fn registration(st: &mut State, req: &Request, rest: &str) -> Response {
    let parts: Vec<String> = rest.split('/').map(super::http::percent_decode).collect();
    let app = parts[0].to_uppercase();
    match (req.method.as_str(), parts.len()) {
        ("POST", 1) => {
            let Ok(b) = serde_json::from_slice::<Value>(&req.body) else {
                return Response::new(400, "");
            };
            let i = &b["instance"];
            let (Some(id), Some(ip)) = (i["instanceId"].as_str(), i["ipAddr"].as_str()) else {
                return Response::new(400, "");
            };
            let port = i["port"]["$"].as_u64().unwrap_or(0) as u16;
            let mut inst =
                EurekaInstance::new(id, ip, port).status(i["status"].as_str().unwrap_or("UP"));
            if let Some(m) = i["metadata"].as_object() {
                for (k, v) in m {
                    inst = inst.meta(k, v.as_str().unwrap_or(""));
                }
            }
            let ttl = Duration::from_secs(i["leaseInfo"]["durationInSecs"].as_u64().unwrap_or(90));
            st.leases
                .insert((app.clone(), id.to_string()), (ttl, Instant::now() + ttl));
            let v = st.apps.entry(app).or_default();
            v.retain(|x| x.id != id);
            v.push(inst);
            Response::new(204, "")
        }
        ("PUT", 2) => match st.leases.get_mut(&(app, parts[1].clone())) {
            Some((ttl, exp)) => {
                *exp = Instant::now() + *ttl;
                Response::new(200, "")
            }
            None => Response::new(404, ""),
        },
        ("PUT", 3) if parts[2] == "status" => {
            let value = req
                .query_params()
                .into_iter()
                .find(|(k, _)| k == "value")
                .and_then(|(_, v)| v)
                .unwrap_or_default();
            let Some(inst) = st
                .apps
                .get_mut(&app)
                .and_then(|v| v.iter_mut().find(|i| i.id == parts[1]))
            else {
                return Response::new(404, "");
            };
            inst.status = value;
            Response::new(200, "")
        }
        ("DELETE", 2) => {
            let known = st.leases.remove(&(app.clone(), parts[1].clone())).is_some();
            if let Some(v) = st.apps.get_mut(&app) {
                v.retain(|i| i.id != parts[1]);
            }
            Response::new(if known { 200 } else { 404 }, "")
        }
        _ => Response::new(405, ""),
    }
}

type Inner = super::Locked<State>;

pub struct FakeEureka {
    pub port: u16,
    inner: Arc<Inner>,
    server: HttpServer,
}

fn instance_json(app: &str, i: &EurekaInstance, shape: Shape) -> Value {
    let port_val = |p: u16| match shape {
        Shape::Modern => json!(p),
        Shape::Old => json!(p.to_string()),
    };
    let metadata = if i.metadata.is_empty() {
        json!({"@class": "java.util.Collections$EmptyMap"})
    } else {
        Value::Object(
            i.metadata
                .iter()
                .map(|(k, v)| (k.clone(), Value::String(v.clone())))
                .collect::<Map<_, _>>(),
        )
    };
    json!({
        "instanceId": i.id,
        "hostName": format!("{}.example.internal", i.id),
        "app": app,
        "ipAddr": i.ip,
        "status": i.status,
        "overriddenStatus": "UNKNOWN",
        "port": {"$": port_val(i.port), "@enabled": i.port_enabled.to_string()},
        "securePort": {"$": port_val(i.secure_port), "@enabled": i.secure_enabled.to_string()},
        "countryId": 1,
        "dataCenterInfo": {"@class": "com.netflix.appinfo.InstanceInfo$DefaultDataCenterInfo", "name": "MyOwn"},
        "leaseInfo": {"renewalIntervalInSecs": 30, "durationInSecs": 90, "registrationTimestamp": 1700000000000u64,
                      "lastRenewalTimestamp": 1700000000000u64, "evictionTimestamp": 0, "serviceUpTimestamp": 1700000000000u64},
        "metadata": metadata,
        "homePageUrl": format!("http://{}:{}/", i.ip, i.port),
        "statusPageUrl": format!("http://{}:{}/actuator/info", i.ip, i.port),
        "healthCheckUrl": format!("http://{}:{}/actuator/health", i.ip, i.port),
        "vipAddress": app.to_lowercase(),
        "secureVipAddress": app.to_lowercase(),
        "isCoordinatingDiscoveryServer": "false",
        "lastUpdatedTimestamp": "1700000000000",
        "lastDirtyTimestamp": "1700000000000",
        "actionType": "ADDED"
    })
}

fn handle(inner: &Inner, req: &Request) -> Option<Response> {
    let mut st = inner.lock();
    if st.log.len() < LOG_CAP {
        st.log.push((req.target.clone(), req.headers.clone()));
    }
    st.requests += 1;
    if let Some(want) = &st.basic {
        if req.header("authorization") != Some(want.as_str()) {
            return Some(
                Response::new(401, "").header("WWW-Authenticate", "Basic realm=\"Realm\""),
            );
        }
    }
    if req.path == format!("{}/apps", st.prefix) || req.path == format!("{}/apps/", st.prefix) {
        if req.method != "GET" {
            return Some(Response::new(405, ""));
        }
        let shape = st.shape.unwrap_or(Shape::Modern);
        let mut names: Vec<&String> = st.apps.keys().filter(|a| !st.apps[*a].is_empty()).collect();
        names.sort();
        let mut counts: std::collections::BTreeMap<&str, usize> = Default::default();
        let apps: Vec<Value> = names
            .iter()
            .map(|app| {
                let list: Vec<Value> = st.apps[*app]
                    .iter()
                    .map(|i| {
                        *counts.entry(i.status.as_str()).or_default() += 1;
                        instance_json(app, i, shape)
                    })
                    .collect();
                json!({"name": app, "instance": list})
            })
            .collect();
        let hashcode: String = counts.iter().map(|(s, n)| format!("{s}_{n}_")).collect();
        let body = json!({"applications": {"versions__delta": "1", "apps__hashcode": hashcode, "application": apps}});
        return Some(Response::json(200, &body.to_string()));
    }
    let apps_path = format!("{}/apps/", st.prefix);
    let Some(app) = req.path.strip_prefix(&apps_path) else {
        return Some(Response::new(404, ""));
    };
    if req.method != "GET" || app.contains('/') {
        let app = app.to_string();
        return Some(registration(&mut st, req, &app));
    }
    // Eureka looks the name up uppercased.
    let app = super::http::percent_decode(app).to_uppercase();
    let instances = match st.apps.get(&app) {
        Some(v) if !v.is_empty() => v.clone(),
        _ => return Some(Response::new(404, "")),
    };
    let shape = st.shape.unwrap_or(Shape::Modern);
    drop(st);
    let json_wanted = req
        .header("accept")
        .is_some_and(|a| a.to_ascii_lowercase().contains("json"));
    if !json_wanted {
        let mut xml = format!("<application>\n  <name>{app}</name>\n");
        for i in &instances {
            xml.push_str(&format!(
                "  <instance>\n    <instanceId>{}</instanceId>\n    <ipAddr>{}</ipAddr>\n    <status>{}</status>\n    <port enabled=\"{}\">{}</port>\n  </instance>\n",
                i.id, i.ip, i.status, i.port_enabled, i.port
            ));
        }
        xml.push_str("</application>");
        return Some(Response::new(200, xml).header("Content-Type", "application/xml"));
    }
    let list: Vec<Value> = instances
        .iter()
        .map(|i| instance_json(&app, i, shape))
        .collect();
    let instance = match (shape, list.len()) {
        (Shape::Old, 1) => list.into_iter().next().unwrap_or(Value::Null),
        _ => Value::Array(list),
    };
    let body = json!({"application": {"name": app, "instance": instance}});
    Some(Response::json(200, &body.to_string()))
}

impl FakeEureka {
    /// Serving under `/eureka` (Spring Cloud Netflix's default).
    pub fn start() -> FakeEureka {
        Self::start_with_prefix("/eureka")
    }

    pub fn start_with_prefix(prefix: &str) -> FakeEureka {
        let inner = Arc::new(Inner::new(State {
            prefix: prefix.to_string(),
            ..Default::default()
        }));
        let i2 = inner.clone();
        // Leases run out on their own; the thread ends with `stop`.
        let i3 = inner.clone();
        std::thread::spawn(move || loop {
            std::thread::sleep(Duration::from_millis(20));
            let mut st = i3.lock();
            if st.stopped {
                break;
            }
            evict(&mut st);
        });
        let server = HttpServer::start(0, Arc::new(move |req| handle(&i2, req)))
            .unwrap_or_else(|e| panic!("fake eureka: cannot bind: {e}"));
        FakeEureka {
            port: server.port,
            inner,
            server,
        }
    }

    /// Require HTTP basic auth with these credentials.
    pub fn set_basic_auth(&self, user: &str, password: &str) {
        self.inner.lock().basic = Some(format!(
            "Basic {}",
            B64.encode(format!("{user}:{password}"))
        ));
    }

    pub fn set_shape(&self, shape: Shape) {
        self.inner.lock().shape = Some(shape);
    }

    /// Replace the instances of application `app` (stored uppercased; none = unknown app, 404).
    pub fn set_app(&self, app: &str, instances: Vec<EurekaInstance>) {
        self.inner.lock().apps.insert(app.to_uppercase(), instances);
    }

    pub fn requests(&self) -> u64 {
        self.inner.lock().requests
    }

    pub fn request_log(&self) -> Vec<RequestRecord> {
        self.inner.lock().log.clone()
    }

    /// The server restarts without its registry: registered instances are forgotten.
    pub fn restart(&self) {
        let mut st = self.inner.lock();
        let gone: Vec<(String, String)> = st.leases.drain().map(|(k, _)| k).collect();
        for (app, id) in gone {
            if let Some(v) = st.apps.get_mut(&app) {
                v.retain(|i| i.id != id);
            }
        }
    }

    /// The instances of `app` as (id, status).
    pub fn instances(&self, app: &str) -> Vec<(String, String)> {
        self.inner
            .lock()
            .apps
            .get(&app.to_uppercase())
            .map(|v| v.iter().map(|i| (i.id.clone(), i.status.clone())).collect())
            .unwrap_or_default()
    }

    pub fn stop(&mut self) {
        self.inner.lock().stopped = true;
        self.server.stop();
    }
}

impl Drop for FakeEureka {
    fn drop(&mut self) {
        self.stop();
    }
}
