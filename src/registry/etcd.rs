//! etcd v3 through its JSON gateway (`POST /v3/kv/range` over a key prefix).
//!
//! Reference: etcd 3.4 "gRPC gateway" guide. Keys and values are base64, int64
//! fields are JSON strings, empty fields are omitted (no `kvs` when the range is
//! empty). `header.revision` is the change token: when it has not moved, the
//! answer's `kvs` are not decoded at all. With `username`/`password`, a token from
//! `POST /v3/auth/authenticate` is sent raw in `Authorization` (etcd 3.4 refuses
//! `Bearer`); a 401 drops it and logs in again at once.
//!
//! Value schema (one key per instance, e.g. `/services/web/<id>`), JSON:
//! `{"address":"10.0.0.1","port":8080,"weight":1,"zone":"a","state":"healthy",
//!   "metadata":{"version":"v1"}}` — `weight` (default 1; 0 = no traffic), `zone`
//! (else `metadata.zone`), `state` (`healthy` | `unhealthy` | `draining`, default
//! healthy) and `metadata` are optional. The value etcd's own gRPC naming
//! resolver writes, `{"Op":0,"Addr":"10.0.0.1:8080","Metadata":…}`, is accepted too.
//! Change check (`change_check`, on by default): once a full range has been read at
//! revision R with N keys, each poll first asks for the keys under the prefix
//! modified after R (`keys_only`, `min_mod_revision: R+1`): etcd answers those keys
//! (none when nothing changed) and `count`, the number of keys in the whole range
//! (filters do not apply to it), so an unchanged prefix costs an answer of ~150
//! bytes instead of every value, and a change (a key written, or the count moved
//! by a delete) is followed at once by the full range. Unrelated writes elsewhere
//! in etcd move the revision but not the check. A check answered at a revision below
//! the last one read (etcd restored, or a new cluster starting over at 1) reads the
//! whole range again.
//!
//! `serializable: true` sends `serializable` ranges: any member answers from its own
//! state without a round of consensus (etcd's "serializable read"), which spreads a
//! fleet's reads over the cluster, at the price of an answer that may lag the
//! leader by the member's replication delay.
//!
//! Left out: watches (a watch stream never ends; polling the range is simpler and
//! bounded), ranges over 10,000 keys in pages.

use super::{
    envoy_local_failure, excerpt, HttpRequest, HttpResponse, RegistryError, ServiceRef, Step,
};
use crate::instance::Rejected;
use crate::instance::{self, Instance, State};
use crate::validate::{field_err, ConfigError};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::Value;

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EtcdConfig {
    /// Envoy cluster that reaches etcd's JSON gateway (client URL).
    pub cluster: String,
    #[serde(default)]
    pub authority: Option<String>,
    /// Key prefix; defaults to `/services/<service name>/`.
    #[serde(default)]
    pub prefix: Option<String>,
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub password: Option<String>,
    /// Serializable ranges: any member answers from local state (see the module doc).
    #[serde(default)]
    pub serializable: bool,
    /// A cheap check for changes before each full range (see the module doc).
    #[serde(default = "default_true")]
    pub change_check: bool,
}

fn default_true() -> bool {
    true
}

impl EtcdConfig {
    /// `:authority` of registry calls: `authority`, else the cluster name.
    pub fn authority(&self) -> &str {
        self.authority.as_deref().unwrap_or(&self.cluster)
    }

    /// Checks what the types cannot; `at` names this source in errors
    /// (`services[0].sources[1].etcd`).
    pub fn validate(&self, at: &str) -> Result<(), ConfigError> {
        if self.cluster.is_empty() {
            return field_err(at, "cluster", "must name an Envoy cluster");
        }
        if self.prefix.as_deref() == Some("") {
            return field_err(
                at,
                "prefix",
                "must not be empty (it would select the whole keyspace)",
            );
        }
        if self.username.is_some() != self.password.is_some() {
            return field_err(at, "username", "username and password go together");
        }
        Ok(())
    }
}

