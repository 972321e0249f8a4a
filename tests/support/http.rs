//! The HTTP/1.1 server behind the test fakes: hyper 1.x on a tokio runtime of its own.
//!
//! Each `HttpServer` owns a std thread running a current-thread tokio runtime. The
//! handler is plain blocking code (it may sleep, or wait on a Condvar for minutes for a
//! Consul blocking query), so every request runs it on tokio's blocking pool: a slow
//! request never holds up another one, on the same connection's neighbours or elsewhere.
//!
//! `stop()` makes a fake behave like a killed process: the listening socket is closed
//! (new connections are refused, the port can be bound again) and every connection
//! already accepted is closed at once, including kept-alive idle ones and ones whose
//! handler is still running (that handler finishes in the background, unanswered).
//! Envoy keeps pooled upstream connections, so without this a "stopped" backend would
//! leave requests hanging instead of failing fast.

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderName, HeaderValue, CONNECTION, CONTENT_LENGTH, TRANSFER_ENCODING};
use hyper::service::service_fn;
use hyper::{StatusCode, Version};
use hyper_util::rt::TokioIo;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;
use tokio::task::JoinSet;

const MAX_BODY: usize = 16 * 1024 * 1024;
const MAX_HEADERS: usize = 200;
/// Blocking-pool size: each in-flight request holds one thread while its handler runs.
const MAX_BLOCKING_THREADS: usize = 512;
/// How long `stop()` waits for the server thread to close everything.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// A received request.
#[derive(Clone, Debug)]
pub struct Request {
    pub method: String,
    /// The request target as sent: path plus `?query` if any.
    pub target: String,
    /// Path without the query, not percent-decoded.
    pub path: String,
    /// Raw query string without the `?` ("" if none).
    pub query: String,
    /// Headers in the order hyper gives them; names are lowercase (hyper normalizes them).
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub http10: bool,
}

impl Request {
    /// First header with this name, case-insensitive.
    pub fn header(&self, name: &str) -> Option<&str> {
        header_value(&self.headers, name)
    }

    /// Query parameters, percent-decoded, in order. `?passing` gives ("passing", None).
    pub fn query_params(&self) -> Vec<(String, Option<String>)> {
        parse_query(&self.query)
    }
}

/// A response to send. `Content-Length` and `Connection` are set by the server.
#[derive(Clone, Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn new(status: u16, body: impl Into<Vec<u8>>) -> Response {
        Response {
            status,
            headers: Vec::new(),
            body: body.into(),
        }
    }
    pub fn text(status: u16, body: &str) -> Response {
        Response::new(status, body).header("Content-Type", "text/plain; charset=utf-8")
    }
    pub fn json(status: u16, body: &str) -> Response {
        Response::new(status, body).header("Content-Type", "application/json")
    }
    pub fn header(mut self, name: &str, value: &str) -> Response {
        self.headers.push((name.to_string(), value.to_string()));
        self
    }
}

/// A recorded request: (path?query, headers as received).
pub type RequestRecord = (String, Vec<(String, String)>);

/// Handler: return `None` to close the connection without answering.
pub type Handler = Arc<dyn Fn(&Request) -> Option<Response> + Send + Sync>;

/// Case-insensitive header lookup in a header list.
pub fn header_value<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// Parse `a=1&b&c=x%20y` into decoded pairs (form decoding: `+` is a space, as Go's
/// url.ParseQuery does). A key without `=` gets `None`, so `?passing` and `?passing=`
/// can be told apart.
pub fn parse_query(q: &str) -> Vec<(String, Option<String>)> {
    q.split('&')
        .filter(|s| !s.is_empty())
        .filter_map(|kv| {
            let (k, v) = url::form_urlencoded::parse(kv.as_bytes()).next()?;
            let v = kv.contains('=').then(|| v.into_owned());
            Some((k.into_owned(), v))
        })
        .collect()
}

/// Percent-decode a path segment (RFC 3986: `+` stays `+`, as in Go's url.PathUnescape).
/// Invalid UTF-8 is replaced.
pub fn percent_decode(s: &str) -> String {
    percent_encoding::percent_decode_str(s)
        .decode_utf8_lossy()
        .into_owned()
}

/// Characters `percent_encode` leaves alone: RFC 3986 unreserved.
const UNRESERVED: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// Percent-encode everything but unreserved characters.
pub fn percent_encode(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, UNRESERVED).to_string()
}

/// Standard reason phrase of a status code ("Status" if it has none).
pub fn reason(status: u16) -> &'static str {
    StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("Status")
}

