//! Shared data (one store per Envoy process and `vm_id`) with the statuses mapped.

use proxy_wasm::hostcalls;
use proxy_wasm::types::Status;

pub fn get(key: &str) -> (Option<Vec<u8>>, Option<u32>) {
    hostcalls::get_shared_data(key).unwrap_or((None, None))
}

pub fn set(key: &str, value: &[u8], cas: Option<u32>) -> Result<(), Status> {
    hostcalls::set_shared_data(key, Some(value), cas)
}

pub fn get_u64(key: &str) -> Option<u64> {
    let (v, _) = get(key);
    let v = v?;
    let a: [u8; 8] = v.get(..8)?.try_into().ok()?;
    Some(u64::from_le_bytes(a))
}