#[derive(Debug)]
pub struct Etcd {
    cfg: EtcdConfig,
    prefix: String,
    request_timeout_ms: u64,
    token: Option<String>,
    /// What the last call was, so the answer is read the right way.
    pending: Pending,
    /// Last `header.revision` applied; 0 = none.
    pub revision: i64,
    /// Keys in the range at `revision`; -1 = unknown (the next poll reads it all).
    pub count: i64,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Pending {
    Login,
    Check,
    Range,
}

#[derive(Deserialize)]
struct RangeHeaderOnly<'a> {
    #[serde(default)]
    header: Option<Header>,
    #[serde(borrow, default)]
    kvs: Option<&'a RawValue>,
    #[serde(default)]
    count: Option<String>,
}

#[derive(Deserialize)]
struct Header {
    #[serde(default)]
    revision: Option<String>,
}

#[derive(Deserialize)]
struct Kv {
    #[serde(default)]
    key: String,
    #[serde(default)]
    value: String,
}

#[derive(Deserialize)]
struct AuthAnswer {
    token: String,
}

impl Etcd {
    pub fn new(svc: ServiceRef, cfg: &EtcdConfig) -> Etcd {
        Etcd {
            prefix: cfg
                .prefix
                .clone()
                .unwrap_or_else(|| format!("/services/{}/", svc.name)),
            cfg: cfg.clone(),
            request_timeout_ms: svc.request_timeout_ms,
            token: None,
            pending: Pending::Range,
            revision: 0,
            count: -1,
        }
    }

    /// Change token carried to another poller: `<revision>/<count>`.
    pub fn token(&self) -> String {
        format!("{}/{}", self.revision, self.count)
    }

    pub fn restore_token(&mut self, token: &str) {
        let (rev, count) = token.split_once('/').unwrap_or((token, "-1"));
        self.revision = rev.parse().unwrap_or(0);
        self.count = count.parse().unwrap_or(-1);
    }

    pub fn request(&mut self) -> HttpRequest {
        let mut headers = vec![("content-type".to_string(), "application/json".to_string())];
        let (path, body) = match (&self.cfg.username, &self.cfg.password, &self.token) {
            (Some(user), Some(pass), None) => {
                self.pending = Pending::Login;
                let body = serde_json::json!({ "name": user, "password": pass });
                ("/v3/auth/authenticate", body.to_string())
            }
            _ => {
                if let Some(t) = &self.token {
                    headers.push(("authorization".to_string(), t.clone()));
                }
                let mut body = serde_json::json!({
                    "key": B64.encode(self.prefix.as_bytes()),
                    "range_end": B64.encode(prefix_end(self.prefix.as_bytes())),
                });
                let check = self.cfg.change_check
                    && self.revision > 0
                    && self.count >= 0
                    && self.pending != Pending::Check;
                if check {
                    body["keys_only"] = true.into();
                    body["min_mod_revision"] = self.revision.saturating_add(1).to_string().into();
                }
                if self.cfg.serializable {
                    body["serializable"] = true.into();
                }
                self.pending = if check {
                    Pending::Check
                } else {
                    Pending::Range
                };
                ("/v3/kv/range", body.to_string())
            }
        };
        HttpRequest {
            cluster: self.cfg.cluster.clone(),
            method: "POST",
            authority: self.cfg.authority().to_string(),
            path: path.to_string(),
            headers,
            body: body.into_bytes(),
            timeout_ms: self.request_timeout_ms,
        }
    }

