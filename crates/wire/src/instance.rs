//! One service instance as every registry source reports it, normalised.

use std::net::{IpAddr, SocketAddr};

/// What the registry says about an instance's fitness for traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum State {
    /// Routable.
    Healthy = 0,
    /// Failing its registry health checks: not routable (except in panic mode).
    Unhealthy = 1,
    /// Going away (maintenance, out of service, terminating): no new requests.
    Draining = 2,
}

impl State {
    pub fn from_u8(v: u8) -> Option<State> {
        match v {
            0 => Some(State::Healthy),
            1 => Some(State::Unhealthy),
            2 => Some(State::Draining),
            _ => None,
        }
    }
}

/// A normalised instance. `addr` is always an IP literal with a port: the filter
/// hands it to Envoy as is, so a registry cannot smuggle a host name or a path in.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Instance {
    pub addr: SocketAddr,
    /// Relative weight, 1..=MAX_WEIGHT. A registry weight of 0 means "send nothing":
    /// such instances are left out by the parsers.
    pub weight: u32,
    pub state: State,
    /// Locality (zone) if the registry gives one; empty otherwise.
    pub zone: String,
    /// Registry tags and metadata as key/value pairs, sorted by key (tags as `tag:<t>` = "").
    pub metadata: Vec<(String, String)>,
    /// When the instance registered (or came up), Unix milliseconds; 0 = unknown.
    /// Slow start ramps from it, so a proxy restart does not re-ramp old instances.
    pub registered_ms: u64,
}

/// Entries a registry answer had that were skipped: how many, and why for the first
/// [`Rejected::KEPT`] (what the log shows). Keeping every reason made a 32 MiB answer
/// of junk entries (`[0,0,…]`) cost over 150 bytes of heap per byte of answer: the
/// count is what the metric needs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Rejected {
    count: usize,
    first: Vec<String>,
}

impl Rejected {
    /// Reasons kept.
    pub const KEPT: usize = 5;

    pub fn push(&mut self, why: String) {
        if self.first.len() < Self::KEPT {
            self.first.push(why);
        }
        self.count += 1;
    }

    /// Entries skipped, all of them.
    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The reasons kept: of the first [`Rejected::KEPT`] entries skipped.
    pub fn iter(&self) -> std::slice::Iter<'_, String> {
        self.first.iter()
    }
}

impl std::ops::Index<usize> for Rejected {
    type Output = String;
    fn index(&self, i: usize) -> &String {
        &self.first[i]
    }
}

impl<const N: usize> PartialEq<[&str; N]> for Rejected {
    fn eq(&self, other: &[&str; N]) -> bool {
        self.count == N && self.first.iter().zip(other).all(|(a, b)| a == b)
    }
}

/// Weights above this are clamped: it keeps the sum of 10,000 weights inside u32.
pub const MAX_WEIGHT: u32 = 100_000;

impl Instance {
    pub fn new(addr: SocketAddr, weight: u32) -> Instance {
        Instance {
            addr,
            weight: weight.clamp(1, MAX_WEIGHT),
            state: State::Healthy,
            zone: String::new(),
            metadata: Vec::new(),
            registered_ms: 0,
        }
    }
}

/// A registration time from metadata: Unix time in milliseconds, or in seconds
/// (values below 10¹¹, i.e. before 1973 as milliseconds). Anything else: `None`.
pub fn parse_registered_at(v: &str) -> Option<u64> {
    let n: u64 = v.trim().parse().ok()?;
    match n {
        0 => None,
        n if n < 100_000_000_000 => n.checked_mul(1000),
        n => Some(n),
    }
}

/// Why an address from a registry was refused.
#[derive(Debug, PartialEq, Eq)]
pub enum AddrError {
    NotAnIp(String),
    BadPort(i64),
    Unspecified(String),
}

impl std::fmt::Display for AddrError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AddrError::NotAnIp(a) => {
                write!(f, "address `{}` is not an IP literal", truncate(a, 64))
            }
            AddrError::BadPort(p) => write!(f, "port {p} is out of range 1..65535"),
            AddrError::Unspecified(a) => write!(f, "address `{a}` is unspecified"),
        }
    }
}

/// Validates an IP literal and port from a registry. Host names are refused: Envoy's
/// original-destination cluster needs an IP, and a name would need DNS on the request path.
pub fn socket_addr(ip: &str, port: i64) -> Result<SocketAddr, AddrError> {
    let ip_text = ip.trim().trim_start_matches('[').trim_end_matches(']');
    let ip: IpAddr = ip_text
        .parse()
        .map_err(|_| AddrError::NotAnIp(ip.to_string()))?;
    if ip.is_unspecified() {
        return Err(AddrError::Unspecified(ip.to_string()));
    }
    if !(1..=65535).contains(&port) {
        return Err(AddrError::BadPort(port));
    }
    Ok(SocketAddr::new(ip, port as u16))
}

/// Shortens untrusted text before it goes into a log line.
pub fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

#[cfg(test)]
mod tests {
    use super::*;
    use wasm_bindgen_test::wasm_bindgen_test;

    #[wasm_bindgen_test(unsupported = test)]
    fn registration_times_in_ms_or_s() {
        assert_eq!(
            parse_registered_at("1700000000123"),
            Some(1_700_000_000_123)
        );
        assert_eq!(parse_registered_at(" 1700000000 "), Some(1_700_000_000_000));
        for bad in [
            "",
            "0",
            "-5",
            "2024-01-01T00:00:00Z",
            "1.5e12",
            "99999999999999999999999",
        ] {
            assert_eq!(parse_registered_at(bad), None, "{bad}");
        }
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn accepts_ipv4_and_ipv6() {
        assert_eq!(
            socket_addr("10.0.0.1", 80).unwrap().to_string(),
            "10.0.0.1:80"
        );
        assert_eq!(socket_addr("::1", 8080).unwrap().to_string(), "[::1]:8080");
        assert_eq!(
            socket_addr("[fe80::1]", 1).unwrap().to_string(),
            "[fe80::1]:1"
        );
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn refuses_names_ports_and_unspecified() {
        assert!(matches!(
            socket_addr("web.internal", 80),
            Err(AddrError::NotAnIp(_))
        ));
        assert!(matches!(
            socket_addr("10.0.0.1:80", 80),
            Err(AddrError::NotAnIp(_))
        ));
        assert_eq!(socket_addr("10.0.0.1", 0), Err(AddrError::BadPort(0)));
        assert_eq!(
            socket_addr("10.0.0.1", 70000),
            Err(AddrError::BadPort(70000))
        );
        assert!(matches!(
            socket_addr("0.0.0.0", 80),
            Err(AddrError::Unspecified(_))
        ));
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn weight_is_clamped() {
        let a = socket_addr("10.0.0.1", 80).unwrap();
        assert_eq!(Instance::new(a, 0).weight, 1);
        assert_eq!(Instance::new(a, u32::MAX).weight, MAX_WEIGHT);
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn rejected_counts_all_and_keeps_the_first_reasons() {
        let mut r = Rejected::default();
        assert!(r.is_empty());
        for i in 0..1000 {
            r.push(format!("entry #{i}"));
        }
        assert_eq!(r.len(), 1000);
        assert_eq!(r.iter().count(), Rejected::KEPT);
        assert_eq!(r[0], "entry #0");
        assert_eq!(r.iter().last().unwrap(), "entry #4");
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn truncate_respects_char_boundaries() {
        assert_eq!(truncate("héllo", 2), "h…");
        assert_eq!(truncate("abc", 5), "abc");
    }
}
