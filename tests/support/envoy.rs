//! A real Envoy process driven by a config file from the repo.

use super::{agent, envoy_bin, http_request, repo_root, tail};
use std::collections::HashMap;
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;
use std::time::{Duration, Instant};

/// How long an Envoy may take to be ready, in seconds (20; a test that starts many
/// at once on a small machine may raise it).
pub static READY_TIMEOUT_S: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(20);

fn ready_timeout() -> Duration {
    Duration::from_secs(READY_TIMEOUT_S.load(std::sync::atomic::Ordering::Relaxed))
}
const VALIDATE_TIMEOUT: Duration = Duration::from_secs(60);

/// Envoy config text with substitutions.
#[derive(Clone, Debug)]
pub struct EnvoyConfig {
    pub text: String,
}

/// Replace occurrences of `needle` that are not followed by an ASCII digit
/// (so `port_value: 80` does not match `port_value: 8080`). Returns (text, count).
fn replace_not_followed_by_digit(text: &str, needle: &str, to: &str) -> (String, usize) {
    let mut out = String::with_capacity(text.len());
    let mut count = 0;
    let mut rest = text;
    while let Some(i) = rest.find(needle) {
        let after = &rest[i + needle.len()..];
        out.push_str(&rest[..i]);
        if after.as_bytes().first().is_some_and(|c| c.is_ascii_digit()) {
            out.push_str(needle);
        } else {
            out.push_str(to);
            count += 1;
        }
        rest = after;
    }
    out.push_str(rest);
    (out, count)
}

impl EnvoyConfig {
    /// Load a repo-relative file, e.g. "envoy/consul.yaml".
    pub fn from_file(rel: &str) -> Self {
        let p = repo_root().join(rel);
        let text = fs::read_to_string(&p)
            .unwrap_or_else(|e| panic!("cannot read Envoy config {}: {e}", p.display()));
        EnvoyConfig { text }
    }

    pub fn from_text(text: &str) -> Self {
        EnvoyConfig {
            text: text.to_string(),
        }
    }

    /// Replace every `port_value: {from}` (also JSON `"port_value": {from}`) and every
    /// `127.0.0.1:{from}` with `to`. Matches only whole numbers. Panics if nothing matched.
    pub fn port(self, from: u16, to: u16) -> Self {
        let mut text = self.text;
        let mut total = 0;
        for (pat, rep) in [
            (format!("port_value: {from}"), format!("port_value: {to}")),
            (
                format!("\"port_value\": {from}"),
                format!("\"port_value\": {to}"),
            ),
            (format!("127.0.0.1:{from}"), format!("127.0.0.1:{to}")),
        ] {
            let (t, n) = replace_not_followed_by_digit(&text, &pat, &rep);
            text = t;
            total += n;
        }
        if total == 0 {
            panic!("EnvoyConfig::port: port {from} does not occur in the config (as `port_value: {from}` or `127.0.0.1:{from}`)");
        }
        EnvoyConfig { text }
    }

    /// Plain text replace of every occurrence; panics if `from` is absent.
    pub fn replace(self, from: &str, to: &str) -> Self {
        if !self.text.contains(from) {
            panic!("EnvoyConfig::replace: {from:?} does not occur in the config");
        }
        EnvoyConfig {
            text: self.text.replace(from, to),
        }
    }

    /// The admin port found in the top-level `admin:` block, if any.
    pub fn admin_port(&self) -> Option<u16> {
        let mut in_admin = false;
        for line in self.text.lines() {
            let top_level = !line.starts_with(' ')
                && !line.starts_with('\t')
                && !line.trim().is_empty()
                && !line.trim_start().starts_with('#');
            if top_level {
                in_admin = line.starts_with("admin:");
                continue;
            }
            if in_admin {
                if let Some(i) = line.find("port_value:") {
                    let digits: String = line[i + "port_value:".len()..]
                        .trim()
                        .chars()
                        .take_while(|c| c.is_ascii_digit())
                        .collect();
                    return digits.parse().ok();
                }
            }
        }
        None
    }

    fn write_to(&self, dir: &Path) -> PathBuf {
        let p = dir.join("envoy.yaml");
        fs::write(&p, &self.text).expect("write envoy config");
        p
    }
}

fn unique_base_id() -> u32 {
    static N: AtomicU32 = AtomicU32::new(0);
    let n = N.fetch_add(1, Ordering::SeqCst) % 100;
    (std::process::id() % 100_000) * 100 + n
}