    pub fn on_response(&mut self, resp: &HttpResponse) -> Result<Step, RegistryError> {
        if let Some(e) = envoy_local_failure(resp) {
            return Err(e);
        }
        match self.pending {
            Pending::Login => match resp.status {
                200 => {
                    let a: AuthAnswer = serde_json::from_slice(resp.body)
                        .map_err(|e| RegistryError::Malformed(format!("etcd authenticate: {e}")))?;
                    self.token = Some(a.token);
                    Ok(Step::Again("login"))
                }
                s => Err(RegistryError::Auth(format!(
                    "login as `{}` failed: {s} {}",
                    self.cfg.username.as_deref().unwrap_or(""),
                    excerpt(resp.body)
                ))),
            },
            Pending::Check | Pending::Range => match resp.status {
                200 if self.pending == Pending::Check => self.on_check(resp.body),
                200 => self.on_range(resp.body),
                401 if self.token.is_some() => {
                    // Expired or revoked token: log in again right away.
                    self.token = None;
                    Ok(Step::Again("token_expired"))
                }
                401 | 403 => Err(RegistryError::Auth(format!(
                    "{} {}",
                    resp.status,
                    excerpt(resp.body)
                ))),
                // etcd answers 400 "user name is empty" (code 3) when auth is on and no token is sent.
                400 if String::from_utf8_lossy(resp.body).contains("user name is empty") => {
                    Err(RegistryError::Auth(format!(
                        "etcd requires authentication: {}",
                        excerpt(resp.body)
                    )))
                }
                s => Err(RegistryError::Status(s, excerpt(resp.body))),
            },
        }
    }

    /// The change check's answer: keys modified since `revision`, and the range's count.
    fn on_check(&mut self, body: &[u8]) -> Result<Step, RegistryError> {
        let head: RangeHeaderOnly = serde_json::from_slice(body)
            .map_err(|e| RegistryError::Malformed(format!("etcd range (change check): {e}")))?;
        let count = head.count.as_deref().map_or(Ok(0), str::parse::<i64>);
        let modified = head.kvs.is_some_and(|k| k.get().trim() != "[]");
        // A revision below the last one read: etcd was restored or replaced (a new
        // data dir starts over at 1), and `min_mod_revision` no longer means "since".
        let went_back = head
            .header
            .and_then(|h| h.revision)
            .and_then(|r| r.parse::<i64>().ok())
            .map_or(true, |r| r < self.revision);
        match count {
            Ok(c) if c == self.count && !modified && !went_back => {
                // Read the whole range next time only if something changes.
                self.pending = Pending::Range;
                Ok(Step::Unchanged)
            }
            // Changed (or an answer that cannot tell): the full range, at once.
            _ => Ok(Step::Again("changed")),
        }
    }

    fn on_range(&mut self, body: &[u8]) -> Result<Step, RegistryError> {
        let head: RangeHeaderOnly = serde_json::from_slice(body)
            .map_err(|e| RegistryError::Malformed(format!("etcd range: {e}")))?;
        let revision: i64 = head
            .header
            .and_then(|h| h.revision)
            .and_then(|r| r.parse().ok())
            .ok_or_else(|| RegistryError::Malformed("etcd range: no header.revision".into()))?;
        if revision == self.revision && self.count >= 0 {
            return Ok(Step::Unchanged);
        }
        let kvs: Vec<Kv> = match head.kvs {
            None => Vec::new(),
            Some(raw) => serde_json::from_str(raw.get())
                .map_err(|e| RegistryError::Malformed(format!("etcd range kvs: {e}")))?,
        };
        let (instances, rejected) = parse_kvs(&kvs);
        self.revision = revision;
        self.count = head
            .count
            .as_deref()
            .and_then(|c| c.parse().ok())
            .unwrap_or(kvs.len() as i64);
        Ok(Step::Instances {
            instances,
            rejected,
            warnings: Vec::new(),
        })
    }
}

fn parse_kvs(kvs: &[Kv]) -> (Vec<Instance>, Rejected) {
    // Not sized by the entry count: entries may be 2-byte junk that becomes no
    // instance, and room for ~100-byte instances per entry was 48x the answer's size.
    let mut out = Vec::new();
    let mut rejected = Rejected::default();
    for kv in kvs {
        let key = B64
            .decode(kv.key.as_bytes())
            .map(|k| String::from_utf8_lossy(&k).into_owned())
            .unwrap_or_else(|_| "<undecodable key>".into());
        let key = instance::truncate(&key, 96);
        let value = match B64.decode(kv.value.as_bytes()) {
            Ok(v) => v,
            Err(_) => {
                rejected.push(format!("key `{key}`: value is not base64"));
                continue;
            }
        };
        match parse_value(&value) {
            Ok(Some(i)) => out.push(i),
            Ok(None) => {}
            Err(e) => rejected.push(format!("key `{key}`: {e}")),
        }
    }
    (out, rejected)
}

