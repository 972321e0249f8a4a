//! `exp`, `ln` and `powf` that give the same bits on every target.
//!
//! `f64::exp`/`ln`/`powf` come from the platform's libm: glibc natively, a Rust port
//! of musl's inside a wasm engine. They may differ in the last bit, and a weight or a
//! decay that rounds differently would make a table built in a test differ from the
//! one built inside Envoy. These use only `+ − × ÷`, `floor` and bit manipulation,
//! which IEEE 754 defines exactly, so results are bit-identical natively and in wasm.
//! Accuracy is a few ulps (relative error below 1e-15), plenty for decay factors and
//! weight ramps. Left out: subnormal results (flushed to 0) and full libm edge-case
//! conformance (signed zeros, errno).

const LN2_HI: f64 = 6.931_471_803_691_238e-1; // 0x3FE62E42FEE00000: ln 2 with its low bits cleared
const LN2_LO: f64 = 1.908_214_929_270_587_7e-10; // ln 2 − LN2_HI
const LN2: f64 = core::f64::consts::LN_2;
const SQRT2: f64 = core::f64::consts::SQRT_2;

/// e^x. `x` below −708 gives 0, above 709 gives `f64::MAX`; NaN gives NaN.
pub fn exp(x: f64) -> f64 {
    if x.is_nan() {
        return x;
    }
    if x < -708.0 {
        return 0.0;
    }
    if x > 709.0 {
        return f64::MAX;
    }
    // x = k·ln2 + r with |r| ≤ ln2/2; e^x = 2^k · e^r.
    let k = (x / LN2 + 0.5).floor();
    let r = (x - k * LN2_HI) - k * LN2_LO;
    // Taylor series of e^r to r^14/14! (|r| ≤ 0.35: remainder below 1e-19), by Horner.
    let sum = INV_FACTORIAL.iter().rev().fold(0.0, |acc, &c| acc * r + c);
    scale_by_pow2(sum, k as i64)
}

/// 1/k! for k = 0..=14, each the correctly rounded double.
const INV_FACTORIAL: [f64; 15] = [
    1.0,
    1.0,
    0.5,
    0.166_666_666_666_666_66,
    0.041_666_666_666_666_664,
    0.008_333_333_333_333_333,
    0.001_388_888_888_888_889,
    0.000_198_412_698_412_698_4,
    2.480_158_730_158_73e-5,
    2.755_731_922_398_589_3e-6,
    2.755_731_922_398_589e-7,
    2.505_210_838_544_172e-8,
    2.087_675_698_786_81e-9,
    1.605_904_383_682_161_3e-10,
    1.147_074_559_772_972_5e-11,
];

/// Natural logarithm. `x ≤ 0` and NaN give NaN; +∞ gives +∞.
pub fn ln(x: f64) -> f64 {
    if x.is_nan() || x <= 0.0 {
        return f64::NAN;
    }
    if x.is_infinite() {
        return x;
    }
    // x = m·2^e with m in [√½, √2): ln x = e·ln2 + ln m.
    let (mut m, mut e) = frexp(x);
    if m > SQRT2 {
        m /= 2.0;
        e += 1;
    }
    // ln m = 2·atanh(s), s = (m−1)/(m+1), |s| ≤ 0.172: the odd series converges fast.
    let s = (m - 1.0) / (m + 1.0);
    let s2 = s * s;
    let mut power = s;
    let mut sum = 0.0;
    let mut k = 1.0;
    while k < 40.0 {
        sum += power / k;
        power *= s2;
        k += 2.0;
    }
    let e = e as f64;
    e * LN2_HI + (2.0 * sum + e * LN2_LO)
}

/// x^y for x > 0 (0^y = 0 for y > 0, x^0 = 1); negative or NaN `x` gives NaN.
pub fn powf(x: f64, y: f64) -> f64 {
    if y == 0.0 {
        return 1.0;
    }
    if x == 0.0 && y > 0.0 {
        return 0.0;
    }
    if x == 1.0 {
        return 1.0;
    }
    exp(y * ln(x))
}

