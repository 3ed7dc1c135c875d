//! Device building blocks of the CUDA module ([`crate::cuda`]): [`Linear`] through
//! cuBLAS (weights uploaded once), the residual dropout on the Philox stream of
//! `sdpa-core`, and [`Timeline`], CUDA events around each op for the profiler. The
//! elementwise kernels (`kernels/nn.cu`) compile through `sdpa-cuda`'s registry and
//! disk cache like the attention kernels.
//!
//! # Shapes
//! Rows are a contiguous `[1, 1, N, features]` tensor: `x [N, in] -> y [N, out]`.

use cudarc::driver::{CudaEvent, PushKernelArg};
use ndarray::{Array1, Array2};
use sdpa_core::{DType, Dropout, Layout};
use sdpa_cuda::blas::{blas_types, Gemm, Operand};
use sdpa_cuda::launch::elementwise;
use sdpa_cuda::spec::{Entry, KernelSpec, Kind};
use sdpa_cuda::{CudaError, DeviceElement, DeviceSeqlens, DeviceTensor, GpuContext, Result};

/// The elementwise kernels of `kernels/nn.cu`, per dtype, from the context's registry.
#[derive(Debug, Default, Clone, Copy)]
pub struct NnKernels;

impl NnKernels {
    fn function(
        &self,
        gpu: &GpuContext,
        dtype: DType,
        entry: Entry,
    ) -> Result<cudarc::driver::CudaFunction> {
        Ok(gpu
            .kernel(&KernelSpec::plain(Kind::Nn, dtype), entry)?
            .function)
    }

