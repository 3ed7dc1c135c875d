use half::{bf16, f16};
use ndarray::LinalgScalar;
use num_traits::Float;
use std::fmt::Debug;

/// The type intermediates are kept in: f64 for f64 inputs, f32 for everything else
/// (PyTorch's math backend upcasts f16/bf16 to f32 and rounds the output once).
pub trait Accum: LinalgScalar + Float + Send + Sync + Debug + 'static {
    /// Converts a host `f64` (the scale, `1/(1-p)`) to this type.
    fn from_f64(x: f64) -> Self;
    /// Rounds to f32 (the log-sum-exp is returned as f32).
    fn to_f32(self) -> f32;
    /// Replaces each `x` of `row` by `exp(x - max)` and returns their sum. `max` is the
    /// row's finite maximum, so every argument is `<= 0` (or `-inf`, giving 0).
    fn exp_shifted(row: &mut [Self], max: Self) -> Self;
}

impl Accum for f64 {
    fn from_f64(x: f64) -> Self {
        x
    }
    fn to_f32(self) -> f32 {
        self as f32
    }
    fn exp_shifted(row: &mut [Self], max: Self) -> Self {
        let mut sum = 0.0;
        for x in row.iter_mut() {
            *x = (*x - max).exp();
            sum += *x;
        }
        sum
    }
}

impl Accum for f32 {
    fn from_f64(x: f64) -> Self {
        x as f32
    }
    fn to_f32(self) -> f32 {
        self
    }
    fn exp_shifted(row: &mut [Self], max: Self) -> Self {
        for x in row.iter_mut() {
            *x = exp_nonpositive_f32(*x - max);
        }
        row.iter().sum()
    }
}

/// `exp(x)` for `x <= 0` in f32, branch-free so the compiler vectorises a loop of it;
/// within 2 ulp of the correctly rounded result (tested against f64 `exp`).
///
/// Cephes' `expf`: `x = n ln2 + r` with `|r| <= ln2 / 2` (Cody-Waite: `ln2` split in
/// two so `n * C1` is exact), a degree-7 polynomial for `exp(r)`, and `2^n` put in the
/// exponent bits. Arguments below -87.3 (where `exp` leaves the normal range) give 0,
/// an absolute error under 1.2e-38; `-inf` gives 0 and NaN stays NaN. This is the
/// softmax's hot loop: libm's scalar `expf` cost as much as both GEMMs together.
#[inline(always)]
pub(crate) fn exp_nonpositive_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const C1: f32 = 0.693_359_4;
    const C2: f32 = -2.121_944_4e-4;
    const ROUND: f32 = 12_582_912.0; // 1.5 * 2^23: adding it rounds to an integer.
    const LOWEST: f32 = -87.3;
    let underflow = x < LOWEST; // false for NaN, true for -inf
    let xc = x.max(LOWEST); // NaN.max(LOWEST) is LOWEST: keep the NaN separately
    let n = (xc * LOG2E + ROUND) - ROUND;
    let r = xc - n * C1 - n * C2;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5; // Cephes: 5.0000001201e-1, which rounds to 0.5 in f32
    p = p * r * r + r + 1.0;
    let scale = f32::from_bits((((n as i32) + 127) as u32) << 23);
    let y = p * scale;
    let y = if underflow { 0.0 } else { y };
    if x.is_nan() {
        x
    } else {
        y
    }
}

/// An input/output element type of the reference: `f64`, `f32`, `f16` or `bf16`.
pub trait Element: sdpa_core::Scalar {
    /// Accumulation type.
    type Acc: Accum;
    /// Exact widening to the accumulation type.
    fn to_acc(self) -> Self::Acc;
    /// Rounding (to nearest even) from the accumulation type.
    fn from_acc(x: Self::Acc) -> Self;
}

impl Element for f64 {
    type Acc = f64;
    fn to_acc(self) -> f64 {
        self
    }
    fn from_acc(x: f64) -> Self {
        x
    }
}

impl Element for f32 {
    type Acc = f32;
    fn to_acc(self) -> f32 {
        self
    }
    fn from_acc(x: f32) -> Self {
        x
    }
}

impl Element for f16 {
    type Acc = f32;
    fn to_acc(self) -> f32 {
        self.to_f32()
    }
    fn from_acc(x: f32) -> Self {
        f16::from_f32(x)
    }
}

impl Element for bf16 {
    type Acc = f32;
    fn to_acc(self) -> f32 {
        self.to_f32()
    }
    fn from_acc(x: f32) -> Self {
        bf16::from_f32(x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_exp_is_within_two_ulp_on_its_domain() {
        let mut worst_ulps = 0.0f64;
        let mut x = 0.0f32;
        while x > -87.3 {
            let got = exp_nonpositive_f32(x) as f64;
            let want = (x as f64).exp();
            let ulp = (want as f32).next_up() as f64 - want as f32 as f64;
            worst_ulps = worst_ulps.max((got - want).abs() / ulp);
            x = x * 1.0001 - 1e-4;
        }
        assert!(worst_ulps <= 2.0, "worst error {worst_ulps} ulp");
        assert_eq!(exp_nonpositive_f32(0.0), 1.0);
        assert_eq!(exp_nonpositive_f32(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_nonpositive_f32(-100.0), 0.0);
        // The cut-off itself is still computed: exp(-87.3) = 1.2e-38 is a normal f32.
        let at_bound = exp_nonpositive_f32(-87.3) as f64;
        let want = (-87.3f32 as f64).exp();
        assert!(
            (at_bound - want).abs() <= 2.0 * (want * f32::EPSILON as f64),
            "exp(-87.3) = {at_bound}, want {want}"
        );
        assert!(exp_nonpositive_f32(f32::NAN).is_nan());
        let mut row = [0.0f32, -1.0, f32::NEG_INFINITY, -2.5];
        let sum = f32::exp_shifted(&mut row, 0.0);
        assert!((sum - (1.0 + (-1f32).exp() + (-2.5f32).exp())).abs() < 1e-6);
        assert_eq!(row[2], 0.0);
    }
}