/// A running Envoy. Killed on drop.
pub struct Envoy {
    pub admin_port: u16,
    pub listener_port: u16,
    child: Option<Child>,
    base_id: u32,
    log_path: PathBuf,
    stderr_path: PathBuf,
    config_path: PathBuf,
    agent: ureq::Agent,
    log_printed: bool,
    _tmp: tempfile::TempDir,
}

struct Spawned {
    base_id: u32,
    child: Child,
    log_path: PathBuf,
    stderr_path: PathBuf,
    config_path: PathBuf,
    tmp: tempfile::TempDir,
}

fn spawn(cfg: &EnvoyConfig, concurrency: u32, log_level: &str, extra: &[&str]) -> Spawned {
    let bin = envoy_bin();
    let tmp = tempfile::Builder::new()
        .prefix("envoy-test-")
        .tempdir()
        .expect("tempdir");
    let config_path = cfg.write_to(tmp.path());
    let log_path = tmp.path().join("envoy.log");
    let stderr_path = tmp.path().join("stderr.log");
    let out = File::create(&stderr_path).expect("create stderr log");
    let err = out.try_clone().expect("clone stderr log");
    let base_id_n = unique_base_id();
    let base_id = base_id_n.to_string();
    let conc = concurrency.to_string();
    let child = Command::new(&bin)
        .arg("-c")
        .arg(&config_path)
        .args([
            "--concurrency",
            &conc,
            "--base-id",
            &base_id,
            "-l",
            log_level,
            "--log-path",
        ])
        .arg(&log_path)
        // The log file is buffered (default flush every 10 s): flush often so log() is current.
        .args(["--file-flush-interval-msec", "50"])
        .args(extra)
        .current_dir(repo_root())
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot spawn {}: {e}", bin.display()));
    Spawned {
        base_id: base_id_n,
        child,
        log_path,
        stderr_path,
        config_path,
        tmp,
    }
}

