//! Prices the host calls registry-lb makes per request. The plugin configuration is
//! `<op> <count>`; every request performs `op` `count` times, and `./dev bench
//! --phases hostcalls` compares Envoy's CPU per request with the empty filter's.
//!
//! ops (request headers unless noted):
//! - `route_metadata`: `get_property(xds.route_metadata.filter_metadata.registry_lb.service)`
//! - `get_metric` / `increment_metric`: on a gauge defined at start-up
//! - `filter_state`: `call_foreign_function("set_envoy_filter_state")` with an
//!   `original_dst_address` (count is capped at 1: the key is set once per request)
//! - `response_code`: `get_property(response.code)` in `on_log`
//! - `status_header`: `get_map_value(response headers, ":status")` in response headers
//! - `route_name`: `get_property(xds.route_name)`
//! - `cluster_name`: `get_property(xds.cluster_name)` (services claimed by `upstream_clusters`)
//! - `authority`: `get_map_value(request headers, ":authority")` (services claimed by `hosts`)
//! - `current_time`: `get_current_time` (proxy_get_current_time_nanoseconds)
//! - `guest_format`: no host call: a stat name built with `format!` and looked up in
//!   a `HashMap<String, _>`, as registry-lb's per-instance pick counter does
//! - `mimic <n> <port>`: the host calls registry-lb's `least_request` makes per
//!   request, and nothing else: route name, outlier generation gauge, clock, two
//!   in-flight gauges, filter state (to `127.0.0.1:<port + k>`, k cycling over n),
//!   in-flight +1; in `on_log` in-flight −1, `response.code`, consecutive-failure reset.
//!   Flags after the port leave parts out or change them: `nofs` (no filter state: route
//!   the probe to a cluster that balances itself), `nocode` (no `response.code`), `header`
//!   (hand the host over in `x-envoy-original-dst-host`, removing a client-sent one first),
//!   `spread` (host k is `127.0.<1 + a / 250>.<1 + a % 250>:<port + k % 100>` with
//!   a = k / 100: the layout of `./dev bench`'s large configurations), `random` (hosts
//!   drawn at random, as `least_request` does, instead of in turn)
//! - `none`: nothing (the empty filter, with this crate's code size)

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, BufferType, ContextType, MapType, MetricType};
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

proxy_wasm::main! {{
    proxy_wasm::set_root_context(|_| Box::new(Root { probe: Rc::new(RefCell::new(Probe::default())) }));
}}

#[derive(Default, Clone, Copy, PartialEq)]
enum Op {
    #[default]
    None,
    RouteMetadata,
    GetMetric,
    IncrementMetric,
    FilterState,
    ResponseCode,
    StatusHeader,
    RouteName,
    ClusterName,
    Authority,
    CurrentTime,
    GuestFormat,
    /// `proxy_set_property(["registry_lb_instance"], ip:port)`: the access-log field.
    SetProperty,
    Mimic,
}

#[derive(Default)]
struct Probe {
    op: Op,
    count: u32,
    gauge: u32,
    names: HashMap<String, u32>,
    /// mimic: filter-state arguments and gauges per host, next host.
    hosts: Vec<(Vec<u8>, u32, u32)>,
    next: usize,
    no_fs: bool,
    no_code: bool,
    header: bool,
    spread: bool,
    random: bool,
    /// random: xorshift64 state.
    seed: u64,
}

struct Root {
    probe: Rc<RefCell<Probe>>,
}

impl Context for Root {}

