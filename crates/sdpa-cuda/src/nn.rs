//! Device building blocks of the `sdpa-nn` module: [`Linear`] through cuBLAS (weights
//! uploaded once), the residual dropout on the Philox stream of `sdpa-core`, and
//! [`Timeline`], CUDA events around each op for the profiler.
//!
//! # Shapes
//! Rows are a contiguous `[1, 1, N, features]` tensor: `x [N, in] -> y [N, out]`.

use crate::context::GpuContext;
use crate::error::{CudaError, Result};
use crate::tensor::{DeviceElement, DeviceSeqlens, DeviceTensor};
use cudarc::cublas::sys as blas;
use cudarc::driver::{CudaEvent, CudaFunction, CudaModule, LaunchConfig, PushKernelArg};
use ndarray::{Array1, Array2};
use sdpa_core::{DType, Dropout, Layout};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

fn nn_source() -> Result<String> {
    crate::kernels::expanded_source("nn/nn.cu")
}

fn nn_dtype_code(dtype: DType) -> u32 {
    match dtype {
        DType::F64 => 0,
        DType::F32 => 1,
        DType::F16 => 2,
        DType::BF16 => 3,
    }
}

/// Compiles `kernels/nn/nn.cu` for every dtype to `sm_{arch}` machine code, failing on any
/// error or warning: what CI's NVRTC check runs for these kernels (no GPU needed).
///
/// # Errors
/// [`CudaError::Compile`] with NVRTC's log.
pub fn compile_check(arch: u32) -> Result<()> {
    let source = nn_source()?;
    for dtype in DType::ALL {
        let options = vec![
            format!("--gpu-architecture=sm_{arch}"),
            "--std=c++17".to_string(),
            format!("-DSDPA_DTYPE={}", nn_dtype_code(dtype)),
        ];
        crate::kernels::nvrtc_cubin(&source, "nn.cu", &options).map_err(|log| {
            CudaError::Compile {
                kernel: format!("nn_*_{dtype}"),
                arch: format!("sm_{arch}"),
                log,
            }
        })?;
    }
    Ok(())
}

/// The elementwise kernels of `kernels/nn/nn.cu`, compiled per dtype on first use.
#[derive(Default)]
pub struct NnKernels {
    modules: Mutex<HashMap<DType, Arc<CudaModule>>>,
}

impl std::fmt::Debug for NnKernels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NnKernels").finish_non_exhaustive()
    }
}

impl NnKernels {
    fn function(&self, gpu: &GpuContext, dtype: DType, name: &str) -> Result<CudaFunction> {
        let mut modules = self.modules.lock().unwrap();
        let module = match modules.get(&dtype) {
            Some(m) => m.clone(),
            None => {
                let source = nn_source()?;
                let code = nn_dtype_code(dtype);
                let options = cudarc::nvrtc::CompileOptions {
                    options: vec![
                        format!("--gpu-architecture=compute_{}", gpu.arch()),
                        "--std=c++17".to_string(),
                        format!("-DSDPA_DTYPE={code}"),
                    ],
                    name: Some("nn.cu".to_string()),
                    ..Default::default()
                };
                let ptx = cudarc::nvrtc::compile_ptx_with_opts(&source, options).map_err(|e| {
                    CudaError::Compile {
                        kernel: format!("nn_*_{dtype}"),
                        arch: format!("compute_{}", gpu.arch()),
                        log: format!("{e:?}"),
                    }
                })?;
                let m = gpu.cuda().load_module(ptx)?;
                modules.insert(dtype, m.clone());
                m
            }
        };
        Ok(module.load_function(name)?)
    }

