//! [`CausalSelfAttention`] on a CUDA device: both projections through cuBLAS with the
//! weights uploaded once, q, k and v as strided views of the one `c_attn` output
//! (`[N, 3E]` read as `[1, H, N, D]` with row stride `3E`: no copies), attention in the
//! varlen mode of the fused kernels, whose packed `[N, H, D]` output is already the
//! `[N, E]` rows `c_proj` reads (no transpose either). A dense batch is the varlen batch
//! of `B` sequences of length `T`, so dense and nested input share one path.
//!
//! A training step runs on the device too: [`CudaCausalSelfAttention::forward_train`]
//! keeps what [`CudaCausalSelfAttention::backward`] needs, which replays the residual
//! dropout, runs both layers' backwards through cuBLAS (c_attn's over the q, k and v
//! gradients as the attention's varlen backward returns them) and rounds each gradient
//! once.
//!
//! Train/eval and the dropout stream follow the CPU module exactly: the same
//! [`DropoutGenerator`] advances by the same counts in the same order (attention, then
//! residual), and the kernels draw the same Philox bits, so a CPU and a CUDA module
//! seeded alike give the same result up to rounding.
//!
//! # Shapes
//! Dense `x [B, T, E]` as a contiguous device tensor `[1, B, T, E]` -> `[1, B, T, E]`;
//! nested `x [total, E]` as `[1, 1, total, E]` with `cu_seqlens` -> `[1, 1, total, E]`.
//!
//! ```no_run
//! use ndarray::{Array2, Array3};
//! use sdpa_cuda::GpuContext;
//! use sdpa_nn::cuda::CudaCausalSelfAttention;
//! use sdpa_nn::{CausalSelfAttention, Linear};
//!
//! let e = 64;
//! let w = |rows| Array2::from_elem((rows, e), half::f16::from_f32(0.01));
//! let module = CausalSelfAttention::new(Linear::new(w(3 * e), None)?, Linear::new(w(e), None)?, 4, 0.1, true)?;
//! let gpu = GpuContext::new(0).expect("a CUDA device");
//! let mut on_gpu = CudaCausalSelfAttention::upload(&gpu, &module).expect("upload");
//! on_gpu.eval();
//! let y = on_gpu.forward_host(&gpu, Array3::from_elem((2, 16, e), half::f16::ONE).view()).expect("forward");
//! assert_eq!(y.shape(), &[2, 16, e]);
//! # Ok::<(), sdpa_nn::NnError>(())
//! ```

use crate::device::{Linear, NnKernels, Timeline};
use crate::module::{CausalSelfAttention, DropoutGenerator};
use crate::profile::{Event, Profiler};
use ndarray::{Array2, Array3, ArrayView2, ArrayView3, Axis};
use sdpa_core::{BackendSet, Causal, DType, Dropout, Layout, SdpaError, SdpaOptions};
use sdpa_cuda::{DeviceElement, DeviceSeqlens, DeviceTensor, GpuContext, Result, Varlen};
use sdpa_nested::CuSeqlens;
use sdpa_ref::Element;

/// The module with its weights on the device.
#[derive(Debug)]
pub struct CudaCausalSelfAttention {
    c_attn: Linear,
    c_proj: Linear,
    kernels: NnKernels,
    heads: usize,
    dropout: f64,
    is_causal: bool,
    training: bool,
    generator: DropoutGenerator,
    backends: BackendSet,
    /// `cu_seqlens` of the last dense shape `(B, T)`, uploaded once per shape.
    dense_seqlens: Option<(usize, usize, DeviceSeqlens)>,
    /// Ones for the biases' column sums in the backward, as many as the largest batch.
    ones: Option<DeviceTensor>,
}

/// What [`CudaCausalSelfAttention::backward`] needs of its forward, on the device.
#[derive(Debug, Clone)]
pub struct CudaSaved {
    rows: DeviceTensor,
    qkv: DeviceTensor,
    attn_rows: DeviceTensor,
    attn_out: DeviceTensor,
    lse: DeviceTensor,
    options: SdpaOptions,
    cu: DeviceSeqlens,
    resid: Option<Dropout>,
    nested: bool,
}