    /// Writes `bias` into every row of `y` (contiguous `[1, 1, rows, cols]`).
    fn bias_rows(&self, gpu: &GpuContext, y: &DeviceTensor, bias: &DeviceTensor) -> Result<()> {
        let [_, _, rows, cols] = y.shape();
        if rows * cols == 0 {
            return Ok(());
        }
        let f = self.function(gpu, y.dtype(), Entry::NnBiasRows)?;
        let (y_ptr, b_ptr) = (
            y.checked_address(gpu, "y")?,
            bias.checked_address(gpu, "bias")?,
        );
        let (rows, cols) = (rows as u64, cols as u64);
        let mut builder = gpu.stream().launch_builder(&f);
        builder.arg(&y_ptr).arg(&b_ptr).arg(&rows).arg(&cols);
        // SAFETY: y is a checked contiguous [rows, cols] tensor of its dtype and bias a
        // checked [cols] tensor of the same dtype; the kernel touches y[0..rows*cols)
        // and bias[0..cols) only.
        unsafe { builder.launch(elementwise((rows * cols) as usize)) }?;
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
                return Err(CudaError::bad_layout(
                    "cu_seqlens",
                    format!("a last offset equal to the rows, {rows}"),
                    cu.total(),
                ));
            }
        }
        let f = self.function(gpu, y.dtype(), Entry::NnDropoutRows)?;
        let y_ptr = y.checked_address(gpu, "y")?;
        let (rows, cols) = (rows as u64, cols as u64);
        let (seed, offset, threshold) = (dropout.seed, dropout.offset, dropout.keep_threshold());
        let (cu_ptr, code, batch, max_len) = match cu_seqlens {
            Some(cu) => (
                cu.address(gpu),
                cu.code() as i32,
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
        unsafe { builder.launch(elementwise((rows * cols) as usize)) }?;
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
        return Err(CudaError::bad_layout(
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
                return Err(CudaError::bad_layout(
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
                return Err(CudaError::bad_layout(
                    "input",
                    format!("{what} <= {}", i32::MAX),
                    value,
                ));
            }
        }
        let (x_ptr, w_ptr, y_ptr) = (
            x.checked_address(gpu, "input")?,
            self.weight.checked_address(gpu, "weight")?,
            y.checked_address(gpu, "y")?,
        );
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
        let types = blas_types(self.dtype());
        let matrix = |ptr, ld| Operand {
            ptr,
            dtype: types.elem,
            ld,
            stride: 0,
        };
        // Column-major: W row-major [m, k] is column-major [k x m] and x row-major
        // [n, k] is column-major [k x n], so y^T [m x n] = (W_cm)^T [m x k] * x_cm.
        let product = Gemm {
            trans_a: true,
            trans_b: false,
            m,
            n,
            k,
            a: matrix(w_ptr, k),
            b: matrix(x_ptr, k),
            c: matrix(y_ptr, m),
            batch: 1,
            accumulate,
            compute: types.compute,
        };
        // SAFETY: x [n, k], W [m, k] and y [n, m] are checked contiguous tensors of this
        // dtype.
        unsafe { product.run(gpu) }?;
        Ok(())
    }
}

/// The gradients of a device [`Linear`]: `dx [1, 1, N, in]`, `weight [1, 1, out, in]`,
/// `bias [1, 1, 1, out]` (if the layer has one), each in the layer's dtype.
#[derive(Debug, Clone)]
pub struct LinearGrads {
    /// The input's gradient.
    pub dx: DeviceTensor,
    /// The weight's gradient.
    pub weight: DeviceTensor,
    /// The bias's gradient.
    pub bias: Option<DeviceTensor>,
}

/// A zeroed contiguous `[1, 1, rows, cols]` tensor.
fn zeros(gpu: &GpuContext, dtype: DType, rows: usize, cols: usize) -> Result<DeviceTensor> {
    let t = DeviceTensor::alloc(gpu, dtype, [1, 1, rows, cols])?;
    let bytes = rows * cols * dtype.size_bytes();
    if bytes > 0 {
        let ptr = t.checked_address(gpu, "gradient")?;
        // SAFETY: t is a fresh contiguous allocation of `bytes` bytes.
        unsafe {
            cudarc::driver::result::memset_d8_async(ptr, 0, bytes, gpu.stream().cu_stream())
        }?;
    }
    Ok(t)
}

impl Linear {
    /// The backward of `y = x W^T + b` for the incoming gradient `dy [N, out]`, given as
    /// `parts`: column blocks of equal width, each a contiguous `[1, 1, N, out / P]`
    /// (c_attn's is q, k and v, as the attention backward returns them, so no concat).
    /// `ones` holds at least `N` ones of the dtype (`[1, 1, >= N, 1]`) for the bias's
    /// column sums. cuBLAS, f32 accumulation: `dW` and `db` are one product per block
    /// (each of their rows written once); `dx` sums the blocks in an f32 buffer and is
    /// rounded once, as the CPU `Linear::backward`.
    ///
    /// # Errors
    /// Parts that do not tile `out`, operands of other shapes; cuBLAS failing.
    pub fn backward(
        &self,
        gpu: &GpuContext,
        x: &DeviceTensor,
        parts: &[&DeviceTensor],
        ones: &DeviceTensor,
    ) -> Result<LinearGrads> {
        let n = x.shape()[2];
        let (k_in, out) = (self.in_features, self.out_features);
        let dtype = self.dtype();
        check_rows("input", x, n, k_in, dtype)?;
        if parts.is_empty() || out % parts.len() != 0 {
            return Err(CudaError::bad_layout(
                "grad_out",
                format!("column blocks that tile {out} features"),
                parts.len(),
            ));
        }
        let w = out / parts.len();
        for part in parts {
            check_rows("grad_out", part, n, w, dtype)?;
        }
        if ones.shape()[2] < n || ones.dtype() != dtype {
            return Err(CudaError::bad_layout(
                "ones",
                format!("at least {n} {dtype} ones"),
                format!("{} {:?}", ones.dtype(), ones.shape()),
            ));
        }
        let weight = zeros(gpu, dtype, out, k_in)?;
        let bias = self
            .bias
            .as_ref()
            .map(|_| zeros(gpu, dtype, 1, out))
            .transpose()?;
        let dx = zeros(gpu, dtype, n, k_in)?;
        if n == 0 || k_in == 0 || w == 0 {
            return Ok(LinearGrads { dx, weight, bias });
        }
        let types = blas_types(dtype);
        let size = dtype.size_bytes() as u64;
        let op = |ptr, ld, dt| Operand {
            ptr,
            dtype: dt,
            ld,
            stride: 0,
        };
        let dx_acc = DeviceTensor::alloc(gpu, DType::F32, [1, 1, n, k_in])?;
        let (x_ptr, w_ptr) = (
            x.checked_address(gpu, "input")?,
            self.weight.checked_address(gpu, "weight")?,
        );
        let (dw_ptr, dx_acc_ptr) = (
            weight.checked_address(gpu, "weight")?,
            dx_acc.checked_address(gpu, "dx")?,
        );
        let ones_ptr = ones.checked_address(gpu, "ones")?;
        for (p, part) in parts.iter().enumerate() {
            let d_ptr = part.checked_address(gpu, "grad_out")?;
            // Column-major views: x [in x N], dy_p [w x N], W's rows p*w.. [in x w].
            let w_rows = w_ptr + (p * w * k_in) as u64 * size;
            let products = [
                // dx^T [in x N] (+)= W_p [in x w] * dy_p [w x N], in f32.
                Gemm {
                    trans_a: false,
                    trans_b: false,
                    m: k_in,
                    n,
                    k: w,
                    a: op(w_rows, k_in, types.elem),
                    b: op(d_ptr, w, types.elem),
                    c: op(dx_acc_ptr, k_in, types.acc),
                    batch: 1,
                    accumulate: p > 0,
                    compute: types.compute,
                },
                // dW_p^T [in x w] = x [in x N] * dy_p^T [N x w].
                Gemm {
                    trans_a: false,
                    trans_b: true,
                    m: k_in,
                    n: w,
                    k: n,
                    a: op(x_ptr, k_in, types.elem),
                    b: op(d_ptr, w, types.elem),
                    c: op(dw_ptr + (p * w * k_in) as u64 * size, k_in, types.elem),
                    batch: 1,
                    accumulate: false,
                    compute: types.compute,
                },
            ];
            for g in products {
                // SAFETY: every operand is a checked contiguous tensor of the sizes named
                // (x [N, in], dy_p [N, w], W [out, in] with block p's rows, dW likewise,
                // the f32 dx accumulator [N, in]).
                unsafe { g.run(gpu) }?;
            }
            if let Some(db) = &bias {
                let db_ptr = db.checked_address(gpu, "bias")? + (p * w) as u64 * size;
                // db_p [w x 1] = dy_p [w x N] * ones [N x 1].
                let g = Gemm {
                    trans_a: false,
                    trans_b: false,
                    m: w,
                    n: 1,
                    k: n,
                    a: op(d_ptr, w, types.elem),
                    b: op(ones_ptr, n, types.elem),
                    c: op(db_ptr, w, types.elem),
                    batch: 1,
                    accumulate: false,
                    compute: types.compute,
                };
                // SAFETY: dy_p [N, w], ones (>= N values) and db's block [w] are checked.
                unsafe { g.run(gpu) }?;
            }
        }
        let dst = dx.checked_address(gpu, "dx")?;
        // SAFETY: dx_acc holds n*in f32 values (one slice), dx n*in elements of the dtype.
        unsafe { sdpa_cuda::round_into(gpu, dtype, (dx_acc_ptr, 1), dst, n * k_in, 1.0) }?;
        drop(dx_acc);
        Ok(LinearGrads { dx, weight, bias })
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