    fn grid(total: usize) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (total.div_ceil(256).clamp(1, 1 << 16) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    /// Writes `bias` into every row of `y` (contiguous `[1, 1, rows, cols]`).
    fn bias_rows(&self, gpu: &GpuContext, y: &DeviceTensor, bias: &DeviceTensor) -> Result<()> {
        let [_, _, rows, cols] = y.shape();
        if rows * cols == 0 {
            return Ok(());
        }
        let f = self.function(gpu, y.dtype(), "nn_bias_rows")?;
        let (y_ptr, b_ptr) = (y.check(gpu, "y")?, bias.check(gpu, "bias")?);
        let (rows, cols) = (rows as u64, cols as u64);
        let mut builder = gpu.stream().launch_builder(&f);
        builder.arg(&y_ptr).arg(&b_ptr).arg(&rows).arg(&cols);
        // SAFETY: y is a checked contiguous [rows, cols] tensor of its dtype and bias a
        // checked [cols] tensor of the same dtype; the kernel touches y[0..rows*cols)
        // and bias[0..cols) only.
        unsafe { builder.launch(Self::grid((rows * cols) as usize)) }?;
        Ok(())
    }

    /// Residual dropout in place on `y` (contiguous `[1, 1, rows, cols]`): element
    /// `(r, c)` draws flat index `padded_row(r) * cols + c` of `dropout`'s stream, where
    /// `padded_row(r)` is `r`, or `b * max_len + i` for row `i` of sequence `b` of
    /// `cu_seqlens` (nested input: the padded `[B, Tmax, E]` space).
    pub fn dropout_rows(
        &self,
        gpu: &GpuContext,
        y: &DeviceTensor,
        dropout: &Dropout,
        cu_seqlens: Option<&DeviceSeqlens>,
    ) -> Result<()> {
        let [_, _, rows, cols] = y.shape();
        check_rows("y", y, rows, cols, y.dtype())?;
        if rows * cols == 0 || !dropout.is_active() {
            return Ok(());
        }
        if let Some(cu) = cu_seqlens {
            if cu.total() != rows {
                return Err(CudaError::layout(
                    "cu_seqlens",
                    format!("a last offset equal to the rows, {rows}"),
                    cu.total(),
                ));
            }
        }
        let f = self.function(gpu, y.dtype(), "nn_dropout_rows")?;
        let y_ptr = y.check(gpu, "y")?;
        let (rows, cols) = (rows as u64, cols as u64);
        let (seed, offset, threshold) = (dropout.seed, dropout.offset, dropout.keep_threshold());
        let (cu_ptr, code, batch, max_len) = match cu_seqlens {
            Some(cu) => (
                cu.buffer.address(gpu),
                cu.code(),
                cu.batch() as i32,
                cu.max_len() as u64,
            ),
            None => (0u64, 0i32, 0i32, 0u64),
        };
        let scale64 = dropout.keep_scale();
        let scale32 = scale64 as f32;
        let mut builder = gpu.stream().launch_builder(&f);
        builder
            .arg(&y_ptr)
            .arg(&rows)
            .arg(&cols)
            .arg(&seed)
            .arg(&offset)
            .arg(&threshold);
        if y.dtype() == DType::F64 {
            builder.arg(&scale64);
        } else {
            builder.arg(&scale32);
        }
        builder.arg(&cu_ptr).arg(&code).arg(&batch).arg(&max_len);
        // SAFETY: y is a checked contiguous [rows, cols] tensor; cu_seqlens (when given)
        // is a live buffer of B+1 offsets of the type its code names, whose last offset
        // is `rows`, so every packed row lies in one sequence.
        unsafe { builder.launch(Self::grid((rows * cols) as usize)) }?;
        Ok(())
    }
}

fn check_rows(
    arg: &'static str,
    t: &DeviceTensor,
    rows: usize,
    cols: usize,
    dtype: DType,
) -> Result<()> {
    let want = [1, 1, rows, cols];
    if t.shape() != want || t.dtype() != dtype || t.layout() != Layout::contiguous(want) {
        return Err(CudaError::layout(
            arg,
            format!("a contiguous {dtype} [1, 1, {rows}, {cols}] tensor"),
            format!(
                "{} {:?} strides {:?}",
                t.dtype(),
                t.shape(),
                t.layout().strides
            ),
        ));
    }
    Ok(())
}

/// `y = x W^T + b` on the device, `W [out, in]` as PyTorch stores it: one cuBLAS
/// product in f32 accumulation (no TF32), the bias written into `y` first and added by
/// the product (`beta = 1`), so `y` is rounded once, as the CPU `Linear` rounds it.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: DeviceTensor,
    bias: Option<DeviceTensor>,
    in_features: usize,
    out_features: usize,
}

