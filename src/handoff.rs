//! The bytes that hand a chosen `ip:port` to Envoy through filter state.

/// Filter-state key read by Envoy's `ORIGINAL_DST` cluster.
pub const ORIGINAL_DST_KEY: &str = "envoy.network.transport_socket.original_dst_address";

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

#[cfg(test)]
mod tests {
    use super::*;
    use wasm_bindgen_test::wasm_bindgen_test;

    #[wasm_bindgen_test(unsupported = test)]
    fn filter_state_arguments_are_the_protobuf_envoy_parses() {
        let b = filter_state_args("10.0.0.1:8080");
        // field 1 (path), length 51
        assert_eq!(&b[..2], &[0x0a, 51]);
        assert_eq!(&b[2..53], ORIGINAL_DST_KEY.as_bytes());
        // field 2 (value), length 13
        assert_eq!(&b[53..55], &[0x12, 13]);
        assert_eq!(&b[55..68], b"10.0.0.1:8080");
        // field 3 (span) = 1, DownstreamRequest
        assert_eq!(&b[68..], &[0x18, 1]);
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn long_values_get_multi_byte_lengths() {
        let v = "x".repeat(200);
        let b = filter_state_args(&v);
        assert_eq!(&b[53..56], &[0x12, 0xc8, 0x01]);
    }
}