/// A running server. `stop()` (or Drop) closes the listener and every open connection.
pub struct HttpServer {
    pub port: u16,
    stopped: Arc<AtomicBool>,
    shutdown: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl HttpServer {
    /// Bind 127.0.0.1:`port` (0 = any free port) and serve `handler`.
    pub fn start(port: u16, handler: Handler) -> io::Result<HttpServer> {
        let std_listener = std::net::TcpListener::bind(("127.0.0.1", port))?;
        let port = std_listener.local_addr()?.port();
        std_listener.set_nonblocking(true)?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .max_blocking_threads(MAX_BLOCKING_THREADS)
            .thread_name(format!("http-{port}-blocking"))
            .build()?;
        let listener = {
            let _guard = rt.enter();
            tokio::net::TcpListener::from_std(std_listener)?
        };
        let stopped = Arc::new(AtomicBool::new(false));
        let (tx, rx) = oneshot::channel();
        let st = stopped.clone();
        let thread = thread::Builder::new()
            .name(format!("http-{port}"))
            .spawn(move || {
                rt.block_on(serve(listener, rx, handler, st));
                // Connection tasks are gone already; do not wait for handlers still
                // running on the blocking pool (e.g. a Consul blocking query).
                rt.shutdown_background();
            })?;
        Ok(HttpServer {
            port,
            stopped,
            shutdown: Some(tx),
            thread: Some(thread),
        })
    }

    pub fn is_stopped(&self) -> bool {
        self.stopped.load(Ordering::SeqCst)
    }

    /// Close the listening socket (new connections are refused once this returns)
    /// and every open connection. Idempotent.
    pub fn stop(&mut self) {
        self.stopped.store(true, Ordering::SeqCst);
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(h) = self.thread.take() {
            // The server thread only runs async code, so it exits promptly; bound the
            // wait anyway so a bug here cannot hang a whole test run.
            let deadline = Instant::now() + STOP_TIMEOUT;
            while !h.is_finished() && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(1));
            }
            if h.is_finished() {
                let _ = h.join();
            }
        }
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Accept until shut down; then close the listener and abort every connection task
/// (dropping a task drops its socket, which closes the connection).
async fn serve(
    listener: tokio::net::TcpListener,
    mut shutdown: oneshot::Receiver<()>,
    handler: Handler,
    stopped: Arc<AtomicBool>,
) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            biased;
            _ = &mut shutdown => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let _ = stream.set_nodelay(true);
                    conns.spawn(serve_conn(stream, handler.clone(), stopped.clone()));
                }
                // e.g. EMFILE: back off instead of spinning.
                Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
            },
        }
    }
    drop(listener);
    conns.shutdown().await;
}

async fn serve_conn(stream: tokio::net::TcpStream, handler: Handler, stopped: Arc<AtomicBool>) {
    let service = service_fn(move |req| handle(req, handler.clone(), stopped.clone()));
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .keep_alive(true)
        .header_read_timeout(None)
        .max_headers(MAX_HEADERS);
    let _ = builder
        .serve_connection(TokioIo::new(stream), service)
        .await;
}

/// Returning `Err` makes hyper close the connection without writing a response.
async fn handle(
    req: hyper::Request<Incoming>,
    handler: Handler,
    stopped: Arc<AtomicBool>,
) -> Result<hyper::Response<Full<Bytes>>, io::Error> {
    let closed = || io::Error::new(io::ErrorKind::ConnectionAborted, "closed without answer");
    if stopped.load(Ordering::SeqCst) {
        return Err(closed());
    }
    let (parts, body) = req.into_parts();
    let body = Limited::new(body, MAX_BODY)
        .collect()
        .await
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?
        .to_bytes()
        .to_vec();
    let headers = parts
        .headers
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_string(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    let target = match parts.uri.path_and_query() {
        Some(pq) if parts.uri.scheme().is_none() => pq.as_str().to_string(),
        _ => parts.uri.to_string(),
    };
    let request = Request {
        method: parts.method.as_str().to_string(),
        target,
        path: parts.uri.path().to_string(),
        query: parts.uri.query().unwrap_or("").to_string(),
        headers,
        body,
        http10: parts.version == Version::HTTP_10,
    };
    // The handler may block for minutes; if the connection is closed meanwhile, this
    // future is dropped and the handler finishes on its own, its answer discarded.
    let answer = tokio::task::spawn_blocking(move || handler(&request))
        .await
        .map_err(|e| io::Error::other(e.to_string()))?;
    let Some(resp) = answer else {
        return Err(closed());
    };
    if stopped.load(Ordering::SeqCst) {
        return Err(closed());
    }
    Ok(to_hyper(resp))
}

fn to_hyper(resp: Response) -> hyper::Response<Full<Bytes>> {
    let mut out = hyper::Response::new(Full::new(Bytes::from(resp.body)));
    *out.status_mut() =
        StatusCode::from_u16(resp.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let headers = out.headers_mut();
    for (k, v) in &resp.headers {
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(k.as_bytes()),
            HeaderValue::from_str(v),
        ) else {
            continue;
        };
        // Framing and connection management are hyper's.
        if name == CONTENT_LENGTH || name == CONNECTION || name == TRANSFER_ENCODING {
            continue;
        }
        headers.append(name, value);
    }
    out
}