impl Linear {
    /// Uploads `weight [out, in]` and an optional `bias [out]` once.
    ///
    /// # Errors
    /// A bias whose length is not `out`; a failed upload.
    pub fn upload<T: DeviceElement>(
        gpu: &GpuContext,
        weight: &Array2<T>,
        bias: Option<&Array1<T>>,
    ) -> Result<Self> {
        let (out_features, in_features) = weight.dim();
        let w4 = weight
            .view()
            .insert_axis(ndarray::Axis(0))
            .insert_axis(ndarray::Axis(0));
        let bias = match bias {
            Some(b) if b.len() != out_features => {
                return Err(CudaError::layout(
                    "bias",
                    format!("shape [{out_features}] (the weight's out features)"),
                    format!("[{}]", b.len()),
                ))
            }
            Some(b) => {
                let b4 = b
                    .view()
                    .insert_axis(ndarray::Axis(0))
                    .insert_axis(ndarray::Axis(0))
                    .insert_axis(ndarray::Axis(0));
                Some(DeviceTensor::upload(gpu, b4)?)
            }
            None => None,
        };
        Ok(Linear {
            weight: DeviceTensor::upload(gpu, w4)?,
            bias,
            in_features,
            out_features,
        })
    }

    /// In features.
    pub fn in_features(&self) -> usize {
        self.in_features
    }

    /// Out features.
    pub fn out_features(&self) -> usize {
        self.out_features
    }

    /// The weight's dtype.
    pub fn dtype(&self) -> DType {
        self.weight.dtype()
    }

    /// `x` contiguous `[1, 1, N, in]` -> a new contiguous `[1, 1, N, out]`.
    ///
    /// # Errors
    /// `x` of another shape, dtype or layout; cuBLAS missing or failing.
    pub fn forward(
        &self,
        gpu: &GpuContext,
        kernels: &NnKernels,
        x: &DeviceTensor,
    ) -> Result<DeviceTensor> {
        let rows = x.shape()[2];
        check_rows("input", x, rows, self.in_features, self.dtype())?;
        let y = DeviceTensor::alloc(gpu, self.dtype(), [1, 1, rows, self.out_features])?;
        if let Some(b) = &self.bias {
            kernels.bias_rows(gpu, &y, b)?;
        }
        self.gemm(gpu, x, &y, self.bias.is_some())?;
        Ok(y)
    }

    fn gemm(
        &self,
        gpu: &GpuContext,
        x: &DeviceTensor,
        y: &DeviceTensor,
        accumulate: bool,
    ) -> Result<()> {
        let (n, k, m) = (x.shape()[2], self.in_features, self.out_features);
        if n * m == 0 {
            return Ok(());
        }
        for (what, value) in [("rows", n), ("in features", k), ("out features", m)] {
            if value > i32::MAX as usize {
                return Err(CudaError::layout(
                    "input",
                    format!("{what} <= {}", i32::MAX),
                    value,
                ));
            }
        }
        let (t_elem, compute) = match self.dtype() {
            DType::F64 => (
                blas::cudaDataType::CUDA_R_64F,
                blas::cublasComputeType_t::CUBLAS_COMPUTE_64F,
            ),
            DType::F32 => (
                blas::cudaDataType::CUDA_R_32F,
                blas::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            ),
            DType::F16 => (
                blas::cudaDataType::CUDA_R_16F,
                blas::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            ),
            DType::BF16 => (
                blas::cudaDataType::CUDA_R_16BF,
                blas::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            ),
        };
        let (x_ptr, w_ptr, y_ptr) = (
            x.check(gpu, "input")?,
            self.weight.check(gpu, "weight")?,
            y.check(gpu, "y")?,
        );
        let (one64, zero64, one32, zero32) = (1f64, 0f64, 1f32, 0f32);
        let (alpha, beta): (*const std::ffi::c_void, *const std::ffi::c_void) =
            match (self.dtype(), accumulate) {
                (DType::F64, false) => (&one64 as *const f64 as _, &zero64 as *const f64 as _),
                (DType::F64, true) => (&one64 as *const f64 as _, &one64 as *const f64 as _),
                (_, false) => (&one32 as *const f32 as _, &zero32 as *const f32 as _),
                (_, true) => (&one32 as *const f32 as _, &one32 as *const f32 as _),
            };
        let blas = gpu.blas()?;
        if k == 0 {
            // An empty product is 0 (plus the bias already in y).
            if !accumulate {
                // SAFETY: y is a checked contiguous [n, m] tensor of its dtype.
                unsafe {
                    cudarc::driver::result::memset_d8_async(
                        y_ptr,
                        0,
                        n * m * self.dtype().size_bytes(),
                        gpu.stream().cu_stream(),
                    )
                }?;
            }
            return Ok(());
        }
        // Column-major: y^T [m x n] = W^T... W row-major [m, k] is column-major [k x m],
        // so y^T = (W_cm)^T [m x k] * x^T [k x n], x row-major [n, k] = column-major [k x n].
        // SAFETY: x [n, k], W [m, k] and y [n, m] are checked contiguous tensors of this
        // dtype; alpha/beta are host values of the compute type; the handle runs on the
        // context's stream.
        unsafe {
            cudarc::cublas::result::gemm_ex(
                *blas.handle(),
                blas::cublasOperation_t::CUBLAS_OP_T,
                blas::cublasOperation_t::CUBLAS_OP_N,
                m as i32,
                n as i32,
                k as i32,
                alpha,
                w_ptr as *const _,
                t_elem,
                k as i32,
                x_ptr as *const _,
                t_elem,
                k as i32,
                beta,
                y_ptr as *mut _,
                t_elem,
                m as i32,
                compute,
                blas::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }?;
        Ok(())
    }
}

/// CUDA events around named ops on the context's stream, read back once the stream has
/// drained: device time per op, placed on a host clock for a trace.
pub struct Timeline {
    origin: CudaEvent,
    origin_us: f64,
    pending: Vec<(String, CudaEvent, CudaEvent)>,
}

impl std::fmt::Debug for Timeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Timeline")
            .field("pending", &self.pending.len())
            .finish()
    }
}