/// `x` = m · 2^e with m in [1, 2), for finite positive `x`.
fn frexp(x: f64) -> (f64, i64) {
    let bits = x.to_bits();
    let biased = ((bits >> 52) & 0x7ff) as i64;
    if biased == 0 {
        // Subnormal: scale into the normal range first.
        let (m, e) = frexp(x * f64::from_bits(0x4350_0000_0000_0000)); // 2^54
        return (m, e - 54);
    }
    let m = f64::from_bits((bits & 0x000f_ffff_ffff_ffff) | 0x3ff0_0000_0000_0000);
    (m, biased - 1023)
}

/// `v · 2^k` for `v` in [0.5, 2] and |k| ≤ 1100, in two exact steps.
fn scale_by_pow2(v: f64, k: i64) -> f64 {
    let pow2 = |e: i64| -> f64 {
        if e < -1022 {
            0.0
        } else if e > 1023 {
            f64::INFINITY
        } else {
            f64::from_bits(((e + 1023) as u64) << 52)
        }
    };
    let half = k / 2;
    v * pow2(half) * pow2(k - half)
}

#[cfg(test)]
mod tests {
    use super::*;
    use wasm_bindgen_test::wasm_bindgen_test;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() <= 4.0 * f64::EPSILON * b.abs().max(f64::MIN_POSITIVE)
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn exp_matches_known_values() {
        assert_eq!(exp(0.0), 1.0);
        assert!(close(exp(1.0), core::f64::consts::E), "{}", exp(1.0));
        assert!(close(exp(-1.0), 1.0 / core::f64::consts::E));
        assert!(close(exp(LN2), 2.0));
        assert!(close(exp(10.0), 22_026.465_794_806_718));
        assert!(close(exp(-20.0), 2.061_153_622_438_558e-9));
        assert!(close(exp(-700.0), 9.859_676_543_759_77e-305));
        assert_eq!(exp(-1000.0), 0.0);
        assert_eq!(exp(1000.0), f64::MAX);
        assert!(exp(f64::NAN).is_nan());
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn ln_matches_known_values() {
        assert_eq!(ln(1.0), 0.0);
        assert!(close(ln(core::f64::consts::E), 1.0));
        assert!(close(ln(2.0), LN2));
        assert!(close(ln(0.1), -core::f64::consts::LN_10));
        assert!(close(ln(1e300), 690.775_527_898_213_7));
        assert!(close(ln(5e-324), -744.440_071_921_381_3));
        assert!(ln(0.0).is_nan() && ln(-1.0).is_nan());
        assert_eq!(ln(f64::INFINITY), f64::INFINITY);
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn powf_roots_and_squares() {
        assert!(close(powf(0.25, 0.5), 0.5));
        assert!(close(powf(0.5, 2.0), 0.25));
        assert!(close(powf(0.001, 1.0 / 3.0), 0.1));
        assert_eq!(powf(0.0, 0.5), 0.0);
        assert_eq!(powf(0.3, 0.0), 1.0);
        assert_eq!(powf(1.0, 7.0), 1.0);
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn same_bits_on_every_target() {
        // Pinned outputs: a libm-dependent implementation would drift here first.
        assert_eq!(
            exp(-0.1).to_bits(),
            0x3FEC_F46D_99D5_2B3A,
            "{:#x}",
            exp(-0.1).to_bits()
        );
        assert_eq!(
            ln(0.3).to_bits(),
            0xBFF3_4378_FCBD_A721,
            "{:#x}",
            ln(0.3).to_bits()
        );
        assert_eq!(
            powf(0.37, 1.0 / 1.5).to_bits(),
            0x3FE0_7E0F_6C6E_26EC,
            "{:#x}",
            powf(0.37, 1.0 / 1.5).to_bits()
        );
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn agrees_with_libm_closely_over_a_sweep() {
        let mut x = -50.0;
        while x < 50.0 {
            let (a, b) = (exp(x), x.exp());
            assert!(
                (a - b).abs() <= 8.0 * f64::EPSILON * b,
                "exp({x}) = {a}, libm {b}"
            );
            x += 0.137;
        }
        let mut y = 1e-9;
        while y < 1e9 {
            let (a, b) = (ln(y), y.ln());
            assert!(
                (a - b).abs() <= 8.0 * f64::EPSILON * b.abs().max(1.0),
                "ln({y}) = {a}, libm {b}"
            );
            y *= 1.37;
        }
    }
}
