//! Backend load reports, and weights derived from them.
//!
//! Reference: ORCA (Open Request Cost Aggregation, xDS `OrcaLoadReport`) as Envoy
//! reads it from the `endpoint-load-metrics` response header (`orca_parser.cc`), and
//! Envoy's client-side weighted round robin, which turns utilization into weight.
//!
//! **Parsing.** [`parse_orca`] reads the TEXT form,
//! `TEXT cpu_utilization=0.3, mem_utilization=0.8, rps_fractional=10, named_metrics.foo=1`
//! (also the un-prefixed form and `:` instead of `=`, both of which Envoy versions
//! have used): comma-separated, each item split at its first `=` or `:`, trimmed.
//! Known names are `cpu_utilization`, `mem_utilization`, `application_utilization`,
//! `rps_fractional`, `eps` and `named_metrics.<name>`; as in Envoy an unknown name,
//! a duplicate, an empty name or value, or a value that is not a finite number
//! rejects the report (and, unlike Envoy, a negative one). `BIN` and `JSON` forms are
//! refused as unsupported. Header values over [`MAX_REPORT_BYTES`] or with more than
//! [`MAX_METRICS`] items are refused before any work. [`parse_utilization`] reads a
//! plain numeric header (`0.42`, or `42%`).
//!
//! **Weights.** The utilization of a report is `application_utilization` when above
//! 0, else `cpu_utilization` (Envoy's choice). Per endpoint it is smoothed with a
//! time-based EWMA, `u ← u·d + sample·(1 − d)` with `d = exp(−max(Δt, 1 ms)/τ)` (the
//! first report is taken as is), and turned into a multiplier of the registry weight:
//!
//! ```text
//! multiplier = clamp(1 / max(u, floor), min_multiplier, max_multiplier)
//! weight     = max(1, base_weight × multiplier)
//! ```
//!
//! so an endpoint at 25% utilization gets twice the weight of one at 50%. An
//! endpoint without a report, or whose last one is older than `expire_ms` (Envoy's
//! `weight_expiration_period`, 3 min), gets the mean multiplier of those that have
//! one (Envoy's rule for hosts without weight), or 1 when none has. Multipliers are
//! fixed-point millionths and `exp` is [`crate::detmath`]'s, so weights are the same
//! natively and in wasm. Left out: Envoy's `blackout_period`, the `eps`/`qps` error
//! penalty, and the binary and JSON report forms.

use crate::detmath;

pub const ORCA_HEADER: &str = "endpoint-load-metrics";
pub const MAX_REPORT_BYTES: usize = 4096;
pub const MAX_METRICS: usize = 64;
const PPM: f64 = 1_000_000.0;

#[derive(Debug, Clone, PartialEq, Default)]
pub struct OrcaReport {
    pub cpu_utilization: Option<f64>,
    pub mem_utilization: Option<f64>,
    pub application_utilization: Option<f64>,
    pub rps_fractional: Option<f64>,
    pub eps: Option<f64>,
    pub named_metrics: Vec<(String, f64)>,
}