/// One op's device time.
#[derive(Debug, Clone, PartialEq)]
pub struct TimedOp {
    /// Op name.
    pub name: String,
    /// Microseconds since the timeline's origin, plus the origin's host time.
    pub start_us: f64,
    /// Device time in microseconds.
    pub dur_us: f64,
}

fn timing_event(gpu: &GpuContext) -> Result<CudaEvent> {
    Ok(gpu
        .stream()
        .record_event(Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT))?)
}

impl Timeline {
    /// Waits for the stream, then records the origin event; `origin_us` is the host time
    /// (on the caller's clock) that the origin stands for.
    pub fn new(gpu: &GpuContext, origin_us: f64) -> Result<Self> {
        gpu.synchronize()?;
        Ok(Timeline {
            origin: timing_event(gpu)?,
            origin_us,
            pending: Vec::new(),
        })
    }

    /// Records an event where an op begins.
    pub fn begin(&self, gpu: &GpuContext) -> Result<CudaEvent> {
        timing_event(gpu)
    }

    /// Records the event where the op begun at `start` ends, under `name`.
    pub fn end(
        &mut self,
        gpu: &GpuContext,
        name: impl Into<String>,
        start: CudaEvent,
    ) -> Result<()> {
        let end = timing_event(gpu)?;
        self.pending.push((name.into(), start, end));
        Ok(())
    }

    /// Runs `f` between two events named `name`.
    pub fn time<R>(
        &mut self,
        gpu: &GpuContext,
        name: &str,
        f: impl FnOnce() -> Result<R>,
    ) -> Result<R> {
        let start = timing_event(gpu)?;
        let r = f()?;
        let end = timing_event(gpu)?;
        self.pending.push((name.to_string(), start, end));
        Ok(r)
    }

    /// Waits for the recorded ops and returns them in order.
    pub fn finish(&mut self) -> Result<Vec<TimedOp>> {
        let mut out = Vec::with_capacity(self.pending.len());
        for (name, start, end) in self.pending.drain(..) {
            end.synchronize()?;
            let at = self.origin.elapsed_ms(&start)? as f64 * 1e3;
            let dur = start.elapsed_ms(&end)? as f64 * 1e3;
            out.push(TimedOp {
                name,
                start_us: self.origin_us + at,
                dur_us: dur,
            });
        }
        Ok(out)
    }
}
