//! A fake Kubernetes API server for one resource: `GET
//! /apis/discovery.k8s.io/v1/namespaces/<ns>/endpointslices?labelSelector=kubernetes.io/service-name=<svc>`
//! answering an `EndpointSliceList` (discovery.k8s.io/v1) whose `metadata.resourceVersion`
//! is the store's revision, bumped on every change. Bearer-token auth: no or a wrong
//! token → 401 `Status` "Unauthorized"; a token without the permission → 403 `Status`
//! with the RBAC "forbidden" message. Unknown paths → 404 `Status`.
//!
//! `resourceVersion`/`resourceVersionMatch` as the API server reads them: a match
//! without a version is refused (400, "resourceVersionMatch is forbidden unless
//! resourceVersion is provided"); a list with a version is counted as served from the
//! watch cache, one without as a quorum read from etcd; `NotOlderThan` a version the
//! cache has not reached answers 504 "Too large resource version" (at once: the real
//! server waits up to 3s first). [`FakeKubernetes::set_cache_behind`] makes the cache
//! lag the store, as a replica behind the others.

use super::http::{HttpServer, Request, RequestRecord, Response};
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

const LOG_CAP: usize = 100_000;
const PREFIX: &str = "/apis/discovery.k8s.io/v1/namespaces/";

#[derive(Clone, Debug, PartialEq)]
pub struct K8sEndpoint {
    pub addresses: Vec<String>,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    pub zone: Option<String>,
    pub node: Option<String>,
    pub pod: Option<String>,
}

impl K8sEndpoint {
    /// Ready, serving, not terminating.
    pub fn new(address: &str) -> Self {
        K8sEndpoint {
            addresses: vec![address.to_string()],
            ready: true,
            serving: true,
            terminating: false,
            zone: None,
            node: None,
            pod: None,
        }
    }
    /// A Pod shutting down that still serves: ready false, serving true, terminating true.
    pub fn terminating(mut self) -> Self {
        self.ready = false;
        self.serving = true;
        self.terminating = true;
        self
    }
    pub fn not_ready(mut self) -> Self {
        self.ready = false;
        self.serving = false;
        self
    }
    pub fn zone(mut self, z: &str) -> Self {
        self.zone = Some(z.to_string());
        self
    }
    pub fn pod(mut self, p: &str) -> Self {
        self.pod = Some(p.to_string());
        self
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct K8sSlice {
    pub name: String,
    /// (name, port, protocol)
    pub ports: Vec<(String, u16, String)>,
    pub endpoints: Vec<K8sEndpoint>,
}

impl K8sSlice {
    /// One TCP port named `http`.
    pub fn new(name: &str, port: u16, endpoints: Vec<K8sEndpoint>) -> Self {
        K8sSlice {
            name: name.to_string(),
            ports: vec![("http".into(), port, "TCP".into())],
            endpoints,
        }
    }
    pub fn ports(mut self, ports: &[(&str, u16)]) -> Self {
        self.ports = ports
            .iter()
            .map(|(n, p)| (n.to_string(), *p, "TCP".to_string()))
            .collect();
        self
    }
}

#[derive(Default)]
struct State {
    revision: u64,
    /// (namespace, service) → (slices, resourceVersion of each).
    services: BTreeMap<(String, String), Vec<(K8sSlice, u64)>>,
    tokens: HashSet<String>,
    forbidden: HashSet<String>,
    requests: u64,
    log: Vec<RequestRecord>,
    /// Lists answered from the watch cache / read from etcd.
    cache_lists: u64,
    quorum_lists: u64,
    /// The watch cache's revision while it lags the store.
    cache_behind: Option<u64>,
}

type Inner = super::Locked<State>;

pub struct FakeKubernetes {
    pub port: u16,
    inner: Arc<Inner>,
    server: HttpServer,
}

fn status(code: u16, reason: &str, message: &str, details: Value) -> Response {
    let body = json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "reason": reason, "details": details, "code": code
    });
    Response::json(code, &body.to_string())
}

