//! `bench-backend 127.0.0.1:18001 127.0.0.1:18002=50 …`: one HTTP/1.1 server (hyper,
//! keep-alive) per address, answering `200 ok`; `=N` delays every answer by N ms
//! (a slow instance). `GET /__delay?ms=N` sent to one address changes that
//! address's delay from then on (a backend that degrades midway). One thread: the
//! backends of `./dev bench` must leave the CPU to Envoy. Runs until killed, or at most `BENCH_BACKEND_MAX_SECS` (default 3600).

use bytes::Bytes;
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use std::cell::Cell;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Duration;
use tokio::net::TcpListener;

fn parse(arg: &str) -> Result<(SocketAddr, u64), String> {
    let (addr, delay) = match arg.split_once('=') {
        Some((a, d)) => (
            a,
            d.parse::<u64>().map_err(|e| format!("{arg}: delay: {e}"))?,
        ),
        None => (arg, 0),
    };
    let addr: SocketAddr = addr.parse().map_err(|e| format!("{arg}: address: {e}"))?;
    if !addr.ip().is_loopback() {
        return Err(format!("{arg}: only loopback addresses are served"));
    }
    Ok((addr, delay))
}

/// The new delay a control request asks for: `/__delay?ms=N`.
fn control(req: &Request<hyper::body::Incoming>) -> Option<u64> {
    if req.uri().path() != "/__delay" {
        return None;
    }
    req.uri()
        .query()?
        .split('&')
        .find_map(|kv| kv.strip_prefix("ms="))
        .and_then(|v| v.parse().ok())
}

async fn serve(listener: TcpListener, delay_ms: u64) {
    let delay = Rc::new(Cell::new(delay_ms));
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let delay = Rc::clone(&delay);
        tokio::task::spawn_local(async move {
            let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
                let delay = Rc::clone(&delay);
                async move {
                    if let Some(ms) = control(&req) {
                        delay.set(ms);
                        return Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(
                            format!("delay {ms} ms\n"),
                        ))));
                    }
                    let d = delay.get();
                    if d > 0 {
                        tokio::time::sleep(Duration::from_millis(d)).await;
                    }
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok\n"))))
                }
            });
            let _ = http1::Builder::new()
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.is_empty() {
        eprintln!(
            "usage: bench-backend ADDR[=DELAY_MS]…   e.g. 127.0.0.1:18001 127.0.0.1:18002=50"
        );
        std::process::exit(2);
    }
    let mut specs = Vec::new();
    for a in &args {
        match parse(a) {
            Ok(s) => specs.push(s),
            Err(e) => {
                eprintln!("bench-backend: {e}");
                std::process::exit(2);
            }
        }
    }
    let max_secs = std::env::var("BENCH_BACKEND_MAX_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3600u64);
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("bench-backend: {e}");
            std::process::exit(1);
        }
    };
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async move {
        for (addr, delay) in specs {
            let listener = match TcpListener::bind(addr).await {
                Ok(l) => l,
                Err(e) => {
                    eprintln!("bench-backend: cannot listen on {addr}: {e}");
                    std::process::exit(1);
                }
            };
            tokio::task::spawn_local(serve(listener, delay));
        }
        println!("ready");
        tokio::time::sleep(Duration::from_secs(max_secs)).await;
    });
}
