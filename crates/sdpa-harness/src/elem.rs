//! The reference's element types converted through f64, the common currency of the
//! property tests (random values are drawn in f64, rounded to the dtype, and results
//! widened back for comparison).

use half::{bf16, f16};

/// An element type of the reference (`f64`, `f32`, `f16`, `bf16`) with conversions
/// through f64.
pub trait Elem: sdpa_ref::Element {
    /// Rounds an f64 to this type (to nearest even): the name is not `round`, which f32 and f64 have as an inherent method.
    fn narrow(x: f64) -> Self;
    /// Widens to f64 (exact).
    fn wide(self) -> f64;
}

impl Elem for f64 {
    fn narrow(x: f64) -> Self {
        x
    }
    fn wide(self) -> f64 {
        self
    }
}

impl Elem for f32 {
    fn narrow(x: f64) -> Self {
        x as f32
    }
    fn wide(self) -> f64 {
        self as f64
    }
}

impl Elem for f16 {
    fn narrow(x: f64) -> Self {
        f16::from_f64(x)
    }
    fn wide(self) -> f64 {
        self.to_f64()
    }
}

impl Elem for bf16 {
    fn narrow(x: f64) -> Self {
        bf16::from_f64(x)
    }
    fn wide(self) -> f64 {
        self.to_f64()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_then_wide_is_the_dtype_rounding() {
        let x = 1.0 + 2f64.powi(-12); // between f16 neighbours 1 and 1 + 2^-10
        assert_eq!(f64::narrow(x).wide(), x);
        assert_eq!(f32::narrow(x).wide(), x);
        assert_eq!(f16::narrow(x).wide(), 1.0);
        assert_eq!(bf16::narrow(x).wide(), 1.0);
        assert_eq!(
            f16::narrow(1.0 + 3.0 * 2f64.powi(-11)).wide(),
            1.0 + 2f64.powi(-9)
        );
        assert_eq!(bf16::narrow(-3.0).wide(), -3.0);
    }
}