impl RootContext for Root {
    fn on_configure(&mut self, size: usize) -> bool {
        let cfg = hostcalls::get_buffer(BufferType::PluginConfiguration, 0, size)
            .ok()
            .flatten()
            .unwrap_or_default();
        let cfg = String::from_utf8_lossy(&cfg).to_string();
        let mut it = cfg.split_whitespace();
        let op = match it.next().unwrap_or("none") {
            "route_metadata" => Op::RouteMetadata,
            "get_metric" => Op::GetMetric,
            "increment_metric" => Op::IncrementMetric,
            "filter_state" => Op::FilterState,
            "response_code" => Op::ResponseCode,
            "status_header" => Op::StatusHeader,
            "route_name" => Op::RouteName,
            "cluster_name" => Op::ClusterName,
            "authority" => Op::Authority,
            "current_time" => Op::CurrentTime,
            "guest_format" => Op::GuestFormat,
            "set_property" => Op::SetProperty,
            "mimic" => Op::Mimic,
            "none" => Op::None,
            _ => return false,
        };
        let count = it.next().and_then(|c| c.parse().ok()).unwrap_or(1u32);
        let mut p = self.probe.borrow_mut();
        p.op = op;
        p.count = if op == Op::FilterState {
            count.min(1)
        } else {
            count
        };
        p.gauge = hostcalls::define_metric(MetricType::Gauge, "probe.gauge").unwrap_or(0);
        if op == Op::Mimic {
            let port: u32 = it.next().and_then(|c| c.parse().ok()).unwrap_or(20000);
            for flag in it.by_ref() {
                match flag {
                    "nofs" => p.no_fs = true,
                    "nocode" => p.no_code = true,
                    "header" => p.header = true,
                    "spread" => p.spread = true,
                    "random" => p.random = true,
                    _ => return false,
                }
            }
            let header = p.header;
            for k in 0..count {
                let a = hostcalls::define_metric(
                    MetricType::Gauge,
                    &format!("probe.slot_{k}.rq_active"),
                )
                .unwrap_or(0);
                let c = hostcalls::define_metric(
                    MetricType::Gauge,
                    &format!("probe.slot_{k}.consecutive_5xx"),
                )
                .unwrap_or(0);
                let host = if p.spread {
                    let a = k / 100;
                    format!("127.0.{}.{}:{}", 1 + a / 250, 1 + a % 250, port + k % 100)
                } else {
                    format!("127.0.0.1:{}", port + k)
                };
                p.hosts.push((
                    if header {
                        host.into_bytes()
                    } else {
                        filter_state_args(&host)
                    },
                    a,
                    c,
                ));
            }
            p.count = 1;
        }
        for i in 0..256u32 {
            p.names
                .insert(format!("web.instance.127_0_0_1_{}.picks", 20000 + i), i);
        }
        true
    }