/// Parses one instance value; `Ok(None)` for a weight of 0.
pub fn parse_value(value: &[u8]) -> Result<Option<Instance>, String> {
    let v: Value = serde_json::from_slice(value).map_err(|e| format!("value is not JSON: {e}"))?;
    let obj = v.as_object().ok_or("value is not a JSON object")?;
    let addr = if let Some(a) = obj.get("Addr") {
        // etcd gRPC naming: {"Op":0,"Addr":"host:port","Metadata":…}
        let a = a.as_str().ok_or("`Addr` is not a string")?;
        let (ip, port) = a.rsplit_once(':').ok_or("`Addr` has no port")?;
        let port: i64 = port.parse().map_err(|_| "`Addr` port is not a number")?;
        instance::socket_addr(ip, port).map_err(|e| e.to_string())?
    } else {
        let ip = obj
            .get("address")
            .and_then(Value::as_str)
            .ok_or("no `address` string")?;
        let port = obj
            .get("port")
            .and_then(Value::as_i64)
            .ok_or("no integer `port`")?;
        instance::socket_addr(ip, port).map_err(|e| e.to_string())?
    };
    let weight = match obj.get("weight") {
        None | Some(Value::Null) => 1,
        Some(w) => w
            .as_i64()
            .filter(|w| *w >= 0)
            .ok_or("`weight` is not a non-negative integer")?,
    };
    if weight == 0 {
        return Ok(None);
    }
    let mut inst = Instance::new(addr, u32::try_from(weight).unwrap_or(u32::MAX));
    inst.state = match obj.get("state").and_then(Value::as_str) {
        None | Some("healthy") => State::Healthy,
        Some("unhealthy") => State::Unhealthy,
        Some("draining") => State::Draining,
        Some(other) => {
            return Err(format!(
                "unknown `state` `{}`",
                instance::truncate(other, 32)
            ))
        }
    };
    let mut meta: Vec<(String, String)> = Vec::new();
    if let Some(m) = obj.get("metadata").and_then(Value::as_object) {
        for (k, v) in m {
            let text = match v {
                Value::String(s) => s.clone(),
                Value::Null => String::new(),
                other => other.to_string(),
            };
            meta.push((k.clone(), text));
        }
    }
    meta.sort();
    inst.zone = obj
        .get("zone")
        .and_then(Value::as_str)
        .map(str::to_string)
        .or_else(|| {
            meta.iter()
                .find(|(k, _)| k == "zone")
                .map(|(_, v)| v.clone())
        })
        .unwrap_or_default();
    inst.metadata = meta;
    Ok(Some(inst))
}

