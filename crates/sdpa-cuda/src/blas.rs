//! cuBLAS products described by a value ([`Gemm`]) instead of 23 positional arguments,
//! and the one table of element, accumulator and compute types per dtype that the math
//! backend and the module's `Linear` share. Matrices are column-major, as cuBLAS sees
//! them; callers say how their row-major data maps onto that.

use crate::context::GpuContext;
use crate::error::{CudaError, Result};
use cudarc::cublas::sys as blas;
use sdpa_core::DType;

/// cuBLAS types of one dtype: f16/bf16 products accumulate in f32 (no TF32 anywhere).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlasTypes {
    /// Storage type of the operands.
    pub elem: blas::cudaDataType,
    /// Storage type of an f32 (f64 for f64) accumulator matrix.
    pub acc: blas::cudaDataType,
    /// Compute type.
    pub compute: blas::cublasComputeType_t,
    /// Bytes of one accumulator element.
    pub acc_bytes: usize,
}

/// The table.
pub fn blas_types(dtype: DType) -> BlasTypes {
    use blas::cublasComputeType_t::*;
    use blas::cudaDataType::*;
    let t = |elem, acc, compute, acc_bytes| BlasTypes {
        elem,
        acc,
        compute,
        acc_bytes,
    };
    match dtype {
        DType::F64 => t(CUDA_R_64F, CUDA_R_64F, CUBLAS_COMPUTE_64F, 8),
        DType::F32 => t(CUDA_R_32F, CUDA_R_32F, CUBLAS_COMPUTE_32F, 4),
        DType::F16 => t(CUDA_R_16F, CUDA_R_32F, CUBLAS_COMPUTE_32F, 4),
        DType::BF16 => t(CUDA_R_16BF, CUDA_R_32F, CUBLAS_COMPUTE_32F, 4),
    }
}

/// One operand: a device address, its cuBLAS type, leading dimension and the stride
/// between the matrices of a batch (elements).
#[derive(Debug, Clone, Copy)]
pub struct Operand {
    /// Device address.
    pub ptr: u64,
    /// cuBLAS storage type.
    pub dtype: blas::cudaDataType,
    /// Leading dimension.
    pub ld: usize,
    /// Elements between consecutive matrices of the batch.
    pub stride: usize,
}

/// `C = alpha * op(A) op(B) + beta * C` for `batch` matrices, `op(A)` m x k, `op(B)` k x n.
#[derive(Debug, Clone, Copy)]
pub struct Gemm {
    /// Transpose A.
    pub trans_a: bool,
    /// Transpose B.
    pub trans_b: bool,
    /// Rows of op(A) and C.
    pub m: usize,
    /// Columns of op(B) and C.
    pub n: usize,
    /// Inner dimension.
    pub k: usize,
    /// A.
    pub a: Operand,
    /// B.
    pub b: Operand,
    /// C (written).
    pub c: Operand,
    /// Matrices.
    pub batch: usize,
    /// `true`: `beta = 1` (add to C); `false`: `beta = 0`.
    pub accumulate: bool,
    /// Compute type (from [`blas_types`]).
    pub compute: blas::cublasComputeType_t,
}

fn int(what: &'static str, value: usize) -> Result<i32> {
    i32::try_from(value).map_err(|_| {
        CudaError::bad_layout(
            "query",
            format!("{what} <= {} (cuBLAS takes 32-bit sizes)", i32::MAX),
            value,
        )
    })
}

fn stride(value: usize) -> Result<i64> {
    i64::try_from(value).map_err(|_| CudaError::bad_layout("query", "a 64-bit stride", value))
}

fn op(trans: bool) -> blas::cublasOperation_t {
    if trans {
        blas::cublasOperation_t::CUBLAS_OP_T
    } else {
        blas::cublasOperation_t::CUBLAS_OP_N
    }
}

impl Gemm {
    /// Runs the product on the context's stream. An empty inner dimension is left to
    /// the caller (cuBLAS would not write C).
    ///
    /// # Safety
    /// Each operand's address is a live allocation of the context holding `batch`
    /// matrices of its shape at its leading dimension and stride.
    pub unsafe fn run(&self, gpu: &GpuContext) -> Result<()> {
        if self.m == 0 || self.n == 0 || self.batch == 0 {
            return Ok(());
        }
        let f64_compute = self.compute == blas::cublasComputeType_t::CUBLAS_COMPUTE_64F;
        let (one64, zero64, one32, zero32) = (1f64, 0f64, 1f32, 0f32);
        let beta64 = if self.accumulate { &one64 } else { &zero64 };
        let beta32 = if self.accumulate { &one32 } else { &zero32 };
        let (alpha, beta): (*const std::ffi::c_void, *const std::ffi::c_void) = if f64_compute {
            (&one64 as *const f64 as _, beta64 as *const f64 as _)
        } else {
            (&one32 as *const f32 as _, beta32 as *const f32 as _)
        };
        let blas = gpu.blas()?;
        // SAFETY: the caller's contract covers every operand; alpha and beta are host
        // values of the compute type that outlive the call; the handle runs on the
        // context's stream.
        unsafe {
            cudarc::cublas::result::gemm_strided_batched_ex(
                *blas.handle(),
                op(self.trans_a),
                op(self.trans_b),
                int("m", self.m)?,
                int("n", self.n)?,
                int("k", self.k)?,
                alpha,
                self.a.ptr as *const _,
                self.a.dtype,
                int("lda", self.a.ld)?,
                stride(self.a.stride)?,
                self.b.ptr as *const _,
                self.b.dtype,
                int("ldb", self.b.ld)?,
                stride(self.b.stride)?,
                beta,
                self.c.ptr as *mut _,
                self.c.dtype,
                int("ldc", self.c.ld)?,
                stride(self.c.stride)?,
                int("batch", self.batch)?,
                self.compute,
                blas::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }?;
        Ok(())
    }
}
