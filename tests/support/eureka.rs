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

use super::http::{HttpServer, Request, RequestRecord, Response};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use serde_json::{json, Map, Value};
use std::collections::HashMap;
use std::sync::Arc;

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
    if req.method != "GET" {
        return Some(Response::new(405, ""));
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

    pub fn stop(&mut self) {
        self.server.stop();
    }
}