fn read_logs(log_path: &Path, stderr_path: &Path) -> String {
    let mut s = fs::read(log_path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    let e = fs::read(stderr_path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    if !e.trim().is_empty() {
        s.push_str("\n--- envoy stdout/stderr ---\n");
        s.push_str(&e);
    }
    s
}

fn is_live(agent: &ureq::Agent, admin_port: u16) -> bool {
    let (code, body, _) = http_request(
        agent,
        "GET",
        &format!("http://127.0.0.1:{admin_port}/ready"),
        &[],
        None,
    );
    code == 200 && body.trim() == "LIVE"
}

/// A killed Envoy leaves its hot-restart shared memory behind; remove ours.
fn remove_shm(base_id: u32) {
    let _ = fs::remove_file(format!(
        "/dev/shm/envoy_shared_memory_{}",
        u64::from(base_id) * 10
    ));
}

fn kill_and_wait(child: &mut Child) -> Option<ExitStatus> {
    let _ = child.kill();
    // wait() after SIGKILL is bounded in practice; poll with a cap anyway.
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        match child.try_wait() {
            Ok(Some(st)) => return Some(st),
            Ok(None) => thread::sleep(Duration::from_millis(10)),
            Err(_) => return None,
        }
    }
    None
}

/// What Envoy logs when a port the test picked was taken before Envoy bound it.
pub const PORT_TAKEN: &str = "Address already in use";

impl Envoy {
    /// Start Envoy with `-l info` and wait (≤ 20 s) until admin `/ready` answers `LIVE`.
    pub fn start(
        cfg: &EnvoyConfig,
        admin_port: u16,
        listener_port: u16,
        concurrency: u32,
    ) -> Envoy {
        Self::start_with(cfg, admin_port, listener_port, concurrency, "info", &[])
    }

    /// Like `start`, with a log level ("debug", "trace", ...) and extra command-line args
    /// (e.g. `["--component-log-level", "wasm:debug"]`; do not repeat -c/-l/--concurrency/--base-id/--log-path).
    pub fn start_with(
        cfg: &EnvoyConfig,
        admin_port: u16,
        listener_port: u16,
        concurrency: u32,
        log_level: &str,
        extra: &[&str],
    ) -> Envoy {
        Self::try_start_with(
            cfg,
            admin_port,
            listener_port,
            concurrency,
            log_level,
            extra,
        )
        .unwrap_or_else(|e| panic!("{e}"))
    }

    /// (Start Envoys from a thread that outlives them: an Envoy is sent SIGTERM when
    /// the thread that spawned it ends, as seen with Envoy 1.40 here.)
    ///
    /// Like `start_with`, but a start that failed is an error: Envoy exited, was not
    /// ready in time, or could not bind a port (another process took it after the
    /// test picked it: see `PORT_TAKEN`).
    pub fn try_start_with(
        cfg: &EnvoyConfig,
        admin_port: u16,
        listener_port: u16,
        concurrency: u32,
        log_level: &str,
        extra: &[&str],
    ) -> Result<Envoy, String> {
        let s = spawn(cfg, concurrency, log_level, extra);
        let mut envoy = Envoy {
            admin_port,
            listener_port,
            child: Some(s.child),
            base_id: s.base_id,
            log_path: s.log_path,
            stderr_path: s.stderr_path,
            config_path: s.config_path,
            agent: agent(Duration::from_secs(5)),
            log_printed: false,
            _tmp: s.tmp,
        };
        let probe = agent(Duration::from_secs(1));
        let deadline = Instant::now() + ready_timeout();
        loop {
            if let Some(child) = envoy.child.as_mut() {
                if let Ok(Some(st)) = child.try_wait() {
                    envoy.log_printed = true;
                    return Err(format!(
                        "Envoy exited during startup ({st}); last 100 log lines:\n{}",
                        tail(&envoy.log(), 100)
                    ));
                }
            }
            if is_live(&probe, admin_port) {
                if envoy.log().contains(PORT_TAKEN) {
                    envoy.log_printed = true;
                    return Err(format!("{PORT_TAKEN}: {}", tail(&envoy.log(), 5)));
                }
                return Ok(envoy);
            }
            if Instant::now() >= deadline {
                envoy.log_printed = true;
                thread::sleep(Duration::from_millis(150));
                return Err(format!(
                    "Envoy not ready on admin port {admin_port} after {:?}; last 100 log lines:\n{}",
                    ready_timeout(),
                    tail(&envoy.log(), 100)
                ));
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// `envoy --mode validate -c <tmpfile>` (cwd = repo root). Returns (success, stdout+stderr).
    pub fn validate(cfg: &EnvoyConfig) -> (bool, String) {
        let bin = envoy_bin();
        let tmp = tempfile::Builder::new()
            .prefix("envoy-validate-")
            .tempdir()
            .expect("tempdir");
        let config_path = cfg.write_to(tmp.path());
        let out_path = tmp.path().join("out.log");
        let out = File::create(&out_path).expect("create output file");
        let err = out.try_clone().expect("clone output file");
        let mut child = Command::new(&bin)
            .args(["--mode", "validate", "-c"])
            .arg(&config_path)
            .args(["-l", "info"])
            .current_dir(repo_root())
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn {}: {e}", bin.display()));
        let deadline = Instant::now() + VALIDATE_TIMEOUT;
        let status = loop {
            match child.try_wait() {
                Ok(Some(st)) => break Some(st),
                Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(20)),
                _ => {
                    kill_and_wait(&mut child);
                    break None;
                }
            }
        };
        let mut text = fs::read(&out_path)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default();
        if status.is_none() {
            text.push_str(&format!(
                "\n<harness: validate did not finish within {VALIDATE_TIMEOUT:?}; killed>"
            ));
        }
        (status.is_some_and(|s| s.success()), text)
    }

    /// Start expecting Envoy to refuse the config. Waits (≤ 20 s) for the process to exit.
    /// Returns (exited with a failure status, full log incl. stderr). If it becomes ready
    /// instead (admin `/ready` = LIVE; or, with no admin block, "starting main dispatch loop"
    /// logged and still alive 1 s later), it is killed and (false, log) is returned.
    pub fn start_expect_failure(cfg: &EnvoyConfig, concurrency: u32) -> (bool, String) {
        let mut s = spawn(cfg, concurrency, "info", &[]);
        let admin = cfg.admin_port();
        let probe = agent(Duration::from_secs(1));
        let deadline = Instant::now() + ready_timeout();
        let mut dispatch_seen_at: Option<Instant> = None;
        let outcome = loop {
            match s.child.try_wait() {
                Ok(Some(st)) => break Some(st),
                Ok(None) => {}
                Err(_) => break None,
            }
            let ready = match admin {
                Some(p) => is_live(&probe, p),
                None => {
                    if dispatch_seen_at.is_none()
                        && read_logs(&s.log_path, &s.stderr_path)
                            .contains("starting main dispatch loop")
                    {
                        dispatch_seen_at = Some(Instant::now());
                    }
                    dispatch_seen_at.is_some_and(|t| t.elapsed() > Duration::from_secs(1))
                }
            };
            if ready || Instant::now() >= deadline {
                break None;
            }
            thread::sleep(Duration::from_millis(50));
        };
        let failed = match outcome {
            Some(st) => !st.success(),
            None => {
                kill_and_wait(&mut s.child);
                false
            }
        };
        let log = read_logs(&s.log_path, &s.stderr_path);
        remove_shm(s.base_id);
        drop(s.tmp);
        (failed, log)
    }

    /// The Envoy log so far (plus anything written to stdout/stderr). Envoy flushes its log
    /// file every 50 ms here, so a line may appear slightly after the event: use `wait_for_log`.
    pub fn log(&self) -> String {
        read_logs(&self.log_path, &self.stderr_path)
    }

    /// Wait (≤ `timeout`) until the log contains `needle`.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> bool {
        super::wait_until(timeout, Duration::from_millis(50), || {
            self.log().contains(needle)
        })
    }

    /// Number of log lines containing `needle`.
    pub fn log_count(&self, needle: &str) -> usize {
        self.log().lines().filter(|l| l.contains(needle)).count()
    }

    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Waits (≤ `timeout`) for Envoy to exit on its own (after `/quitquitquit`, say);
    /// `None` if it did not (it is then killed).
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let child = self.child.as_mut()?;
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(st)) = child.try_wait() {
                return Some(st);
            }
            thread::sleep(Duration::from_millis(20));
        }
        kill_and_wait(child);
        remove_shm(self.base_id);
        None
    }

    /// Send SIGTERM and wait (≤ `timeout`) for exit. Returns the exit status, or None if it
    /// did not exit in time (it is then killed). Useful to check for crashes on shutdown.
    pub fn terminate(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let pid = self.child.as_ref()?.id();
        let _ = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status();
        self.wait_exit(timeout)
    }

    /// Any admin request: (status, body).
    pub fn admin(&self, method: &str, path: &str) -> (u16, String) {
        let (c, b, _) = http_request(
            &self.agent,
            method,
            &format!("http://127.0.0.1:{}{path}", self.admin_port),
            &[],
            None,
        );
        (c, b)
    }

    /// Counters and gauges (histograms and text readouts skipped).
    pub fn stats(&self) -> HashMap<String, i64> {
        let (code, body) = self.admin("GET", "/stats?format=json");
        if code != 200 {
            panic!("GET /stats?format=json -> {code}: {body}");
        }
        let v: serde_json::Value = serde_json::from_str(&body)
            .unwrap_or_else(|e| panic!("stats json: {e}: {}", tail(&body, 5)));
        let mut out = HashMap::new();
        if let Some(arr) = v.get("stats").and_then(|s| s.as_array()) {
            for e in arr {
                let (Some(name), Some(val)) =
                    (e.get("name").and_then(|n| n.as_str()), e.get("value"))
                else {
                    continue;
                };
                let n = val.as_i64().or_else(|| val.as_u64().map(|u| u as i64));
                if let Some(n) = n {
                    out.insert(name.to_string(), n);
                }
            }
        }
        out
    }

    pub fn stat(&self, name: &str) -> Option<i64> {
        self.stats().get(name).copied()
    }

    /// GET /stats/prometheus.
    pub fn prometheus(&self) -> String {
        let (code, body) = self.admin("GET", "/stats/prometheus");
        if code != 200 {
            panic!("GET /stats/prometheus -> {code}: {body}");
        }
        body
    }

    /// GET through the listener (5 s timeouts). 4xx/5xx are returned normally; a transport
    /// error (reset, refused, timeout) gives status 0 and the error text as body.
    pub fn get(
        &self,
        path: &str,
        headers: &[(&str, &str)],
    ) -> (u16, String, Vec<(String, String)>) {
        self.request("GET", path, headers, None)
    }

    /// Any method through the listener.
    pub fn request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
    ) -> (u16, String, Vec<(String, String)>) {
        http_request(
            &self.agent,
            method,
            &format!("http://127.0.0.1:{}{path}", self.listener_port),
            headers,
            body,
        )
    }
}

impl Drop for Envoy {
    fn drop(&mut self) {
        let print = thread::panicking() && !self.log_printed;
        if let Some(mut c) = self.child.take() {
            if print {
                thread::sleep(Duration::from_millis(150)); // let the last log lines flush
            }
            kill_and_wait(&mut c);
            remove_shm(self.base_id);
        }
        if print {
            eprintln!(
                "---- last 60 Envoy log lines (admin {}) ----\n{}\n---- end Envoy log ----",
                self.admin_port,
                tail(&self.log(), 60)
            );
        }
    }
}