/// The gradients of [`CudaCausalSelfAttention::backward`], on the device, each in the
/// module's dtype.
#[derive(Debug, Clone)]
pub struct CudaModuleGrads {
    /// `[1, B, T, E]`.
    pub dx: DeviceTensor,
    /// `c_attn.weight [1, 1, 3E, E]` and `c_attn.bias [1, 1, 1, 3E]` (if it has one).
    pub c_attn: (DeviceTensor, Option<DeviceTensor>),
    /// `c_proj.weight [1, 1, E, E]` and `c_proj.bias [1, 1, 1, E]` (if it has one).
    pub c_proj: (DeviceTensor, Option<DeviceTensor>),
    /// The attention backward's backend.
    pub attention_backend: sdpa_core::Backend,
}

fn upload_ones<T: DeviceElement + Element>(gpu: &GpuContext, n: usize) -> Result<DeviceTensor> {
    let one = T::from_acc(num_traits::One::one());
    DeviceTensor::upload(
        gpu,
        ndarray::Array4::from_elem((1, 1, n.max(1), 1), one).view(),
    )
}

fn rows_view(t: &DeviceTensor, rows: usize, cols: usize) -> Result<DeviceTensor> {
    let shape = [1, 1, rows, cols];
    t.view(shape, Layout::contiguous(shape).strides, 0)
}

impl CudaCausalSelfAttention {
    /// Uploads `module`'s weights once; takes its mode (train/eval), dropout stream,
    /// heads, dropout and causal flag.
    ///
    /// # Errors
    /// A failed upload.
    pub fn upload<T: DeviceElement + Element>(
        gpu: &GpuContext,
        module: &CausalSelfAttention<T>,
    ) -> Result<Self> {
        let (a, p) = (module.c_attn(), module.c_proj());
        Ok(CudaCausalSelfAttention {
            c_attn: Linear::upload(gpu, a.weight(), a.bias())?,
            c_proj: Linear::upload(gpu, p.weight(), p.bias())?,
            kernels: NnKernels,
            heads: module.heads(),
            dropout: module.dropout(),
            is_causal: module.is_causal(),
            training: module.is_training(),
            generator: module.generator(),
            backends: BackendSet::ALL,
            dense_seqlens: None,
            ones: None,
        })
    }

    /// Training mode: dropout and the configured causal mask apply.
    pub fn train(&mut self) {
        self.training = true;
    }

    /// Eval mode: no dropout and, as in the tutorial's module, no causal mask.
    pub fn eval(&mut self) {
        self.training = false;
    }

    /// Whether in training mode.
    pub fn is_training(&self) -> bool {
        self.training
    }

    /// Restarts the dropout stream at `seed`, counter 0.
    pub fn seed(&mut self, seed: u64) {
        self.generator = DropoutGenerator::new(seed);
    }

    /// The dropout stream's current state.
    pub fn generator(&self) -> DropoutGenerator {
        self.generator
    }

    /// Restricts the attention backends (flash > efficient; math takes no varlen).
    pub fn set_backends(&mut self, backends: BackendSet) {
        self.backends = backends;
    }

    /// The embedding dim `E`.
    pub fn embed_dim(&self) -> usize {
        self.c_attn.in_features()
    }

    fn attention_options(&mut self, batch: usize, len: usize) -> SdpaOptions {
        if !self.training {
            return SdpaOptions::default();
        }
        let elements = batch as u128 * self.heads as u128 * len as u128 * len as u128;
        SdpaOptions {
            causal: if self.is_causal {
                Causal::TopLeft
            } else {
                Causal::None
            },
            dropout: if self.dropout > 0.0 {
                self.generator.take(self.dropout, elements)
            } else {
                Dropout::NONE
            },
            ..Default::default()
        }
    }

