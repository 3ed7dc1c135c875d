use half::{bf16, f16};
use ndarray::{ArrayD, IxDyn};
use sdpa_core::DType;

/// A tensor of any dtype a case file may hold.
#[derive(Debug, Clone, PartialEq)]
pub enum Tensor {
    /// f64.
    F64(ArrayD<f64>),
    /// f32.
    F32(ArrayD<f32>),
    /// f16.
    F16(ArrayD<f16>),
    /// bf16.
    BF16(ArrayD<bf16>),
    /// bool (masks).
    Bool(ArrayD<bool>),
    /// i32 (a KV cache's `block_table` and `cache_seqlens`).
    I32(ArrayD<i32>),
}

impl Tensor {
    /// The float dtype, or `None` for bool and i32.
    pub fn dtype(&self) -> Option<DType> {
        match self {
            Tensor::F64(_) => Some(DType::F64),
            Tensor::F32(_) => Some(DType::F32),
            Tensor::F16(_) => Some(DType::F16),
            Tensor::BF16(_) => Some(DType::BF16),
            Tensor::Bool(_) | Tensor::I32(_) => None,
        }
    }

    /// dtype name as messages print it (`f16`, `bool`).
    pub fn dtype_name(&self) -> &'static str {
        match self {
            Tensor::I32(_) => "i32",
            _ => self.dtype().map_or("bool", DType::name),
        }
    }

    /// Extent of each axis.
    pub fn shape(&self) -> &[usize] {
        match self {
            Tensor::F64(a) => a.shape(),
            Tensor::F32(a) => a.shape(),
            Tensor::F16(a) => a.shape(),
            Tensor::BF16(a) => a.shape(),
            Tensor::Bool(a) => a.shape(),
            Tensor::I32(a) => a.shape(),
        }
    }

    /// Exact widening to f64 (bool becomes 0/1; i32 exact).
    pub fn to_f64(&self) -> ArrayD<f64> {
        match self {
            Tensor::F64(a) => a.clone(),
            Tensor::F32(a) => a.mapv(f64::from),
            Tensor::F16(a) => a.mapv(f64::from),
            Tensor::BF16(a) => a.mapv(f64::from),
            Tensor::Bool(a) => a.mapv(|x| if x { 1.0 } else { 0.0 }),
            Tensor::I32(a) => a.mapv(f64::from),
        }
    }

    /// Rounds an f64 array to `dtype` (to nearest even).
    pub fn from_f64(values: &ArrayD<f64>, dtype: DType) -> Tensor {
        match dtype {
            DType::F64 => Tensor::F64(values.clone()),
            DType::F32 => Tensor::F32(values.mapv(|x| x as f32)),
            DType::F16 => Tensor::F16(values.mapv(f16::from_f64)),
            DType::BF16 => Tensor::BF16(values.mapv(bf16::from_f64)),
        }
    }

    /// Little-endian bytes in row-major order, as safetensors stores them.
    pub fn to_le_bytes(&self) -> Vec<u8> {
        fn collect<T: Copy, const N: usize>(a: &ArrayD<T>, f: impl Fn(T) -> [u8; N]) -> Vec<u8> {
            a.iter().flat_map(|&x| f(x)).collect()
        }
        match self {
            Tensor::F64(a) => collect(a, f64::to_le_bytes),
            Tensor::F32(a) => collect(a, f32::to_le_bytes),
            Tensor::F16(a) => collect(a, f16::to_le_bytes),
            Tensor::BF16(a) => collect(a, bf16::to_le_bytes),
            Tensor::Bool(a) => collect(a, |x| [x as u8]),
            Tensor::I32(a) => collect(a, i32::to_le_bytes),
        }
    }

    /// Parses row-major little-endian bytes. `None` if the length does not match.
    pub(crate) fn from_le_bytes(
        kind: safetensors::Dtype,
        shape: &[usize],
        bytes: &[u8],
    ) -> Option<Result<Tensor, String>> {
        fn parse<T, const N: usize>(
            shape: &[usize],
            bytes: &[u8],
            f: impl Fn([u8; N]) -> T,
        ) -> Option<ArrayD<T>> {
            let numel = shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d))?;
            if bytes.len() != numel.checked_mul(N)? {
                return None;
            }
            let values = bytes
                .chunks_exact(N)
                .map(|c| f(c.try_into().expect("chunks_exact yields N bytes")))
                .collect();
            ArrayD::from_shape_vec(IxDyn(shape), values).ok()
        }
        use safetensors::Dtype as D;
        Some(Ok(match kind {
            D::F64 => Tensor::F64(parse(shape, bytes, f64::from_le_bytes)?),
            D::F32 => Tensor::F32(parse(shape, bytes, f32::from_le_bytes)?),
            D::F16 => Tensor::F16(parse(shape, bytes, f16::from_le_bytes)?),
            D::BF16 => Tensor::BF16(parse(shape, bytes, bf16::from_le_bytes)?),
            D::BOOL => {
                let a = parse(shape, bytes, |[b]: [u8; 1]| b)?;
                if a.iter().any(|&b| b > 1) {
                    return Some(Err("bool bytes 0 or 1".to_string()));
                }
                Tensor::Bool(a.mapv(|b| b == 1))
            }
            D::I32 => Tensor::I32(parse(shape, bytes, i32::from_le_bytes)?),
            other => return Some(Err(format!("{other:?}"))),
        }))
    }

    pub(crate) fn safetensors_dtype(&self) -> safetensors::Dtype {
        match self {
            Tensor::F64(_) => safetensors::Dtype::F64,
            Tensor::F32(_) => safetensors::Dtype::F32,
            Tensor::F16(_) => safetensors::Dtype::F16,
            Tensor::BF16(_) => safetensors::Dtype::BF16,
            Tensor::Bool(_) => safetensors::Dtype::BOOL,
            Tensor::I32(_) => safetensors::Dtype::I32,
        }
    }
}