fn slice_json(ns: &str, svc: &str, s: &K8sSlice, rv: u64) -> Value {
    let endpoints: Vec<Value> = s
        .endpoints
        .iter()
        .map(|e| {
            let mut v = json!({
                "addresses": e.addresses,
                "conditions": {"ready": e.ready, "serving": e.serving, "terminating": e.terminating},
            });
            if let Some(z) = &e.zone {
                v["zone"] = json!(z);
            }
            if let Some(n) = &e.node {
                v["nodeName"] = json!(n);
            }
            if let Some(p) = &e.pod {
                v["targetRef"] = json!({"kind": "Pod", "namespace": ns, "name": p, "uid": format!("uid-{p}")});
            }
            v
        })
        .collect();
    let ports: Vec<Value> = s
        .ports
        .iter()
        .map(|(n, p, proto)| json!({"name": n, "protocol": proto, "port": p}))
        .collect();
    json!({
        "metadata": {
            "name": s.name,
            "generateName": format!("{svc}-"),
            "namespace": ns,
            "uid": format!("uid-{}", s.name),
            "resourceVersion": rv.to_string(),
            "generation": 1,
            "creationTimestamp": "2024-01-01T00:00:00Z",
            "labels": {
                "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
                "kubernetes.io/service-name": svc
            },
            "ownerReferences": [{"apiVersion": "v1", "kind": "Service", "name": svc, "uid": format!("uid-svc-{svc}"),
                                 "controller": true, "blockOwnerDeletion": true}]
        },
        "addressType": "IPv4",
        "endpoints": endpoints,
        "ports": ports
    })
}

fn handle(inner: &Inner, req: &Request) -> Option<Response> {
    let mut st = inner.lock();
    if st.log.len() < LOG_CAP {
        st.log.push((req.target.clone(), req.headers.clone()));
    }
    st.requests += 1;
    let token = req
        .header("authorization")
        .and_then(|a| a.strip_prefix("Bearer "))
        .map(str::trim);
    let Some(token) = token.filter(|t| st.tokens.contains(*t) || st.forbidden.contains(*t)) else {
        return Some(status(401, "Unauthorized", "Unauthorized", json!(null)));
    };
    let Some(ns) = req
        .path
        .strip_prefix(PREFIX)
        .and_then(|rest| rest.strip_suffix("/endpointslices"))
    else {
        return Some(status(
            404,
            "NotFound",
            "the server could not find the requested resource",
            json!({}),
        ));
    };
    let ns = ns.to_string();
    if st.forbidden.contains(token) {
        let msg = format!(
            "endpointslices.discovery.k8s.io is forbidden: User \"system:serviceaccount:{ns}:default\" cannot list resource \"endpointslices\" in API group \"discovery.k8s.io\" in the namespace \"{ns}\""
        );
        return Some(status(
            403,
            "Forbidden",
            &msg,
            json!({"group": "discovery.k8s.io", "kind": "endpointslices"}),
        ));
    }
    if req.method != "GET" {
        return Some(status(
            405,
            "MethodNotAllowed",
            "the server does not allow this method on the requested resource",
            json!({}),
        ));
    }
    let selector = req
        .query_params()
        .into_iter()
        .find(|(k, _)| k == "labelSelector")
        .and_then(|(_, v)| v)
        .unwrap_or_default();
    let wanted: Option<String> = if selector.is_empty() {
        None
    } else {
        match selector.split_once('=') {
            Some(("kubernetes.io/service-name", v)) => Some(v.trim_start_matches('=').to_string()),
            _ => {
                return Some(status(
                    400,
                    "BadRequest",
                    &format!("unable to parse requirement: {selector}"),
                    json!({}),
                ))
            }
        }
    };
    let param = |name: &str| {
        req.query_params()
            .into_iter()
            .find(|(k, _)| k == name)
            .and_then(|(_, v)| v)
    };
    let (rv, rv_match) = (param("resourceVersion"), param("resourceVersionMatch"));
    if rv_match.is_some() && rv.as_deref().map_or(true, str::is_empty) {
        return Some(status(
            400,
            "BadRequest",
            "resourceVersionMatch is forbidden unless resourceVersion is provided",
            json!({}),
        ));
    }
    let revision = match rv.as_deref() {
        Some(v) if !v.is_empty() => {
            st.cache_lists += 1;
            let cache = st.cache_behind.unwrap_or(st.revision);
            let asked: u64 = v.parse().unwrap_or(0);
            if rv_match.as_deref() == Some("NotOlderThan") && asked > cache {
                return Some(status(
                    504,
                    "Timeout",
                    &format!("Too large resource version: {asked}, current: {cache}"),
                    json!({"causes": [{"reason": "ResourceVersionTooLarge", "message": "Too large resource version"}], "retryAfterSeconds": 1}),
                ));
            }
            cache
        }
        _ => {
            st.quorum_lists += 1;
            st.revision
        }
    };
    let items: Vec<Value> = st
        .services
        .iter()
        .filter(|((n, s), _)| *n == ns && wanted.as_deref().map_or(true, |w| w == s))
        .flat_map(|((n, s), slices)| slices.iter().map(move |(sl, rv)| slice_json(n, s, sl, *rv)))
        .collect();
    let body = json!({
        "kind": "EndpointSliceList",
        "apiVersion": "discovery.k8s.io/v1",
        "metadata": {"resourceVersion": revision.to_string()},
        "items": items
    });
    Some(
        Response::json(200, &body.to_string())
            .header("Audit-Id", "00000000-0000-0000-0000-000000000000"),
    )
}

