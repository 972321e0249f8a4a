//! The hash key of a request, for `ring_hash` and `maglev`.
//!
//! Reference: Envoy's route `hash_policy` (`header`, `cookie`, `connection_properties:
//! source_ip`, and a header policy on `:path`), which hashes the chosen value with
//! xxHash64, seed 0. The same hash is used here (the `xxhash-rust` crate), so a key
//! shorter than [`MAX_KEY_BYTES`] hashes exactly as in Envoy.
//!
//! - [`HashOn::Header`]: the header's value as bytes (binary values hash too).
//! - [`HashOn::Cookie`]: the named cookie from the `Cookie` header, split on `;` and
//!   the first `=`, names and values trimmed, surrounding double quotes of a value
//!   removed (RFC 6265 `cookie-value`). Names compare case-sensitively; the first
//!   match wins; an empty value counts as missing.
//! - [`HashOn::SourceIp`]: the IP of the downstream address (`10.0.0.1:5555`,
//!   `[::1]:5555` or a bare IP), port dropped, hashed as Envoy's canonical text.
//!   Text that is not an address counts as missing.
//! - [`HashOn::Path`]: the `:path` value, optionally without its query string.
//!
//! **Missing key.** [`Key::Missing`] tells the caller; [`Key::or_random`] turns it
//! into a random hash, so such requests spread like `random` instead of all landing
//! on one host — what Envoy does when no hash policy produces a hash.
//!
//! **Huge keys.** At most [`MAX_KEY_BYTES`] bytes are hashed, so a 60 KiB header costs
//! the same as a 1 KiB one. A longer key hashes its first `MAX_KEY_BYTES` bytes with
//! its full length as the seed: keys that differ only after the cap still differ if
//! their lengths do, and otherwise share a host (documented trade-off). Left out:
//! Envoy's `terminal` policies, combining several policies, cookie generation with a
//! TTL, regex rewrites of the value, `filter_state` and `query_parameter` sources.

use std::net::{IpAddr, SocketAddr};
use xxhash_rust::xxh64::xxh64;

/// Bytes of a key that are hashed.
pub const MAX_KEY_BYTES: usize = 1024;

/// Where the key of a request comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HashOn {
    /// A request header, by (lower-case) name.
    Header(String),
    /// A cookie, by name.
    Cookie(String),
    /// The downstream (client) IP address.
    SourceIp,
    /// The request path; `strip_query` drops `?…`.
    Path { strip_query: bool },
}

/// What the request carried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Key {
    Hash(u64),
    Missing,
}

impl Key {
    /// The hash, or a random one when the request had no key.
    pub fn or_random(self, rng: &mut impl crate::rng::Rng) -> u64 {
        match self {
            Key::Hash(h) => h,
            Key::Missing => rng.next_u64(),
        }
    }

    pub fn hash(self) -> Option<u64> {
        match self {
            Key::Hash(h) => Some(h),
            Key::Missing => None,
        }
    }
}

/// The request attributes a key may come from; the host layer fills what it read.
#[derive(Debug, Clone, Copy, Default)]
pub struct RequestParts<'a> {
    /// Value of the header named by [`HashOn::Header`], if present.
    pub header: Option<&'a [u8]>,
    /// Value of the `Cookie` header, if present.
    pub cookie_header: Option<&'a str>,
    /// Downstream address (Envoy's `source.address`).
    pub source_address: Option<&'a str>,
    /// `:path`.
    pub path: Option<&'a str>,
}

/// The key of a request under `on`.
pub fn key(on: &HashOn, req: &RequestParts<'_>) -> Key {
    let h = match on {
        HashOn::Header(_) => req.header.map(hash_bytes),
        HashOn::Cookie(name) => req
            .cookie_header
            .and_then(|c| cookie_value(c, name))
            .map(|v| hash_bytes(v.as_bytes())),
        HashOn::SourceIp => req
            .source_address
            .and_then(source_ip)
            .map(|ip| hash_bytes(ip.to_string().as_bytes())),
        HashOn::Path { strip_query } => req.path.map(|p| {
            let p = if *strip_query {
                p.split_once('?').map_or(p, |(a, _)| a)
            } else {
                p
            };
            hash_bytes(p.as_bytes())
        }),
    };
    h.map_or(Key::Missing, Key::Hash)
}

/// xxHash64 (seed 0) of at most [`MAX_KEY_BYTES`] bytes; longer keys are seeded with
/// their length.
pub fn hash_bytes(b: &[u8]) -> u64 {
    match b.get(..MAX_KEY_BYTES) {
        Some(prefix) if b.len() > MAX_KEY_BYTES => xxh64(prefix, b.len() as u64),
        _ => xxh64(b, 0),
    }
}

/// Value of cookie `name` in a `Cookie` header value; `None` when absent or empty.
pub fn cookie_value<'a>(header: &'a str, name: &str) -> Option<&'a str> {
    for pair in header.split(';') {
        let Some((n, v)) = pair.split_once('=') else {
            continue;
        };
        if n.trim() != name {
            continue;
        }
        let v = v.trim();
        let v = v
            .strip_prefix('"')
            .and_then(|x| x.strip_suffix('"'))
            .unwrap_or(v);
        return if v.is_empty() { None } else { Some(v) };
    }
    None
}

