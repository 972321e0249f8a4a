//! Handing the chosen `ip:port` to Envoy.

use proxy_wasm::hostcalls;
use proxy_wasm::types::{MapType, Status};

/// Filter-state key read by Envoy's `ORIGINAL_DST` cluster.
const ORIGINAL_DST_KEY: &str = "envoy.network.transport_socket.original_dst_address";

/// `SetEnvoyFilterStateArguments { path = 1; value = 2; span = 3 }` (Envoy's
/// `source/extensions/common/wasm/foreign.cc`), span `DownstreamRequest` = 1.
pub fn filter_state_args(value: &str) -> Vec<u8> {
    let mut b = Vec::with_capacity(ORIGINAL_DST_KEY.len() + value.len() + 8);
    b.push(0x0a);
    varint(&mut b, ORIGINAL_DST_KEY.len() as u64);
    b.extend_from_slice(ORIGINAL_DST_KEY.as_bytes());
    b.push(0x12);
    varint(&mut b, value.len() as u64);
    b.extend_from_slice(value.as_bytes());
    b.push(0x18);
    varint(&mut b, 1);
    b
}

fn varint(b: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        b.push((v as u8) | 0x80);
        v >>= 7;
    }
    b.push(v as u8);
}

/// Sets the filter state from [`filter_state_args`] bytes.
pub fn set_filter_state_args(args: &[u8]) -> Result<(), Status> {
    hostcalls::call_foreign_function("set_envoy_filter_state", Some(args)).map(|_| ())
}

pub fn set_header_bytes(name: &str, value: &[u8]) -> Result<(), Status> {
    hostcalls::set_map_value_bytes(MapType::HttpRequestHeaders, name, Some(value))
}