impl FakeKubernetes {
    pub fn start() -> FakeKubernetes {
        let inner = Arc::new(Inner::new(State {
            revision: 1000,
            ..Default::default()
        }));
        let i2 = inner.clone();
        let server = HttpServer::start(0, Arc::new(move |req| handle(&i2, req)))
            .unwrap_or_else(|e| panic!("fake kubernetes: cannot bind: {e}"));
        FakeKubernetes {
            port: server.port,
            inner,
            server,
        }
    }

    /// A bearer token allowed to list endpointslices.
    pub fn allow_token(&self, token: &str) {
        self.inner.lock().tokens.insert(token.to_string());
    }

    /// A valid token of an identity without the permission (403).
    pub fn forbid_token(&self, token: &str) {
        self.inner.lock().forbidden.insert(token.to_string());
    }

    /// Replace the EndpointSlices of Service `svc` in `ns`; bumps the revision.
    pub fn set_slices(&self, ns: &str, svc: &str, slices: Vec<K8sSlice>) {
        let mut st = self.inner.lock();
        st.revision += 1;
        let rv = st.revision;
        st.services.insert(
            (ns.to_string(), svc.to_string()),
            slices.into_iter().map(|s| (s, rv)).collect(),
        );
    }

    /// Something else in the cluster changed: the list's resourceVersion moves.
    pub fn bump_revision(&self) {
        self.inner.lock().revision += 1;
    }

    pub fn revision(&self) -> u64 {
        self.inner.lock().revision
    }

    pub fn requests(&self) -> u64 {
        self.inner.lock().requests
    }

    /// Lists answered from the watch cache (a `resourceVersion` was given) and read
    /// through to etcd (none given).
    pub fn lists(&self) -> (u64, u64) {
        let st = self.inner.lock();
        (st.cache_lists, st.quorum_lists)
    }

    /// The watch cache lags at `revision` (`None`: caught up with the store). Its
    /// lists then report that revision (its content is the store's: only the
    /// version matters here).
    pub fn set_cache_behind(&self, revision: Option<u64>) {
        self.inner.lock().cache_behind = revision;
    }

    pub fn request_log(&self) -> Vec<RequestRecord> {
        self.inner.lock().log.clone()
    }

    pub fn stop(&mut self) {
        self.server.stop();
    }
}