impl OrcaReport {
    /// `application_utilization` when above 0, else `cpu_utilization`.
    pub fn utilization(&self) -> Option<f64> {
        match self.application_utilization {
            Some(a) if a > 0.0 => Some(a),
            _ => self.cpu_utilization,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReportError {
    TooLong(usize),
    TooManyMetrics,
    UnsupportedFormat(String),
    Malformed(String),
    BadValue(String),
    UnknownMetric(String),
    Duplicate(String),
}

impl std::fmt::Display for ReportError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let t = |s: &str| crate::instance::truncate(s, 64);
        match self {
            ReportError::TooLong(n) => {
                write!(f, "load report is {n} bytes, more than {MAX_REPORT_BYTES}")
            }
            ReportError::TooManyMetrics => {
                write!(f, "load report has more than {MAX_METRICS} metrics")
            }
            ReportError::UnsupportedFormat(p) => {
                write!(f, "unsupported ORCA header format: {}", t(p))
            }
            ReportError::Malformed(s) => write!(f, "malformed load metric `{}`", t(s)),
            ReportError::BadValue(s) => write!(f, "bad value for load metric `{}`", t(s)),
            ReportError::UnknownMetric(s) => write!(f, "unsupported metric name: {}", t(s)),
            ReportError::Duplicate(s) => write!(f, "duplicate metric: {}", t(s)),
        }
    }
}

/// Parses an `endpoint-load-metrics` value (TEXT form).
pub fn parse_orca(value: &str) -> Result<OrcaReport, ReportError> {
    if value.len() > MAX_REPORT_BYTES {
        return Err(ReportError::TooLong(value.len()));
    }
    let value = value.trim();
    let body = if let Some(rest) = value.strip_prefix("TEXT ") {
        rest
    } else if value == "TEXT" {
        ""
    } else if value.starts_with("BIN ") || value.starts_with("JSON ") {
        let prefix = value.split(' ').next().unwrap_or_default();
        return Err(ReportError::UnsupportedFormat(prefix.to_string()));
    } else {
        value
    };
    let mut report = OrcaReport::default();
    let mut seen: Vec<&str> = Vec::new();
    for item in body.split(',') {
        let item = item.trim();
        if item.is_empty() {
            continue;
        }
        if seen.len() == MAX_METRICS {
            return Err(ReportError::TooManyMetrics);
        }
        let Some(cut) = item.find(['=', ':']) else {
            return Err(ReportError::Malformed(item.to_string()));
        };
        let (name, raw) = (
            item.get(..cut).unwrap_or_default().trim(),
            item.get(cut + 1..).unwrap_or_default().trim(),
        );
        if name.is_empty() || raw.is_empty() {
            return Err(ReportError::Malformed(item.to_string()));
        }
        if seen.contains(&name) {
            return Err(ReportError::Duplicate(name.to_string()));
        }
        seen.push(name);
        let v = number(raw).ok_or_else(|| ReportError::BadValue(name.to_string()))?;
        match name {
            "cpu_utilization" => report.cpu_utilization = Some(v),
            "mem_utilization" => report.mem_utilization = Some(v),
            "application_utilization" => report.application_utilization = Some(v),
            "rps_fractional" => report.rps_fractional = Some(v),
            "eps" => report.eps = Some(v),
            _ => match name.strip_prefix("named_metrics.") {
                Some(n) if !n.is_empty() => report.named_metrics.push((n.to_string(), v)),
                _ => return Err(ReportError::UnknownMetric(name.to_string())),
            },
        }
    }
    Ok(report)
}

/// Parses a plain utilization header: a fraction (`0.42`) or a percentage (`42%`).
pub fn parse_utilization(value: &str) -> Result<f64, ReportError> {
    if value.len() > 64 {
        return Err(ReportError::TooLong(value.len()));
    }
    let v = value.trim();
    let (v, scale) = match v.strip_suffix('%') {
        Some(p) => (p.trim_end(), 100.0),
        None => (v, 1.0),
    };
    number(v)
        .map(|x| x / scale)
        .ok_or_else(|| ReportError::BadValue(value.to_string()))
}

/// A finite, non-negative decimal number.
fn number(s: &str) -> Option<f64> {
    let v: f64 = s.parse().ok()?;
    (v.is_finite() && v >= 0.0).then_some(v)
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WeightConfig {
    /// Utilization below this counts as this (caps the multiplier at 1/floor).
    pub floor: f64,
    pub min_multiplier: f64,
    pub max_multiplier: f64,
    /// EWMA time constant τ.
    pub smoothing_ms: u64,
    /// Reports older than this are ignored.
    pub expire_ms: u64,
}

impl Default for WeightConfig {
    fn default() -> Self {
        WeightConfig {
            floor: 0.1,
            min_multiplier: 0.1,
            max_multiplier: 10.0,
            smoothing_ms: 10_000,
            expire_ms: 180_000,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
struct Smoothed {
    utilization: f64,
    stamp_ms: u64,
}

/// Smoothed utilization per endpoint and the weights it gives.
#[derive(Debug, Clone)]
pub struct UtilizationWeights {
    cfg: WeightConfig,
    state: Vec<Option<Smoothed>>,
}

impl UtilizationWeights {
    /// For `n` endpoints. Bounds are sanitised: floor > 0, 0 < min ≤ max ≤ 1000.
    pub fn new(n: usize, cfg: WeightConfig) -> UtilizationWeights {
        let ok = |x: f64, lo: f64, hi: f64, dflt: f64| {
            if x.is_finite() {
                x.clamp(lo, hi)
            } else {
                dflt
            }
        };
        let max_multiplier = ok(cfg.max_multiplier, 1e-6, 1000.0, 10.0);
        let cfg = WeightConfig {
            floor: ok(cfg.floor, 1e-6, 1e6, 0.1),
            min_multiplier: ok(cfg.min_multiplier, 1e-6, max_multiplier, 0.1),
            max_multiplier,
            smoothing_ms: cfg.smoothing_ms.max(1),
            expire_ms: cfg.expire_ms,
        };
        UtilizationWeights {
            cfg,
            state: vec![None; n],
        }
    }

    /// Makes room for endpoints `0..n` (existing state is kept).
    pub fn resize(&mut self, n: usize) {
        if n > self.state.len() {
            self.state.resize(n, None);
        }
    }

    /// Endpoint `i` reported `utilization` at `now_ms` (negative or NaN is ignored).
    pub fn observe(&mut self, i: usize, utilization: f64, now_ms: u64) {
        if !(utilization.is_finite() && utilization >= 0.0) {
            return;
        }
        let (tau, expire) = (self.cfg.smoothing_ms, self.cfg.expire_ms);
        let Some(slot) = self.state.get_mut(i) else {
            return;
        };
        let next = match *slot {
            Some(s) if now_ms.saturating_sub(s.stamp_ms) <= expire => {
                let dt = now_ms.saturating_sub(s.stamp_ms).max(1);
                let d = detmath::exp(-(dt as f64) / tau as f64);
                s.utilization * d + utilization * (1.0 - d)
            }
            _ => utilization,
        };
        *slot = Some(Smoothed {
            utilization: next,
            stamp_ms: now_ms.max(slot.map_or(0, |s| s.stamp_ms)),
        });
    }

    /// Smoothed utilization of `i`; `None` without a report younger than `expire_ms`.
    pub fn utilization(&self, i: usize, now_ms: u64) -> Option<f64> {
        let s = (*self.state.get(i)?)?;
        (now_ms.saturating_sub(s.stamp_ms) <= self.cfg.expire_ms).then_some(s.utilization)
    }

    /// Weight multiplier of `i` in millionths; `None` without a fresh report.
    pub fn multiplier_ppm(&self, i: usize, now_ms: u64) -> Option<u32> {
        let u = self.utilization(i, now_ms)?;
        let m =
            (1.0 / u.max(self.cfg.floor)).clamp(self.cfg.min_multiplier, self.cfg.max_multiplier);
        Some((m * PPM) as u32)
    }

    /// Effective weights: `base[i]` × multiplier, endpoints without a fresh report
    /// taking the mean multiplier of those with one (1 when none has).
    pub fn weights(&self, base: &[u32], now_ms: u64) -> Vec<u32> {
        let m: Vec<Option<u32>> = (0..base.len())
            .map(|i| self.multiplier_ppm(i, now_ms))
            .collect();
        let reported: Vec<u64> = m.iter().flatten().map(|&x| u64::from(x)).collect();
        let mean = if reported.is_empty() {
            PPM as u64
        } else {
            reported.iter().sum::<u64>() / reported.len() as u64
        };
        base.iter()
            .zip(&m)
            .map(|(&b, mi)| {
                let w = u64::from(b) * mi.map_or(mean, u64::from) / PPM as u64;
                u32::try_from(w).unwrap_or(u32::MAX).max(1)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wasm_bindgen_test::wasm_bindgen_test;

    #[wasm_bindgen_test(unsupported = test)]
    fn parses_the_text_form() {
        let r = parse_orca("TEXT cpu_utilization=0.3, mem_utilization=0.8, rps_fractional=10, named_metrics.foo=123").unwrap();
        assert_eq!(r.cpu_utilization, Some(0.3));
        assert_eq!(r.mem_utilization, Some(0.8));
        assert_eq!(r.rps_fractional, Some(10.0));
        assert_eq!(r.named_metrics, vec![("foo".to_string(), 123.0)]);
        assert_eq!(r.utilization(), Some(0.3));
        // Envoy's native form: no prefix, `:` separators; application utilization wins.
        let r = parse_orca("cpu_utilization:0.7,application_utilization:0.8,eps:2").unwrap();
        assert_eq!((r.application_utilization, r.eps), (Some(0.8), Some(2.0)));
        assert_eq!(r.utilization(), Some(0.8));
        let r = parse_orca("TEXT application_utilization=0, cpu_utilization=0.25").unwrap();
        assert_eq!(r.utilization(), Some(0.25));
        assert_eq!(parse_orca("TEXT ").unwrap(), OrcaReport::default());
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn rejects_what_envoy_rejects() {
        use ReportError::*;
        assert_eq!(parse_orca("BIN abcd"), Err(UnsupportedFormat("BIN".into())));
        assert_eq!(parse_orca("JSON {}"), Err(UnsupportedFormat("JSON".into())));
        assert_eq!(
            parse_orca("TEXT cpu_utilization"),
            Err(Malformed("cpu_utilization".into()))
        );
        assert_eq!(
            parse_orca("TEXT cpu_utilization="),
            Err(Malformed("cpu_utilization=".into()))
        );
        assert_eq!(parse_orca("TEXT =1"), Err(Malformed("=1".into())));
        assert_eq!(
            parse_orca("TEXT cpu_utilization=abc"),
            Err(BadValue("cpu_utilization".into()))
        );
        assert_eq!(
            parse_orca("TEXT cpu_utilization=NaN"),
            Err(BadValue("cpu_utilization".into()))
        );
        assert_eq!(
            parse_orca("TEXT cpu_utilization=inf"),
            Err(BadValue("cpu_utilization".into()))
        );
        assert_eq!(
            parse_orca("TEXT cpu_utilization=-1"),
            Err(BadValue("cpu_utilization".into()))
        );
        assert_eq!(parse_orca("TEXT gpu=1"), Err(UnknownMetric("gpu".into())));
        assert_eq!(
            parse_orca("TEXT named_metrics.=1"),
            Err(UnknownMetric("named_metrics.".into()))
        );
        assert_eq!(
            parse_orca("TEXT eps=1, eps=2"),
            Err(Duplicate("eps".into()))
        );
        let many: Vec<String> = (0..65).map(|i| format!("named_metrics.m{i}=1")).collect();
        assert_eq!(
            parse_orca(&format!("TEXT {}", many.join(","))),
            Err(TooManyMetrics)
        );
        assert!(matches!(parse_orca(&"x".repeat(5000)), Err(TooLong(5000))));
        assert_eq!(
            UnknownMetric("gpu".into()).to_string(),
            "unsupported metric name: gpu"
        );
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn plain_numeric_header() {
        assert_eq!(parse_utilization("0.42"), Ok(0.42));
        assert_eq!(parse_utilization(" 42 % "), Ok(0.42));
        assert_eq!(parse_utilization("1.5"), Ok(1.5));
        assert!(parse_utilization("").is_err());
        assert!(parse_utilization("-0.1").is_err());
        assert!(parse_utilization("high").is_err());
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn multiplier_is_inverse_utilization_within_bounds() {
        let mut w = UtilizationWeights::new(5, WeightConfig::default());
        for (i, u) in [0.5, 0.25, 0.0, 2.0, 50.0].into_iter().enumerate() {
            w.observe(i, u, 1_000);
        }
        let m: Vec<u32> = (0..5)
            .map(|i| w.multiplier_ppm(i, 1_000).unwrap())
            .collect();
        // 1/0.5, 1/0.25, 1/floor(0.1), 1/2, 1/50 clamped to 0.1.
        assert_eq!(m, vec![2_000_000, 4_000_000, 10_000_000, 500_000, 100_000]);
        assert_eq!(
            w.weights(&[10, 10, 10, 10, 10], 1_000),
            vec![20, 40, 100, 5, 1]
        );
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn smoothing_follows_the_clock() {
        let cfg = WeightConfig {
            smoothing_ms: 1_000,
            ..WeightConfig::default()
        };
        let mut w = UtilizationWeights::new(1, cfg);
        w.observe(0, 0.8, 0);
        assert_eq!(w.utilization(0, 0), Some(0.8));
        // One τ later a 0.2 sample: 0.8/e + 0.2(1 − 1/e).
        w.observe(0, 0.2, 1_000);
        let want = 0.8 / std::f64::consts::E + 0.2 * (1.0 - 1.0 / std::f64::consts::E);
        assert!((w.utilization(0, 1_000).unwrap() - want).abs() < 1e-12);
        // Many samples at 0.2 converge to 0.2.
        for t in 1..=20 {
            w.observe(0, 0.2, 1_000 + t * 500);
        }
        assert!((w.utilization(0, 11_000).unwrap() - 0.2).abs() < 1e-3);
        // Pinned: the same bits on every target.
        assert_eq!(w.utilization(0, 11_000).unwrap().to_bits(), PINNED_BITS);
    }
    const PINNED_BITS: u64 = 0x3FC9_99ED_A993_DDE4;

    #[wasm_bindgen_test(unsupported = test)]
    fn unreported_and_expired_endpoints_get_the_mean() {
        let mut w = UtilizationWeights::new(3, WeightConfig::default());
        assert_eq!(w.weights(&[4, 4, 4], 0), vec![4, 4, 4]);
        w.observe(0, 0.5, 0); // ×2
        w.observe(1, 0.25, 0); // ×4
                               // Endpoint 2 has no report: the mean multiplier, ×3.
        assert_eq!(w.weights(&[4, 4, 4], 1_000), vec![8, 16, 12]);
        // After expiry (3 min) nothing counts; a new report starts afresh.
        assert_eq!(w.weights(&[4, 4, 4], 200_000), vec![4, 4, 4]);
        w.observe(0, 1.0, 200_000);
        assert_eq!(w.utilization(0, 200_000), Some(1.0));
        assert_eq!(w.weights(&[4, 4, 4], 200_000), vec![4, 4, 4]);
        // Out of range indexes and bad samples are ignored.
        w.observe(9, 0.5, 0);
        w.observe(2, f64::NAN, 0);
        assert_eq!(w.multiplier_ppm(2, 0), None);
    }
}
