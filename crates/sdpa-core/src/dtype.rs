use std::fmt;
use std::str::FromStr;

/// Element type of q, k, v, the output and an additive mask.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    /// IEEE binary64.
    F64,
    /// IEEE binary32.
    F32,
    /// IEEE binary16.
    F16,
    /// bfloat16.
    BF16,
}

impl DType {
    /// Every dtype, widest first.
    pub const ALL: [DType; 4] = [DType::F64, DType::F32, DType::F16, DType::BF16];

    /// Lower-case name as PyTorch prints it without the `torch.` prefix (`float16` is `f16` here).
    pub fn name(self) -> &'static str {
        match self {
            DType::F64 => "f64",
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
        }
    }

    /// Bytes per element.
    pub fn size_bytes(self) -> usize {
        match self {
            DType::F64 => 8,
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }

    /// True for the 16-bit types, whose intermediates are kept in f32.
    pub fn is_half(self) -> bool {
        matches!(self, DType::F16 | DType::BF16)
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for DType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "f64" | "float64" | "double" => Ok(DType::F64),
            "f32" | "float32" | "float" => Ok(DType::F32),
            "f16" | "float16" | "half" => Ok(DType::F16),
            "bf16" | "bfloat16" => Ok(DType::BF16),
            other => Err(format!(
                "expected one of f64, f32, f16, bf16, got {other:?}"
            )),
        }
    }
}

/// A Rust element type of one [`DType`]: `f64`, `f32`, `half::f16`, `half::bf16`. The
/// one place a type names its dtype, for the reference and the device alike.
pub trait Scalar: Copy + Send + Sync + std::fmt::Debug + PartialEq + 'static {
    /// The dtype this type stands for.
    const DTYPE: DType;
}

impl Scalar for f64 {
    const DTYPE: DType = DType::F64;
}
impl Scalar for f32 {
    const DTYPE: DType = DType::F32;
}
impl Scalar for half::f16 {
    const DTYPE: DType = DType::F16;
}
impl Scalar for half::bf16 {
    const DTYPE: DType = DType::BF16;
}
