//! A real single-member etcd 3.4 on loopback, driven through its JSON gateway.

use super::{agent, free_port, http_request, tail};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use serde_json::{json, Value};
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// `$ETCD_BIN`, else `etcd` in /usr/bin, /usr/local/bin or on PATH.
pub fn etcd_bin() -> PathBuf {
    if let Ok(p) = std::env::var("ETCD_BIN") {
        if !p.is_empty() {
            return PathBuf::from(p);
        }
    }
    let mut candidates = vec![
        PathBuf::from("/usr/bin/etcd"),
        PathBuf::from("/usr/local/bin/etcd"),
    ];
    if let Ok(path) = std::env::var("PATH") {
        candidates.extend(
            path.split(':')
                .filter(|d| !d.is_empty())
                .map(|d| Path::new(d).join("etcd")),
        );
    }
    candidates
        .into_iter()
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("etcd not found (set ETCD_BIN or `apt-get install -y etcd-server`, or run `./dev test`)"))
}

fn b64(s: &str) -> String {
    B64.encode(s.as_bytes())
}

fn unb64(v: Option<&Value>) -> String {
    v.and_then(|v| v.as_str())
        .and_then(|s| B64.decode(s).ok())
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

/// The smallest key greater than every key with this prefix ("" = whole keyspace → "\0").
pub fn prefix_range_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

struct Auth {
    user: String,
    password: String,
    token: Option<String>,
}

/// A running etcd; killed on drop.
pub struct Etcd {
    pub client_port: u16,
    pub peer_port: u16,
    child: Option<Child>,
    log_path: PathBuf,
    agent: ureq::Agent,
    auth: Mutex<Option<Auth>>,
    _tmp: tempfile::TempDir,
}

impl Etcd {
    /// On free client and peer ports.
    pub fn start() -> Etcd {
        Self::start_inner(None, &[])
    }

    pub fn start_on(client_port: u16) -> Etcd {
        Self::start_inner(Some(client_port), &[])
    }

    /// With extra etcd flags, e.g. `["--auth-token-ttl", "2"]`.
    pub fn start_with_args(client_port: Option<u16>, extra: &[&str]) -> Etcd {
        Self::start_inner(client_port, extra)
    }

    fn start_inner(client_port: Option<u16>, extra: &[&str]) -> Etcd {
        let bin = etcd_bin();
        let mut last_log = String::new();
        // A free port may be taken between free_port() and etcd's bind: retry a few times.
        for _attempt in 0..3 {
            let cport = client_port.unwrap_or_else(free_port);
            let mut pport = free_port();
            while pport == cport {
                pport = free_port();
            }
            let tmp = tempfile::Builder::new()
                .prefix("etcd-test-")
                .tempdir()
                .expect("tempdir");
            let log_path = tmp.path().join("etcd.log");
            let out = File::create(&log_path).expect("create etcd log");
            let err = out.try_clone().expect("clone etcd log");
            let curl = format!("http://127.0.0.1:{cport}");
            let purl = format!("http://127.0.0.1:{pport}");
            let child = Command::new(&bin)
                .args(["--name", "harness", "--data-dir"])
                .arg(tmp.path().join("data"))
                .args([
                    "--listen-client-urls",
                    &curl,
                    "--advertise-client-urls",
                    &curl,
                ])
                .args([
                    "--listen-peer-urls",
                    &purl,
                    "--initial-advertise-peer-urls",
                    &purl,
                ])
                .args([
                    "--initial-cluster",
                    &format!("harness={purl}"),
                    "--initial-cluster-state",
                    "new",
                ])
                .args(["--logger", "zap", "--log-outputs", "stderr"])
                .args(extra)
                .env_remove("ETCDCTL_API")
                .stdin(Stdio::null())
                .stdout(out)
                .stderr(err)
                .spawn()
                .unwrap_or_else(|e| panic!("cannot spawn {}: {e}", bin.display()));
            let mut etcd = Etcd {
                client_port: cport,
                peer_port: pport,
                child: Some(child),
                log_path,
                agent: agent(Duration::from_secs(5)),
                auth: Mutex::new(None),
                _tmp: tmp,
            };
            match etcd.wait_ready() {
                Ok(()) => return etcd,
                Err(msg) => {
                    last_log = format!("{msg}; last 60 log lines:\n{}", tail(&etcd.log(), 60));
                    let exited = etcd
                        .child
                        .as_mut()
                        .map(|c| matches!(c.try_wait(), Ok(Some(_))))
                        .unwrap_or(true);
                    let addr_in_use = etcd.log().contains("address already in use");
                    if !(exited && addr_in_use) {
                        break;
                    }
                    // drop kills; retry with fresh ports
                }
            }
        }
        panic!("etcd did not start: {last_log}");
    }

    fn wait_ready(&mut self) -> Result<(), String> {
        let probe = agent(Duration::from_secs(1));
        let deadline = Instant::now() + READY_TIMEOUT;
        let mut version_ok = false;
        loop {
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(st)) = c.try_wait() {
                    return Err(format!("etcd exited during startup ({st})"));
                }
            }
            if !version_ok {
                let (code, body, _) =
                    http_request(&probe, "GET", &format!("{}/version", self.url()), &[], None);
                version_ok = code == 200 && body.contains("etcdserver");
            }
            if version_ok {
                // /version answers before a leader exists; wait for a range to succeed.
                let body = json!({"key": b64("harness-ready-probe")}).to_string();
                let (code, _, _) = http_request(
                    &probe,
                    "POST",
                    &format!("{}/v3/kv/range", self.url()),
                    &[("Content-Type", "application/json")],
                    Some(body.as_bytes()),
                );
                if code == 200 {
                    return Ok(());
                }
            }
            if Instant::now() >= deadline {
                return Err(format!("etcd not ready after {READY_TIMEOUT:?}"));
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// "http://127.0.0.1:PORT"
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    /// "127.0.0.1:PORT"
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.client_port)
    }

    pub fn log(&self) -> String {
        fs::read(&self.log_path)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// POST `path` with a JSON body, without any auth handling: (status, parsed body or Null).
    pub fn post_raw(&self, path: &str, body: &Value, token: Option<&str>) -> (u16, Value) {
        let mut headers = vec![("Content-Type", "application/json")];
        if let Some(t) = token {
            headers.push(("Authorization", t));
        }
        let text = body.to_string();
        let (code, resp, _) = http_request(
            &self.agent,
            "POST",
            &format!("{}{path}", self.url()),
            &headers,
            Some(text.as_bytes()),
        );
        let v = serde_json::from_str(&resp).unwrap_or(Value::String(resp));
        (code, v)
    }

    /// POST /v3/auth/authenticate → token.
    pub fn authenticate(&self, user: &str, password: &str) -> String {
        let (code, v) = self.post_raw(
            "/v3/auth/authenticate",
            &json!({"name": user, "password": password}),
            None,
        );
        match v.get("token").and_then(|t| t.as_str()) {
            Some(t) if code == 200 => t.to_string(),
            _ => panic!("etcd authenticate as {user} failed: {code} {v}"),
        }
    }

    fn current_token(&self, refresh: bool) -> Option<String> {
        let mut g = self.auth.lock().unwrap_or_else(|p| p.into_inner());
        let a = g.as_mut()?;
        if refresh || a.token.is_none() {
            a.token = Some(self.authenticate(&a.user, &a.password));
        }
        a.token.clone()
    }

    /// POST with the remembered credentials (re-authenticating once on an auth error); panics unless 200.
    pub fn call(&self, path: &str, body: Value) -> Value {
        let token = self.current_token(false);
        let (mut code, mut v) = self.post_raw(path, &body, token.as_deref());
        if code != 200 && token.is_some() && is_auth_error(code, &v) {
            let token = self.current_token(true);
            (code, v) = self.post_raw(path, &body, token.as_deref());
        }
        if code != 200 {
            panic!("etcd {path} {body} -> {code}: {v}");
        }
        v
    }

    pub fn put(&self, key: &str, value: &str) {
        self.call("/v3/kv/put", json!({"key": b64(key), "value": b64(value)}));
    }

    pub fn delete(&self, key: &str) {
        self.call("/v3/kv/deleterange", json!({"key": b64(key)}));
    }

    /// Delete every key under `prefix`.
    pub fn delete_prefix(&self, prefix: &str) {
        let end = B64.encode(prefix_range_end(prefix));
        let key = if prefix.is_empty() {
            B64.encode([0u8])
        } else {
            b64(prefix)
        };
        self.call("/v3/kv/deleterange", json!({"key": key, "range_end": end}));
    }

    pub fn get(&self, key: &str) -> Option<String> {
        let v = self.call("/v3/kv/range", json!({"key": b64(key)}));
        v.get("kvs")
            .and_then(|k| k.as_array())
            .and_then(|a| a.first())
            .map(|kv| unb64(kv.get("value")))
    }

    /// All (key, value) under `prefix`, sorted by key.
    pub fn range_prefix(&self, prefix: &str) -> Vec<(String, String)> {
        let end = B64.encode(prefix_range_end(prefix));
        let key = if prefix.is_empty() {
            B64.encode([0u8])
        } else {
            b64(prefix)
        };
        let v = self.call("/v3/kv/range", json!({"key": key, "range_end": end}));
        v.get("kvs")
            .and_then(|k| k.as_array())
            .map(|a| {
                a.iter()
                    .map(|kv| (unb64(kv.get("key")), unb64(kv.get("value"))))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Current store revision (`header.revision`, sent as a JSON string).
    pub fn revision(&self) -> i64 {
        let v = self.call(
            "/v3/kv/range",
            json!({"key": b64("harness-revision-probe")}),
        );
        let r = v.get("header").and_then(|h| h.get("revision"));
        r.and_then(|r| {
            r.as_str()
                .and_then(|s| s.parse().ok())
                .or_else(|| r.as_i64())
        })
        .unwrap_or_else(|| panic!("no header.revision in {v}"))
    }

    /// Add role "root", user "root" (and `user` if different) with `password`, grant root,
    /// enable auth. Later put/delete/range calls authenticate as `user`.
    pub fn enable_auth(&self, user: &str, password: &str) {
        let ok_or_exists = |path: &str, body: Value| {
            let (code, v) = self.post_raw(path, &body, None);
            if code != 200 && !v.to_string().contains("already exists") {
                panic!("etcd {path} -> {code}: {v}");
            }
        };
        ok_or_exists("/v3/auth/role/add", json!({"name": "root"}));
        let mut users = vec!["root".to_string()];
        if user != "root" {
            users.push(user.to_string());
        }
        for u in &users {
            ok_or_exists(
                "/v3/auth/user/add",
                json!({"name": u, "password": password}),
            );
            ok_or_exists("/v3/auth/user/grant", json!({"user": u, "role": "root"}));
        }
        let (code, v) = self.post_raw("/v3/auth/enable", &json!({}), None);
        if code != 200 {
            panic!("etcd /v3/auth/enable -> {code}: {v}");
        }
        *self.auth.lock().unwrap_or_else(|p| p.into_inner()) = Some(Auth {
            user: user.to_string(),
            password: password.to_string(),
            token: None,
        });
    }

    /// A counter of etcd's own /metrics (Prometheus text, read with the real parser).
    fn metric(&self, name: &str) -> f64 {
        let (code, text, _) = http_request(
            &self.agent,
            "GET",
            &format!("{}/metrics", self.url()),
            &[],
            None,
        );
        assert_eq!(code, 200, "etcd /metrics: {text}");
        super::prometheus::samples(&text)
            .into_iter()
            .filter(|s| s.name == name)
            .map(|s| s.value)
            .sum()
    }

    /// Ranges this member has served (`etcd_mvcc_range_total`).
    pub fn range_requests(&self) -> u64 {
        self.metric("etcd_mvcc_range_total") as u64
    }

    /// Bytes this member has sent to its clients, the JSON gateway's answers included
    /// (`etcd_network_client_grpc_sent_bytes_total`).
    pub fn sent_bytes(&self) -> f64 {
        self.metric("etcd_network_client_grpc_sent_bytes_total")
    }

    /// Kill the server (e.g. to test an unreachable registry).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn is_auth_error(code: u16, v: &Value) -> bool {
    let s = v.to_string().to_ascii_lowercase();
    code == 401
        || s.contains("invalid auth token")
        || s.contains("user name is empty")
        || s.contains("token")
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill();
        if thread::panicking() {
            eprintln!(
                "---- last 30 etcd log lines (client port {}) ----\n{}\n---- end etcd log ----",
                self.client_port,
                tail(&self.log(), 30)
            );
        }
    }
}
