//! Address ranges in CIDR notation (`127.0.0.0/8`, `::1/128`) and the source check of
//! the status view and the decision header: is a client's address (Envoy's
//! `source.address` property, `ip:port` or `[v6]:port`) inside one of them.
//!
//! Follows RFC 4632 (IPv4) and RFC 4291 §2.3 (IPv6 prefixes); a prefix with host
//! bits set is refused rather than masked, as a typo there usually means the wrong
//! range. An IPv4-mapped IPv6 source (`::ffff:127.0.0.1`) is matched as IPv4. Left
//! out: ranges written as address + netmask.

use std::net::{IpAddr, SocketAddr};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    bits: u8,
}

impl Cidr {
    /// `a.b.c.d/n` or `v6/n`; a bare address is a single host.
    pub fn parse(s: &str) -> Result<Cidr, String> {
        let (a, bits) = match s.split_once('/') {
            Some((a, b)) => {
                let bits: u8 = b
                    .parse()
                    .map_err(|_| format!("`{b}` is not a prefix length"))?;
                (a, Some(bits))
            }
            None => (s, None),
        };
        let addr: IpAddr = a
            .parse()
            .map_err(|_| format!("`{a}` is not an IPv4 or IPv6 address"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let bits = bits.unwrap_or(max);
        if bits > max {
            return Err(format!("prefix length {bits} is longer than {max}"));
        }
        let c = Cidr { addr, bits };
        if c.network() != bits_of(addr) {
            return Err(format!(
                "`{s}` has bits set past its prefix length (did you mean {}/{bits}?)",
                c.masked()
            ));
        }
        Ok(c)
    }

    fn mask(&self) -> u128 {
        let width = if self.addr.is_ipv4() { 32 } else { 128 };
        if self.bits == 0 {
            0
        } else {
            (u128::MAX << (128 - u32::from(self.bits))) >> (128 - width)
        }
    }

    fn network(&self) -> u128 {
        bits_of(self.addr) & self.mask()
    }

    fn masked(&self) -> IpAddr {
        let n = self.network();
        match self.addr {
            IpAddr::V4(_) => IpAddr::V4((n as u32).into()),
            IpAddr::V6(_) => IpAddr::V6(n.into()),
        }
    }

    /// Whether `ip` is in this range.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        ip.is_ipv4() == self.addr.is_ipv4() && bits_of(ip) & self.mask() == self.network()
    }
}

fn bits_of(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(a) => u128::from(u32::from(a)),
        IpAddr::V6(a) => u128::from(a),
    }
}

/// Loopback only: the default of every source list.
pub fn loopback() -> Vec<String> {
    vec!["127.0.0.0/8".to_string(), "::1/128".to_string()]
}

/// Parses a configured list; the error names the entry.
pub fn parse_list(at: &str, list: &[String]) -> Result<Vec<Cidr>, String> {
    list.iter()
        .enumerate()
        .map(|(i, s)| Cidr::parse(s).map_err(|e| format!("{at}[{i}]: {e}")))
        .collect()
}

/// The client's IP from Envoy's `source.address` (`ip:port`, `[v6]:port`, or a bare
/// address); `None` for anything else (a pipe, no property).
pub fn source_ip(property: &[u8]) -> Option<IpAddr> {
    let s = std::str::from_utf8(property).ok()?;
    s.parse::<SocketAddr>()
        .map(|a| a.ip())
        .or_else(|_| s.parse::<IpAddr>())
        .ok()
}

/// Whether `property` (a `source.address`) is inside one of `ranges`.
pub fn allowed(ranges: &[Cidr], property: Option<&[u8]>) -> bool {
    property
        .and_then(source_ip)
        .is_some_and(|ip| ranges.iter().any(|r| r.contains(ip)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use wasm_bindgen_test::wasm_bindgen_test;

    fn ranges(list: &[&str]) -> Vec<Cidr> {
        list.iter().map(|s| Cidr::parse(s).unwrap()).collect()
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn loopback_admits_v4_v6_and_mapped_and_nothing_else() {
        let r = parse_list("x", &loopback()).unwrap();
        for ok in [
            "127.0.0.1:5000",
            "127.9.8.7:1",
            "[::1]:80",
            "[::ffff:127.0.0.1]:80",
        ] {
            assert!(allowed(&r, Some(ok.as_bytes())), "{ok}");
        }
        for no in [
            "128.0.0.1:5000",
            "10.0.0.1:1",
            "[::2]:80",
            "[fe80::1]:80",
            "junk",
            "",
        ] {
            assert!(!allowed(&r, Some(no.as_bytes())), "{no}");
        }
        assert!(!allowed(&r, None));
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn prefixes_match_on_their_bits_only() {
        let r = ranges(&["10.1.0.0/16", "2001:db8::/32", "0.0.0.0/0"]);
        assert!(r[0].contains("10.1.255.3".parse().unwrap()));
        assert!(!r[0].contains("10.2.0.0".parse().unwrap()));
        assert!(r[1].contains("2001:db8:ffff::1".parse().unwrap()));
        assert!(!r[1].contains("2001:db9::1".parse().unwrap()));
        assert!(r[2].contains("203.0.113.9".parse().unwrap()));
        assert!(!r[2].contains("::2".parse().unwrap()));
        assert!(ranges(&["192.0.2.7"])[0].contains("192.0.2.7".parse().unwrap()));
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn bad_ranges_are_refused_with_the_reason() {
        for (bad, why) in [
            ("10.0.0.1/8", "did you mean 10.0.0.0/8"),
            ("10.0.0.0/33", "longer than 32"),
            ("::/129", "longer than 128"),
            ("10.0.0/8", "not an IPv4 or IPv6"),
            ("10.0.0.0/x", "not a prefix length"),
            ("", "not an IPv4"),
        ] {
            let e = Cidr::parse(bad).unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
        let e = parse_list(
            "status.allowed_sources",
            &["::1/128".into(), "1.2.3.4/40".into()],
        )
        .unwrap_err();
        assert!(e.starts_with("status.allowed_sources[1]: "), "{e}");
    }
}