/// End of a prefix range: the prefix with its last byte below 0xff incremented
/// (etcd's `clientv3.GetPrefixRangeEnd`); `[0]` (whole keyspace) if none.
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::SourceConfig;
    use crate::registry::test_util::one_source;
    use crate::registry::test_util::{resp, service};
    use wasm_bindgen_test::wasm_bindgen_test;

    const RANGE: &str = include_str!("../../tests/fixtures/etcd/03_range_prefix.body.json");
    const EMPTY: &str = include_str!("../../tests/fixtures/etcd/04_range_empty.body.json");
    const GRPC_NAMING: &str =
        include_str!("../../tests/fixtures/etcd/05_range_grpc_naming.body.json");
    const AUTH: &str = include_str!("../../tests/fixtures/etcd/09_auth_authenticate.body.json");
    const WRONG_PASSWORD: &str =
        include_str!("../../tests/fixtures/etcd/10_auth_authenticate_wrong_password.body.json");
    const INVALID_TOKEN: &str =
        include_str!("../../tests/fixtures/etcd/12_range_invalid_token.body.json");
    const NO_TOKEN: &str = include_str!("../../tests/fixtures/etcd/11_range_no_token.body.json");

    fn etcd(extra: &str) -> Etcd {
        let svc = service("web", "etcd", "etcd", extra);
        match &svc.sources[0] {
            SourceConfig::Etcd(e) => Etcd::new(svc.for_registry(), e),
            _ => unreachable!(),
        }
    }

    fn ok(body: &str) -> HttpResponse<'_> {
        resp(200, body)
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn range_request_matches_captured_one() {
        let mut e = etcd("");
        let r = e.request();
        assert_eq!(r.path, "/v3/kv/range");
        assert_eq!(r.method, "POST");
        let body: Value = serde_json::from_slice(&r.body).unwrap();
        // The same base64 the captured request used for "/services/web/" .. "/services/web0".
        assert_eq!(body["key"], "L3NlcnZpY2VzL3dlYi8=");
        assert_eq!(body["range_end"], "L3NlcnZpY2VzL3dlYjA=");
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn parses_captured_range_and_skips_unchanged_revision() {
        let mut e = etcd(r#","change_check":false"#);
        e.request();
        let step = e.on_response(&ok(RANGE)).unwrap();
        let Step::Instances {
            instances,
            rejected,
            ..
        } = step
        else {
            panic!("{step:?}")
        };
        assert!(rejected.is_empty());
        let got: Vec<(String, u32, String)> = instances
            .iter()
            .map(|i| (i.addr.to_string(), i.weight, i.zone.clone()))
            .collect();
        assert_eq!(
            got,
            [
                ("10.0.0.11:8080".to_string(), 10, "a".to_string()),
                ("10.0.0.12:8080".to_string(), 5, "b".to_string())
            ]
        );
        assert_eq!(e.revision, 4);
        e.request();
        assert_eq!(e.on_response(&ok(RANGE)).unwrap(), Step::Unchanged);
    }

    /// A check answer as etcd 3.4 gives it (recorded shape): the keys modified since
    /// the revision asked, omitted when none, and the whole range's count, omitted at 0.
    fn check_answer(revision: u64, keys: &[&str], count: u64) -> String {
        let kvs: Vec<String> = keys
            .iter()
            .map(|k| {
                format!(
                    r#"{{"key":"{}","create_revision":"3","mod_revision":"6","version":"2"}}"#,
                    B64.encode(k)
                )
            })
            .collect();
        let mut s = format!(
            r#"{{"header":{{"cluster_id":"14841639068965178418","member_id":"10276657743932975437","revision":"{revision}","raft_term":"2"}}"#
        );
        if !kvs.is_empty() {
            s.push_str(&format!(r#","kvs":[{}]"#, kvs.join(",")));
        }
        if count > 0 {
            s.push_str(&format!(r#","count":"{count}""#));
        }
        s.push('}');
        s
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn change_check_reads_the_range_only_when_the_prefix_changed() {
        let mut e = etcd(r#","serializable":true"#);
        let first: Value = serde_json::from_slice(&e.request().body).unwrap();
        assert_eq!(
            first.get("keys_only"),
            None,
            "the first call reads everything"
        );
        assert_eq!(first["serializable"], true);
        assert!(matches!(
            e.on_response(&ok(RANGE)).unwrap(),
            Step::Instances { .. }
        ));
        assert_eq!((e.revision, e.count), (4, 2));
        // Unrelated writes moved the revision to 9; nothing under the prefix changed.
        let check: Value = serde_json::from_slice(&e.request().body).unwrap();
        assert_eq!(check["keys_only"], true);
        assert_eq!(check["min_mod_revision"], "5");
        assert_eq!(check["serializable"], true);
        assert_eq!(check["key"], first["key"]);
        assert_eq!(
            e.on_response(&ok(&check_answer(9, &[], 2))).unwrap(),
            Step::Unchanged
        );
        // A key written under the prefix: the full range follows at once.
        e.request();
        assert_eq!(
            e.on_response(&ok(&check_answer(10, &["/services/web/a"], 2)))
                .unwrap(),
            Step::Again("changed")
        );
        let full: Value = serde_json::from_slice(&e.request().body).unwrap();
        assert_eq!(full.get("keys_only"), None);
        assert!(matches!(
            e.on_response(&ok(RANGE)).unwrap(),
            Step::Unchanged | Step::Instances { .. }
        ));
        // A key deleted: nothing modified since, but the count moved.
        e.request();
        assert_eq!(
            e.on_response(&ok(&check_answer(11, &[], 1))).unwrap(),
            Step::Again("changed")
        );
        // Every key deleted: no kvs and no count (etcd omits zeros).
        e.request();
        assert!(matches!(
            e.on_response(&ok(RANGE)).unwrap(),
            Step::Unchanged | Step::Instances { .. }
        ));
        e.request();
        assert_eq!(
            e.on_response(&ok(&check_answer(12, &[], 0))).unwrap(),
            Step::Again("changed")
        );
        // etcd replaced by one with a fresh data dir: revisions start over, so nothing
        // looks modified "since" the old revision, and the count may be the same.
        e.request();
        assert!(matches!(
            e.on_response(&ok(RANGE)).unwrap(),
            Step::Unchanged | Step::Instances { .. }
        ));
        assert_eq!(e.revision, 4);
        e.request();
        assert_eq!(
            e.on_response(&ok(&check_answer(3, &[], 2))).unwrap(),
            Step::Again("changed")
        );
        // The change token carries the count to another poller.
        let mut other = etcd("");
        other.restore_token(&e.token());
        let c: Value = serde_json::from_slice(&other.request().body).unwrap();
        assert_eq!(c["keys_only"], true);
        // An old token without a count: the next call reads the whole range.
        let mut old = etcd("");
        old.restore_token("4");
        let c: Value = serde_json::from_slice(&old.request().body).unwrap();
        assert_eq!(c.get("keys_only"), None);
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn empty_range_has_no_kvs_field() {
        let mut e = etcd("");
        e.request();
        assert_eq!(
            e.on_response(&ok(EMPTY)).unwrap(),
            Step::Instances {
                instances: vec![],
                rejected: Rejected::default(),
                warnings: vec![]
            }
        );
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn grpc_naming_value_is_read_and_a_missing_port_rejected() {
        // The captured value is {"Addr":"1.2.3.4","Metadata":"..."}: no port, so refused.
        let mut e = etcd(r#","prefix":"my-service/""#);
        e.request();
        let Step::Instances {
            instances,
            rejected,
            ..
        } = e.on_response(&ok(GRPC_NAMING)).unwrap()
        else {
            panic!()
        };
        assert!(instances.is_empty());
        assert_eq!(rejected, ["key `my-service/1.2.3.4`: `Addr` has no port"]);
        let with_port = parse_value(br#"{"Op":0,"Addr":"1.2.3.4:50051","Metadata":"x"}"#)
            .unwrap()
            .unwrap();
        assert_eq!(with_port.addr.to_string(), "1.2.3.4:50051");
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn login_then_range_then_relogin_on_401() {
        let mut e = etcd(r#","username":"root","password":"pass""#);
        let r = e.request();
        assert_eq!(r.path, "/v3/auth/authenticate");
        assert_eq!(e.on_response(&ok(AUTH)).unwrap(), Step::Again("login"));
        let r = e.request();
        assert_eq!(r.path, "/v3/kv/range");
        assert!(r
            .headers
            .contains(&("authorization".into(), "HFabdZrvwCdCuQjn.15".into())));
        let expired = HttpResponse {
            status: 401,
            headers: &[],
            body: INVALID_TOKEN.as_bytes(),
        };
        assert_eq!(
            e.on_response(&expired).unwrap(),
            Step::Again("token_expired")
        );
        assert_eq!(e.request().path, "/v3/auth/authenticate");
        let wrong = HttpResponse {
            status: 400,
            headers: &[],
            body: WRONG_PASSWORD.as_bytes(),
        };
        let err = e.on_response(&wrong).unwrap_err();
        assert_eq!(err.kind(), "auth");
        assert!(
            err.to_string().contains("login as `root` failed: 400"),
            "{err}"
        );
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn auth_required_without_credentials_is_an_auth_error() {
        let mut e = etcd("");
        e.request();
        let r = HttpResponse {
            status: 400,
            headers: &[],
            body: NO_TOKEN.as_bytes(),
        };
        assert_eq!(e.on_response(&r).unwrap_err().kind(), "auth");
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn bad_values_are_rejected_one_by_one() {
        let kv = |k: &str, v: &str| Kv {
            key: B64.encode(k),
            value: B64.encode(v),
        };
        let kvs = vec![
            kv(
                "/services/web/a",
                r#"{"address":"10.0.0.1","port":80,"state":"draining","metadata":{"v":2}}"#,
            ),
            kv(
                "/services/web/b",
                r#"{"address":"web-b.internal","port":80}"#,
            ),
            kv("/services/web/c", r#"not json"#),
            kv(
                "/services/web/d",
                r#"{"address":"10.0.0.4","port":80,"weight":0}"#,
            ),
            kv("/services/web/e", r#"{"address":"10.0.0.5","port":99999}"#),
            kv(
                "/services/web/f",
                r#"{"address":"10.0.0.6","port":80,"weight":-1}"#,
            ),
            Kv {
                key: B64.encode("/services/web/g"),
                value: "%%%".into(),
            },
        ];
        let (list, rejected) = parse_kvs(&kvs);
        assert_eq!(list.len(), 1);
        assert_eq!(list[0].state, State::Draining);
        assert_eq!(list[0].metadata, vec![("v".to_string(), "2".to_string())]);
        assert_eq!(rejected.len(), 5, "{rejected:?}");
        assert!(rejected[0].starts_with("key `/services/web/b`"));
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn malformed_range_bodies() {
        for body in [
            "",
            "[]",
            "{\"kvs\":[]}",
            "{\"header\":{\"revision\":\"x\"}}",
            "{\"header\":{\"revision\":\"9\"},\"kvs\":{}}",
        ] {
            let mut e = etcd("");
            e.request();
            assert_eq!(
                e.on_response(&ok(body)).unwrap_err().kind(),
                "malformed",
                "{body}"
            );
            assert_eq!(e.revision, 0);
        }
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn prefix_end_matches_etcd() {
        assert_eq!(prefix_end(b"/services/web/"), b"/services/web0");
        assert_eq!(prefix_end(b"a\xff"), b"b");
        assert_eq!(prefix_end(b"\xff\xff"), vec![0]);
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn etcd_config_defaults_and_errors() {
        let c = one_source(r#"{"etcd":{"cluster":"etcd"}}"#).unwrap();
        let SourceConfig::Etcd(e) = &c.services[0].sources[0] else {
            panic!()
        };
        assert_eq!((e.prefix.as_deref(), e.authority()), (None, "etcd"));
        for (src, want) in [
            (
                r#"{"etcd":{"cluster":""}}"#,
                "services[0].sources[0].etcd.cluster: must name an Envoy cluster",
            ),
            (
                r#"{"etcd":{"cluster":"e","prefix":""}}"#,
                "services[0].sources[0].etcd.prefix: must not be empty (it would select the whole keyspace)",
            ),
            (
                r#"{"etcd":{"cluster":"e","password":"p"}}"#,
                "services[0].sources[0].etcd.username: username and password go together",
            ),
        ] {
            let e = one_source(src).unwrap_err();
            assert_eq!(e.0, want, "{src}");
        }
    }
}