    fn check_input(&self, x: &DeviceTensor, want: [usize; 4]) -> Result<()> {
        let e = self.embed_dim();
        if x.shape() != want
            || x.layout() != Layout::contiguous(want)
            || x.dtype() != self.c_attn.dtype()
        {
            return Err(SdpaError::invalid(
                "input",
                format!(
                    "a contiguous {} tensor {want:?} (E = {e})",
                    self.c_attn.dtype()
                ),
                format!(
                    "{} {:?} strides {:?}",
                    x.dtype(),
                    x.shape(),
                    x.layout().strides
                ),
            )
            .into());
        }
        Ok(())
    }

    /// `x` contiguous `[1, B, T, E]` -> `[1, B, T, E]`, queued on the context's stream.
    ///
    /// # Errors
    /// `x` of another shape, layout or dtype than the module's; a failed launch.
    pub fn forward(&mut self, gpu: &GpuContext, x: &DeviceTensor) -> Result<DeviceTensor> {
        self.forward_timed(gpu, x, None)
    }

    /// [`forward`](Self::forward), with CUDA events around every op in `timeline`.
    pub fn forward_timed(
        &mut self,
        gpu: &GpuContext,
        x: &DeviceTensor,
        timeline: Option<&mut Timeline>,
    ) -> Result<DeviceTensor> {
        let [_, batch, len, e] = x.shape();
        self.check_input(x, [1, batch, len, self.embed_dim()])?;
        let cu = self.dense_cu(gpu, batch, len)?;
        let rows = rows_view(x, batch * len, e)?;
        let y = self.run(gpu, &rows, &cu, batch, len, false, timeline, None)?;
        y.view(
            [1, batch, len, e],
            Layout::contiguous([1, batch, len, e]).strides,
            0,
        )
    }

