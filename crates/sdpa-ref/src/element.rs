use half::{bf16, f16};
use ndarray::LinalgScalar;
use num_traits::Float;
use sdpa_core::DType;
use std::fmt::Debug;

/// The type intermediates are kept in: f64 for f64 inputs, f32 for everything else
/// (PyTorch's math backend upcasts f16/bf16 to f32 and rounds the output once).
pub trait Accum: LinalgScalar + Float + Send + Sync + Debug + 'static {
    /// Converts a host `f64` (the scale, `1/(1-p)`) to this type.
    fn from_f64(x: f64) -> Self;
    /// Rounds to f32 (the log-sum-exp is returned as f32).
    fn to_f32(self) -> f32;
}

impl Accum for f64 {
    fn from_f64(x: f64) -> Self {
        x
    }
    fn to_f32(self) -> f32 {
        self as f32
    }
}

impl Accum for f32 {
    fn from_f64(x: f64) -> Self {
        x as f32
    }
    fn to_f32(self) -> f32 {
        self
    }
}

/// An input/output element type of the reference: `f64`, `f32`, `f16` or `bf16`.
pub trait Element: Copy + Send + Sync + Debug + PartialEq + 'static {
    /// Accumulation type.
    type Acc: Accum;
    /// The dtype this type stands for.
    const DTYPE: DType;
    /// Exact widening to the accumulation type.
    fn to_acc(self) -> Self::Acc;
    /// Rounding (to nearest even) from the accumulation type.
    fn from_acc(x: Self::Acc) -> Self;
}

impl Element for f64 {
    type Acc = f64;
    const DTYPE: DType = DType::F64;
    fn to_acc(self) -> f64 {
        self
    }
    fn from_acc(x: f64) -> Self {
        x
    }
}

impl Element for f32 {
    type Acc = f32;
    const DTYPE: DType = DType::F32;
    fn to_acc(self) -> f32 {
        self
    }
    fn from_acc(x: f32) -> Self {
        x
    }
}

impl Element for f16 {
    type Acc = f32;
    const DTYPE: DType = DType::F16;
    fn to_acc(self) -> f32 {
        self.to_f32()
    }
    fn from_acc(x: f32) -> Self {
        f16::from_f32(x)
    }
}

impl Element for bf16 {
    type Acc = f32;
    const DTYPE: DType = DType::BF16;
    fn to_acc(self) -> f32 {
        self.to_f32()
    }
    fn from_acc(x: f32) -> Self {
        bf16::from_f32(x)
    }
}
