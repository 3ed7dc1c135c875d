//! Named tolerances, each with the reason for its numbers.
//!
//! Two rules (DESIGN.md, "Tolerance policy"). Where libtorch's own result in the same
//! dtype exists, a result passes when `max|out - truth| <= 2 * max|torch - truth| +
//! floor` (FlashAttention's rule: within twice the framework's own error). Where it
//! does not, each element must satisfy `|out - truth| <= atol + rtol * |truth|` with the
//! preset of its dtype. Truth is always the f64 computation on the same (already
//! rounded) inputs, so only the arithmetic and the final rounding are judged.

use sdpa_core::DType;

/// `|out - truth| <= atol + rtol * |truth|`, element by element.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Tolerance {
    /// Absolute part.
    pub atol: f64,
    /// Relative part.
    pub rtol: f64,
    /// Why these numbers.
    pub reason: &'static str,
}

/// f64 against an f64 truth computed in another order.
pub const F64: Tolerance = Tolerance {
    atol: 1e-12,
    rtol: 1e-12,
    reason: "reordered f64 sums of up to ~10^4 terms of magnitude <= 1 differ by about \
             sqrt(n) * 2^-53 ~ 1e-14; 1e-12 leaves two orders of margin and still \
             catches any real error",
};

/// f32 intermediates against f64.
pub const F32: Tolerance = Tolerance {
    atol: 2e-5,
    rtol: 2e-5,
    reason: "f32 keeps 2^-24 ~ 6e-8 relative per op; the error of exp(s - max) grows with \
             |s - max| (up to ~30 for test scores) and the two GEMMs add sqrt(n) * 6e-8 \
             over n <= 10^4 terms: ~3e-6 worst seen, so 2e-5 is ~6x margin",
};

/// f16 output rounded once from f32 intermediates.
pub const F16: Tolerance = Tolerance {
    atol: 1e-3,
    rtol: 1e-3,
    reason: "rounding the output to f16 alone costs up to half an ulp, 2^-11 ~ 4.9e-4 \
             relative; f32 intermediates add ~1e-5; 1e-3 is one f16 ulp at magnitude 1",
};

/// bf16 output rounded once from f32 intermediates.
pub const BF16: Tolerance = Tolerance {
    atol: 8e-3,
    rtol: 8e-3,
    reason: "rounding to bf16 costs up to half an ulp, 2^-8 ~ 3.9e-3 relative; 8e-3 is \
             one bf16 ulp at magnitude 1 plus the f32 intermediates' ~1e-5",
};

/// The preset for results in `dtype`.
pub fn for_dtype(dtype: DType) -> Tolerance {
    match dtype {
        DType::F64 => F64,
        DType::F32 => F32,
        DType::F16 => F16,
        DType::BF16 => BF16,
    }
}

/// FlashAttention's factor on libtorch's own error.
pub const PEER_FACTOR: f64 = 2.0;

/// The absolute floor added to the peer rule, per dtype: where libtorch happens to be
/// exact (error 0), one rounding of ours is still fair. Half an ulp at magnitude 1
/// (times 2 for the two roundings of a different but correct order), except f64.
pub fn peer_floor(dtype: DType) -> f64 {
    match dtype {
        DType::F64 => 1e-12,
        DType::F32 => 2.0 * f32::EPSILON as f64,
        DType::F16 => 2.0 * 2f64.powi(-11),
        DType::BF16 => 2.0 * 2f64.powi(-8),
    }
}

/// The peer bound for a result in `dtype` when libtorch's error is `torch_error`.
pub fn peer_bound(dtype: DType, torch_error: f64) -> f64 {
    PEER_FACTOR * torch_error + peer_floor(dtype)
}