/// The IP of `ip:port`, `[v6]:port` or a bare IP.
pub fn source_ip(addr: &str) -> Option<IpAddr> {
    let addr = addr.trim();
    if let Ok(sa) = addr.parse::<SocketAddr>() {
        return Some(sa.ip());
    }
    addr.trim_start_matches('[')
        .trim_end_matches(']')
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SplitMix64;
    use wasm_bindgen_test::wasm_bindgen_test;

    fn parts() -> RequestParts<'static> {
        RequestParts {
            header: Some(b"user-42"),
            cookie_header: Some("a=1; session = abc123 ; theme=\"dark\"; empty=; flag"),
            source_address: Some("192.168.1.7:53211"),
            path: Some("/cart/items?page=2"),
        }
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn header_hash_is_envoys_xxhash64() {
        assert_eq!(
            key(&HashOn::Header("x-user".into()), &parts()),
            Key::Hash(xxh64(b"user-42", 0))
        );
        // Pinned value: xxHash64("user-42", 0) on every target.
        assert_eq!(
            hash_bytes(b"user-42"),
            PINNED_USER_42,
            "{:#x}",
            hash_bytes(b"user-42")
        );
        assert_eq!(hash_bytes(b"abc"), 0x44BC_2CF5_AD77_0999);
    }
    const PINNED_USER_42: u64 = 0x397E_9D3A_76AF_7C81;

    #[wasm_bindgen_test(unsupported = test)]
    fn cookies() {
        let c = "a=1; session = abc123 ; theme=\"dark\"; empty=; flag; x=a=b";
        assert_eq!(cookie_value(c, "session"), Some("abc123"));
        assert_eq!(cookie_value(c, "a"), Some("1"));
        assert_eq!(cookie_value(c, "theme"), Some("dark"));
        assert_eq!(cookie_value(c, "x"), Some("a=b"));
        assert_eq!(cookie_value(c, "empty"), None);
        assert_eq!(cookie_value(c, "flag"), None);
        assert_eq!(cookie_value(c, "Session"), None);
        assert_eq!(cookie_value("", "a"), None);
        assert_eq!(cookie_value("a=1; a=2", "a"), Some("1"));
        assert_eq!(
            key(&HashOn::Cookie("session".into()), &parts()),
            Key::Hash(xxh64(b"abc123", 0))
        );
        assert_eq!(key(&HashOn::Cookie("nope".into()), &parts()), Key::Missing);
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn source_ip_drops_the_port() {
        let ip = |a: &'static str| {
            key(
                &HashOn::SourceIp,
                &RequestParts {
                    source_address: Some(a),
                    ..Default::default()
                },
            )
        };
        assert_eq!(ip("192.168.1.7:53211"), Key::Hash(xxh64(b"192.168.1.7", 0)));
        assert_eq!(ip("192.168.1.7:1"), ip("192.168.1.7"));
        assert_eq!(ip("[2001:db8::1]:443"), Key::Hash(xxh64(b"2001:db8::1", 0)));
        assert_eq!(ip("[2001:DB8:0::1]"), ip("2001:db8::1"));
        assert_eq!(ip("not an address"), Key::Missing);
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn path_with_and_without_query() {
        let with = key(&HashOn::Path { strip_query: false }, &parts());
        let without = key(&HashOn::Path { strip_query: true }, &parts());
        assert_eq!(with, Key::Hash(xxh64(b"/cart/items?page=2", 0)));
        assert_eq!(without, Key::Hash(xxh64(b"/cart/items", 0)));
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn missing_keys_fall_back_to_random() {
        let none = RequestParts::default();
        for on in [
            HashOn::Header("x".into()),
            HashOn::Cookie("c".into()),
            HashOn::SourceIp,
            HashOn::Path { strip_query: true },
        ] {
            assert_eq!(key(&on, &none), Key::Missing);
        }
        let mut r = SplitMix64(0);
        assert_eq!(Key::Missing.or_random(&mut r), 0xE220_A839_7B1D_CDAF);
        assert_eq!(Key::Hash(7).or_random(&mut r), 7);
        assert_eq!(Key::Missing.hash(), None);
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn huge_and_binary_keys_hash() {
        let binary = [0u8, 255, 13, 10, 0, 128];
        assert_eq!(hash_bytes(&binary), xxh64(&binary, 0));
        assert_eq!(hash_bytes(b""), xxh64(b"", 0));
        let big = vec![b'x'; 60_000];
        let bigger = vec![b'x'; 60_001];
        assert_eq!(hash_bytes(&big), xxh64(&big[..MAX_KEY_BYTES], 60_000));
        assert_ne!(hash_bytes(&big), hash_bytes(&bigger));
        // Same length, differing only past the cap: same hash (the documented trade-off).
        let mut other = big.clone();
        other[59_999] = b'y';
        assert_eq!(hash_bytes(&big), hash_bytes(&other));
        // Exactly at the cap: plain xxHash64.
        assert_eq!(
            hash_bytes(&big[..MAX_KEY_BYTES]),
            xxh64(&big[..MAX_KEY_BYTES], 0)
        );
    }
}