    fn create_http_context(&self, _id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Http {
            probe: self.probe.clone(),
            slot: 0,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Http {
    probe: Rc<RefCell<Probe>>,
    /// mimic: the host this request went to.
    slot: usize,
}

impl Context for Http {}

/// `SetEnvoyFilterStateArguments { path = 1; value = 2; span = 3 }`, span DownstreamRequest.
fn filter_state_args(value: &str) -> Vec<u8> {
    const KEY: &str = "envoy.network.transport_socket.original_dst_address";
    let mut b = Vec::with_capacity(KEY.len() + value.len() + 8);
    b.push(0x0a);
    b.push(KEY.len() as u8);
    b.extend_from_slice(KEY.as_bytes());
    b.push(0x12);
    b.push(value.len() as u8);
    b.extend_from_slice(value.as_bytes());
    b.extend_from_slice(&[0x18, 1]);
    b
}

impl HttpContext for Http {
    fn on_http_request_headers(&mut self, _n: usize, _eos: bool) -> Action {
        if self.probe.borrow().op == Op::Mimic {
            let mut p = self.probe.borrow_mut();
            let n = p.hosts.len().max(1);
            let k = if p.random {
                let mut x = p.seed | 1;
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                p.seed = x;
                (x % n as u64) as usize
            } else {
                p.next % n
            };
            p.next = p.next.wrapping_add(1);
            self.slot = k;
            std::hint::black_box(
                hostcalls::get_property(vec!["xds", "route_name"])
                    .ok()
                    .flatten(),
            );
            std::hint::black_box(hostcalls::get_metric(p.gauge).unwrap_or(0));
            std::hint::black_box(hostcalls::get_current_time().ok());
            if let (Some(a), Some(b)) = (p.hosts.get(k), p.hosts.get((k + 1) % n)) {
                std::hint::black_box(
                    hostcalls::get_metric(a.1).unwrap_or(0)
                        + hostcalls::get_metric(b.1).unwrap_or(0),
                );
            }
            if let Some(h) = p.hosts.get(k) {
                if p.header {
                    const H: &str = "x-envoy-original-dst-host";
                    if let Ok(Some(_)) =
                        hostcalls::get_map_value_bytes(MapType::HttpRequestHeaders, H)
                    {
                        let _ =
                            hostcalls::set_map_value_bytes(MapType::HttpRequestHeaders, H, None);
                    }
                    let _ =
                        hostcalls::set_map_value_bytes(MapType::HttpRequestHeaders, H, Some(&h.0));
                } else if !p.no_fs {
                    let _ = hostcalls::call_foreign_function("set_envoy_filter_state", Some(&h.0));
                }
                let _ = hostcalls::increment_metric(h.1, 1);
            }
            return Action::Continue;
        }
        let p = self.probe.borrow();
        let mut sink = 0u64;
        for i in 0..p.count {
            match p.op {
                Op::RouteMetadata => {
                    let v = hostcalls::get_property(vec![
                        "xds",
                        "route_metadata",
                        "filter_metadata",
                        "registry_lb",
                        "service",
                    ]);
                    sink += v.ok().flatten().map(|v| v.len() as u64).unwrap_or(0);
                }
                Op::GetMetric => sink += hostcalls::get_metric(p.gauge).unwrap_or(0),
                Op::IncrementMetric => {
                    let _ = hostcalls::increment_metric(p.gauge, if i % 2 == 0 { 1 } else { -1 });
                }
                Op::FilterState => {
                    let _ = hostcalls::call_foreign_function(
                        "set_envoy_filter_state",
                        Some(&filter_state_args("127.0.0.1:20000")),
                    );
                }
                Op::SetProperty => {
                    let _ = hostcalls::set_property(
                        vec!["registry_lb_instance"],
                        Some(b"127.0.0.1:20000".as_slice()),
                    );
                }
                Op::GuestFormat => {
                    let host = format!("127.0.0.1:{}", 20000 + (i % 256));
                    let safe: String = host
                        .chars()
                        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
                        .collect();
                    let name = format!("web.instance.{safe}.picks");
                    sink += p.names.get(&name).copied().unwrap_or(0) as u64;
                }
                Op::RouteName => {
                    let v = hostcalls::get_property(vec!["xds", "route_name"]);
                    sink += v.ok().flatten().map(|v| v.len() as u64).unwrap_or(0);
                }
                Op::ClusterName => {
                    let v = hostcalls::get_property(vec!["xds", "cluster_name"]);
                    sink += v.ok().flatten().map(|v| v.len() as u64).unwrap_or(0);
                }
                Op::Authority => {
                    let v = hostcalls::get_map_value(MapType::HttpRequestHeaders, ":authority");
                    sink += v.ok().flatten().map(|v| v.len() as u64).unwrap_or(0);
                }
                Op::CurrentTime => {
                    sink += hostcalls::get_current_time()
                        .ok()
                        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                        .map(|d| d.subsec_nanos() as u64)
                        .unwrap_or(0);
                }
                Op::ResponseCode | Op::StatusHeader | Op::None | Op::Mimic => {}
            }
        }
        std::hint::black_box(sink);
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _n: usize, _eos: bool) -> Action {
        let p = self.probe.borrow();
        if p.op == Op::StatusHeader {
            for _ in 0..p.count {
                std::hint::black_box(
                    hostcalls::get_map_value(MapType::HttpResponseHeaders, ":status")
                        .ok()
                        .flatten(),
                );
            }
        }
        Action::Continue
    }

    fn on_log(&mut self) {
        let p = self.probe.borrow();
        if p.op == Op::Mimic {
            if let Some(h) = p.hosts.get(self.slot) {
                let _ = hostcalls::increment_metric(h.1, -1);
                if !p.no_code {
                    std::hint::black_box(
                        hostcalls::get_property(vec!["response", "code"])
                            .ok()
                            .flatten(),
                    );
                }
                let _ = hostcalls::record_metric(h.2, 0);
            }
            return;
        }
        if p.op == Op::ResponseCode {
            for _ in 0..p.count {
                std::hint::black_box(
                    hostcalls::get_property(vec!["response", "code"])
                        .ok()
                        .flatten(),
                );
            }
        }
    }
}
