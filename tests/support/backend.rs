//! An HTTP backend that says who it is.

use super::http::{HttpServer, RequestRecord, Response};
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

const LOG_CAP: usize = 10_000;
const MAX_DELAY: Duration = Duration::from_secs(120);

struct State {
    name: String,
    delay_ms: AtomicU64,
    status: AtomicU16,
    /// Status of `/healthz` only; 0 = the same as every other path.
    health_status: AtomicU16,
    hits: AtomicU64,
    stopped: AtomicBool,
    log: Mutex<Vec<RequestRecord>>,
}

/// Every request gets `status` (default 200) with body = name and header `x-backend: name`,
/// after the configured delay. Thread per connection; keep-alive supported. `stop()` closes
/// the port and all open connections (in-flight delayed requests are dropped unanswered).
pub struct Backend {
    pub name: String,
    pub port: u16,
    state: Arc<State>,
    server: HttpServer,
}

impl Backend {
    /// One backend per name, each on a free port.
    pub fn start_all(names: &[&str]) -> Vec<Backend> {
        names.iter().map(|n| Backend::start(n)).collect()
    }

    /// On a free port.
    pub fn start(name: &str) -> Backend {
        Self::start_on(name, 0)
    }

    /// On a given port (0 = any), e.g. to bring a stopped backend back on its old port.
    pub fn start_on(name: &str, port: u16) -> Backend {
        let state = Arc::new(State {
            name: name.to_string(),
            delay_ms: AtomicU64::new(0),
            status: AtomicU16::new(200),
            health_status: AtomicU16::new(0),
            hits: AtomicU64::new(0),
            stopped: AtomicBool::new(false),
            log: Mutex::new(Vec::new()),
        });
        let st = state.clone();
        let server = HttpServer::start(
            port,
            Arc::new(move |req| {
                st.hits.fetch_add(1, Ordering::SeqCst);
                if let Ok(mut l) = st.log.lock() {
                    if l.len() < LOG_CAP {
                        l.push((req.target.clone(), req.headers.clone()));
                    }
                }
                let delay =
                    Duration::from_millis(st.delay_ms.load(Ordering::SeqCst)).min(MAX_DELAY);
                let until = Instant::now() + delay;
                while Instant::now() < until {
                    if st.stopped.load(Ordering::SeqCst) {
                        return None;
                    }
                    thread::sleep((until - Instant::now()).min(Duration::from_millis(10)));
                }
                let health = st.health_status.load(Ordering::SeqCst);
                let status = if health != 0 && req.target.starts_with("/healthz") {
                    health
                } else {
                    st.status.load(Ordering::SeqCst)
                };
                Some(
                    Response::new(status, st.name.clone())
                        .header("Content-Type", "text/plain")
                        .header("x-backend", &st.name),
                )
            }),
        )
        .unwrap_or_else(|e| panic!("backend {name}: cannot bind 127.0.0.1:{port}: {e}"));
        let port = server.port;
        Backend {
            name: name.to_string(),
            port,
            state,
            server,
        }
    }

    /// "127.0.0.1:PORT"
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Delay before answering each request (applies to requests arriving from now on).
    pub fn set_delay(&self, d: Duration) {
        self.state
            .delay_ms
            .store(d.as_millis() as u64, Ordering::SeqCst);
    }

    /// Status code for every response (200 = normal).
    pub fn set_status(&self, code: u16) {
        self.state.status.store(code, Ordering::SeqCst);
    }

    /// Status of `/healthz` only (an application that reports itself not ready while
    /// it still serves); 0 = the same as every other path.
    pub fn set_health_status(&self, code: u16) {
        self.state.health_status.store(code, Ordering::SeqCst);
    }

    /// Requests received (counted on arrival, before any delay).
    pub fn hits(&self) -> u64 {
        self.state.hits.load(Ordering::SeqCst)
    }

    /// Received requests as (path?query, headers), oldest first (first 10 000 kept).
    pub fn requests(&self) -> Vec<RequestRecord> {
        self.state.log.lock().map(|l| l.clone()).unwrap_or_default()
    }

    /// Close the listening socket and every open connection. Idempotent.
    pub fn stop(&mut self) {
        self.state.stopped.store(true, Ordering::SeqCst);
        self.server.stop();
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.stop();
    }
}