    /// A nested batch: packed rows `x` contiguous `[1, 1, total, E]` with `cu_seqlens`,
    /// each sequence attending only to itself (causal per sequence in training).
    /// Dropout draws from the padded spaces `[B, H, Tmax, Tmax]` and `[B, Tmax, E]`, as
    /// the CPU module's `forward_nested`.
    ///
    /// # Errors
    /// `x` not `[1, 1, cu_seqlens.total(), E]` contiguous; a failed launch.
    pub fn forward_nested(
        &mut self,
        gpu: &GpuContext,
        x: &DeviceTensor,
        cu_seqlens: &DeviceSeqlens,
        timeline: Option<&mut Timeline>,
    ) -> Result<DeviceTensor> {
        self.check_input(x, [1, 1, cu_seqlens.total(), self.embed_dim()])?;
        self.run(
            gpu,
            x,
            cu_seqlens,
            cu_seqlens.batch(),
            cu_seqlens.max_len(),
            true,
            timeline,
            None,
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn run(
        &mut self,
        gpu: &GpuContext,
        rows: &DeviceTensor,
        cu: &DeviceSeqlens,
        batch: usize,
        max_len: usize,
        nested: bool,
        mut timeline: Option<&mut Timeline>,
        save: Option<&mut Option<CudaSaved>>,
    ) -> Result<DeviceTensor> {
        let n = rows.shape()[2];
        let e = self.embed_dim();
        if n == 0 {
            // Nothing to launch; the stream advances as the CPU module's does.
            self.attention_options(batch, max_len);
            if self.training && self.dropout > 0.0 {
                self.generator
                    .take(self.dropout, (batch * max_len * e) as u128);
            }
            return DeviceTensor::alloc(gpu, self.c_attn.dtype(), [1, 1, 0, e]);
        }
        let (h, d) = (self.heads, e / self.heads);
        let timed = |name: &str,
                     timeline: &mut Option<&mut Timeline>,
                     f: &mut dyn FnMut() -> Result<(DeviceTensor, Option<String>)>|
         -> Result<DeviceTensor> {
            match timeline {
                Some(t) => {
                    let start = t.begin(gpu)?;
                    let (out, label) = f()?;
                    t.end(gpu, label.unwrap_or_else(|| name.to_string()), start)?;
                    Ok(out)
                }
                None => Ok(f()?.0),
            }
        };
        let qkv = timed("c_attn (cublas gemm)", &mut timeline, &mut || {
            Ok((self.c_attn.forward(gpu, &self.kernels, rows)?, None))
        })?;
        // [N, 3E] = [N, 3, H, D]: q, k, v are [1, H, N, D] views with row stride 3E.
        let part = |i: usize| {
            qkv.view(
                [1, h, n, d],
                [(n * 3 * e) as isize, d as isize, (3 * e) as isize, 1],
                i * e,
            )
        };
        let (q, k, v) = (part(0)?, part(1)?, part(2)?);
        let options = self.attention_options(batch, max_len);
        let backends = self.backends;
        let mut attn_saved = None;
        let attn = timed("sdpa", &mut timeline, &mut || {
            let a = sdpa::attention_varlen(
                &q,
                &k,
                &v,
                Varlen {
                    cu_seqlens_q: cu,
                    cu_seqlens_k: cu,
                },
                &options,
                &sdpa::Exec::cuda(gpu).with_backends(backends),
            )?;
            let label = format!("sdpa ({} varlen kernel)", a.backend);
            let (out, lse) = a
                .into_cuda()
                .expect("device tensors in, device tensors out");
            // The packed [N, H, D] output is the [N, E] rows c_proj reads.
            let out_rows = rows_view(&out, n, e)?;
            attn_saved = Some((out, lse));
            Ok((out_rows, Some(label)))
        })?;
        let mut out = timed("c_proj (cublas gemm)", &mut timeline, &mut || {
            Ok((self.c_proj.forward(gpu, &self.kernels, &attn)?, None))
        })?;
        let mut resid = None;
        if self.training && self.dropout > 0.0 {
            let d = self
                .generator
                .take(self.dropout, (batch * max_len * e) as u128);
            let kernels = &self.kernels;
            out = timed("resid_dropout", &mut timeline, &mut || {
                kernels.dropout_rows(gpu, &out, &d, nested.then_some(cu))?;
                Ok((out.clone(), None))
            })?;
            resid = Some(d);
        }
        if let (Some(slot), Some((attn_out, lse))) = (save, attn_saved) {
            *slot = Some(CudaSaved {
                rows: rows.clone(),
                qkv,
                attn_rows: attn,
                attn_out,
                lse,
                options,
                cu: cu.clone(),
                resid,
                nested,
            });
        }
        Ok(out)
    }

    /// The forward of a training step on dense `x [1, B, T, E]`: [`forward`](Self::forward)'s
    /// result and what [`backward`](Self::backward) needs (the layers' inputs, the
    /// attention's out and lse, the dropout streams drawn), all on the device.
    ///
    /// # Errors
    /// As [`forward`](Self::forward).
    pub fn forward_train(
        &mut self,
        gpu: &GpuContext,
        x: &DeviceTensor,
    ) -> Result<(DeviceTensor, CudaSaved)> {
        let [_, batch, len, e] = x.shape();
        self.check_input(x, [1, batch, len, self.embed_dim()])?;
        if batch * len == 0 {
            return Err(SdpaError::invalid(
                "input",
                "at least one row",
                format!("{:?}", x.shape()),
            )
            .into());
        }
        let cu = self.dense_cu(gpu, batch, len)?;
        let rows = rows_view(x, batch * len, e)?;
        let mut saved = None;
        let y = self.run(gpu, &rows, &cu, batch, len, false, None, Some(&mut saved))?;
        let saved = saved.expect("a forward with rows saves");
        Ok((
            y.view(
                [1, batch, len, e],
                Layout::contiguous([1, batch, len, e]).strides,
                0,
            )?,
            saved,
        ))
    }

    /// The backward of the [`forward_train`](Self::forward_train) call that gave `saved`,
    /// for the incoming gradient `dout [1, B, T, E]`, on the device: the residual
    /// dropout's keep bits replayed, c_proj's backward (cuBLAS), the attention's varlen
    /// backward ([`GpuContext::sdpa_varlen_backward`], the tensor-core kernel in
    /// f16/bf16), c_attn's backward over the q, k and v gradients as they come (no
    /// concat). dx and the weights' and biases' gradients, each rounded once.
    ///
    /// # Errors
    /// `dout` not the forward's output shape; what the device refuses.
    pub fn backward(
        &mut self,
        gpu: &GpuContext,
        saved: &CudaSaved,
        dout: &DeviceTensor,
    ) -> Result<CudaModuleGrads> {
        let n = saved.rows.shape()[2];
        let e = self.embed_dim();
        let (h, d) = (self.heads, e / self.heads);
        let want = [1, dout.shape()[1], dout.shape()[2], e];
        if dout.shape()[1] * dout.shape()[2] != n {
            return Err(SdpaError::invalid(
                "grad_out",
                format!("{n} rows of {e} (the forward's output)"),
                format!("{:?}", dout.shape()),
            )
            .into());
        }
        self.check_input(dout, want)?;
        let dtype = self.c_attn.dtype();
        // dpre = dout with the residual dropout's keep bits (and 1 / (1 - p)) replayed.
        let dpre = DeviceTensor::alloc(gpu, dtype, [1, 1, n, e])?;
        let bytes = n * e * dtype.size_bytes();
        // SAFETY: both are checked contiguous tensors of `bytes` bytes.
        unsafe {
            cudarc::driver::result::memcpy_dtod_async(
                dpre.checked_address(gpu, "grad_out")?,
                dout.checked_address(gpu, "grad_out")?,
                bytes,
                gpu.stream().cu_stream(),
            )
        }?;
        if let Some(resid) = &saved.resid {
            self.kernels
                .dropout_rows(gpu, &dpre, resid, saved.nested.then_some(&saved.cu))?;
        }
        let ones = self.ones(gpu, n)?;
        let proj = self
            .c_proj
            .backward(gpu, &saved.attn_rows, &[&dpre], &ones)?;
        // dattn rows [N, E] are the packed [1, H, N, D] the attention's out is.
        let dattn = proj.dx.view(
            [1, h, n, d],
            [(n * e) as isize, d as isize, e as isize, 1],
            0,
        )?;
        let part = |i: usize| {
            saved.qkv.view(
                [1, h, n, d],
                [(n * 3 * e) as isize, d as isize, (3 * e) as isize, 1],
                i * e,
            )
        };
        let g = gpu.sdpa_varlen_backward(
            &part(0)?,
            &part(1)?,
            &part(2)?,
            Varlen {
                cu_seqlens_q: &saved.cu,
                cu_seqlens_k: &saved.cu,
            },
            &saved.attn_out,
            &saved.lse,
            &dattn,
            &saved.options,
            self.backends,
        )?;
        let (dq, dk, dv) = (
            rows_view(&g.dq, n, e)?,
            rows_view(&g.dk, n, e)?,
            rows_view(&g.dv, n, e)?,
        );
        let attn = self
            .c_attn
            .backward(gpu, &saved.rows, &[&dq, &dk, &dv], &ones)?;
        Ok(CudaModuleGrads {
            dx: attn.dx.view(want, Layout::contiguous(want).strides, 0)?,
            c_attn: (attn.weight, attn.bias),
            c_proj: (proj.weight, proj.bias),
            attention_backend: g.backend,
        })
    }

    /// `cu_seqlens` of the dense shape `(B, T)`, uploaded once per shape.
    fn dense_cu(&mut self, gpu: &GpuContext, batch: usize, len: usize) -> Result<DeviceSeqlens> {
        Ok(match &self.dense_seqlens {
            Some((b, t, cu)) if (*b, *t) == (batch, len) => cu.clone(),
            _ => {
                let offsets: Vec<u32> = (0..=batch).map(|b| (b * len) as u32).collect();
                let cu = DeviceSeqlens::upload_u32(gpu, &offsets)?;
                self.dense_seqlens = Some((batch, len, cu.clone()));
                cu
            }
        })
    }

    /// At least `n` ones of the module's dtype (`[1, 1, >= n, 1]`), uploaded once per size.
    fn ones(&mut self, gpu: &GpuContext, n: usize) -> Result<DeviceTensor> {
        if let Some(t) = &self.ones {
            if t.shape()[2] >= n {
                return Ok(t.clone());
            }
        }
        let t = match self.c_attn.dtype() {
            DType::F64 => upload_ones::<f64>(gpu, n)?,
            DType::F32 => upload_ones::<f32>(gpu, n)?,
            DType::F16 => upload_ones::<half::f16>(gpu, n)?,
            DType::BF16 => upload_ones::<half::bf16>(gpu, n)?,
        };
        self.ones = Some(t.clone());
        Ok(t)
    }

    /// Uploads `x [B, T, E]`, runs [`forward`](Self::forward) and downloads.
    ///
    /// # Errors
    /// As [`forward`](Self::forward).
    pub fn forward_host<T: DeviceElement + Element>(
        &mut self,
        gpu: &GpuContext,
        x: ArrayView3<'_, T>,
    ) -> Result<Array3<T>> {
        let dx = DeviceTensor::upload(gpu, x.insert_axis(Axis(0)))?;
        let y = self.forward(gpu, &dx)?;
        Ok(y.download::<T>(gpu)?.index_axis_move(Axis(0), 0))
    }

    /// Uploads packed rows `x [total, E]` and `cu_seqlens`, runs
    /// [`forward_nested`](Self::forward_nested) and downloads `[total, E]`.
    ///
    /// # Errors
    /// As [`forward_nested`](Self::forward_nested); offsets above `u32::MAX`.
    pub fn forward_nested_host<T: DeviceElement + Element>(
        &mut self,
        gpu: &GpuContext,
        x: ArrayView2<'_, T>,
        cu_seqlens: &CuSeqlens,
    ) -> Result<Array2<T>> {
        let offsets = cu_seqlens.to_u32().ok_or_else(|| {
            SdpaError::invalid("cu_seqlens", "offsets that fit in u32", cu_seqlens.total())
        })?;
        let cu = DeviceSeqlens::upload_u32(gpu, &offsets)?;
        let dx = DeviceTensor::upload(gpu, x.insert_axis(Axis(0)).insert_axis(Axis(0)))?;
        let y = self.forward_nested(gpu, &dx, &cu, None)?;
        Ok(y.download::<T>(gpu)?
            .index_axis_move(Axis(0), 0)
            .index_axis_move(Axis(0), 0))
    }
}

/// Records a finished [`Timeline`] in `profiler` as CUDA events.
///
/// # Errors
/// A failed event query.
pub fn record_timeline(timeline: &mut Timeline, profiler: &mut Profiler) -> Result<()> {
    for op in timeline.finish()? {
        profiler.record(Event {
            name: op.name,
            device: "cuda",
            start_us: op.start_us,
            dur_us: op.dur_us,
        });
    }
    Ok(())
}

/// Profiles `iters` calls of `module.forward(x)` after one warm-up call: a CUDA event
/// pair around every op (one kernel each, or cuBLAS's product) and around each whole
/// forward, recorded in `profiler` as device `cuda` events.
///
/// # Errors
/// A failed forward or event query.
pub fn profile_forward(
    gpu: &GpuContext,
    module: &mut CudaCausalSelfAttention,
    x: &DeviceTensor,
    iters: usize,
    profiler: &mut Profiler,
) -> Result<()> {
    module.forward(gpu, x)?;
    let mut timeline = Timeline::new(gpu, profiler.now_us())?;
    for _ in 0..iters {
        let start = timeline.begin(gpu)?;
        let y = module.forward_timed(gpu, x, Some(&mut timeline))?;
        timeline.end(gpu, "CausalSelfAttention.forward", start)?;
        drop(y);
    }
    record_timeline(&mut timeline, profiler)
}
