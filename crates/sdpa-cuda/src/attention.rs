//! The CUDA backends (flash, efficient, math) and dispatch between them.

use crate::context::GpuContext;
use crate::error::{CudaError, Result};
use crate::kernels::{tc_shared_bytes, tc_tile_shape, wg_tile_shape, wgmma_enabled, KernelSpec};
use crate::params::SdpaParams;
use crate::tensor::{
    lse_to_3d, Buffer, DeviceElement, DeviceMask, DeviceSeqlens, DeviceTensor, HostMask,
};
use cudarc::cublas::sys as blas;
use cudarc::driver::{LaunchConfig, PushKernelArg};
use ndarray::{Array3, Array4, ArrayView4};
use sdpa_core::{
    check_support, select, Backend, BackendSet, DType, Device, Layout, MaskKind, Problem,
    SdpaError, SdpaOptions, TensorDesc,
};

/// What a CUDA SDPA call returns.
#[derive(Debug, Clone)]
pub struct Attention {
    /// `[B, Hq, L, Ev]` (contiguous), or packed `[total_q, Hq, Ev]` seen as
    /// `[1, Hq, total_q, Ev]` in varlen mode.
    pub out: DeviceTensor,
    /// Log-sum-exp, f32 `[B, Hq, L, 1]` (`[1, Hq, total_q, 1]` in varlen mode).
    pub lse: DeviceTensor,
    /// The backend that ran.
    pub backend: Backend,
}

/// A CUDA call's results on the host.
#[derive(Debug, Clone)]
pub struct HostOutput<T> {
    /// `[B, Hq, L, Ev]`.
    pub out: Array4<T>,
    /// `[B, Hq, L]`.
    pub lse: Array3<f32>,
    /// The backend that ran.
    pub backend: Backend,
}

/// The two `cu_seqlens` of a variable-length call.
#[derive(Debug, Clone, Copy)]
pub struct Varlen<'a> {
    /// Query sequence offsets, length B+1.
    pub cu_seqlens_q: &'a DeviceSeqlens,
    /// Key/value sequence offsets, length B+1.
    pub cu_seqlens_k: &'a DeviceSeqlens,
}

fn fits_i32(arg: &'static str, what: &str, value: usize) -> Result<()> {
    if value > i32::MAX as usize {
        return Err(CudaError::layout(
            arg,
            format!("{what} <= {}", i32::MAX),
            value,
        ));
    }
    Ok(())
}

/// The fused kernel (spec, grid rows per CTA, threads, dynamic shared bytes) a problem
/// uses on a device of compute capability `arch`.
pub(crate) fn fused_kernel(problem: &Problem, arch: u32) -> (KernelSpec, u32, u32, u32) {
    // Masks and dropout take the variant that has them compiled in; the plain flash
    // path carries neither.
    let extras = problem.dropout.is_active() || problem.mask.is_some();
    // Hopper: the plain path in f16/bf16 up to head dim 128 takes the wgmma kernel.
    if !extras && problem.dtype != DType::F32 && wgmma_enabled() {
        if let Some(spec @ KernelSpec::Wg { head_dim, .. }) =
            KernelSpec::wg(problem.dtype, problem.head_dim, problem.head_dim_v)
        {
            if spec.runs_on(arch) {
                let tiles = wg_tile_shape(head_dim);
                return (
                    spec,
                    tiles.block_rows(),
                    128 * tiles.warpgroups,
                    tiles.shared_bytes(head_dim),
                );
            }
        }
    }
    if problem.dtype == DType::F32 {
        let spec = KernelSpec::simt(problem.dtype, problem.head_dim, problem.head_dim_v, extras);
        (spec, 4, 128, 0)
    } else {
        let spec = KernelSpec::tc(problem.dtype, problem.head_dim, problem.head_dim_v, extras);
        let KernelSpec::Tc { head_dim, .. } = spec else {
            unreachable!("tc() makes a Tc spec")
        };
        let tiles = tc_tile_shape(head_dim);
        (
            spec,
            tiles.block_rows(),
            32 * tiles.warps,
            tc_shared_bytes(head_dim),
        )
    }
}

fn check_shape(
    arg: &'static str,
    tensor: &DeviceTensor,
    want: [usize; 4],
    dtype: DType,
) -> Result<()> {
    if tensor.shape() != want || tensor.dtype() != dtype {
        return Err(CudaError::layout(
            arg,
            format!("{dtype} {want:?}"),
            format!("{} {:?}", tensor.dtype(), tensor.shape()),
        ));
    }
    Ok(())
}

fn check_contiguous(arg: &'static str, tensor: &DeviceTensor) -> Result<()> {
    let layout = tensor.layout();
    if layout != Layout::contiguous(layout.shape) {
        return Err(CudaError::layout(
            arg,
            format!(
                "contiguous strides {:?}",
                Layout::contiguous(layout.shape).strides
            ),
            format!("{:?}", layout.strides),
        ));
    }
    Ok(())
}

impl GpuContext {
    /// Validates a call on device tensors.
    pub fn problem(
        &self,
        q: &DeviceTensor,
        k: &DeviceTensor,
        v: &DeviceTensor,
        mask: Option<&DeviceMask>,
        options: &SdpaOptions,
    ) -> Result<Problem> {
        let mask_desc = mask.map(DeviceMask::desc);
        Ok(Problem::new(
            &q.desc(),
            &k.desc(),
            &v.desc(),
            mask_desc.as_ref(),
            options,
        )?)
    }

    /// SDPA on the device: dispatch picks the first backend of `backends` (flash >
    /// efficient > math) whose support check passes; when none does, the error lists
    /// every backend's reason.
    pub fn sdpa(
        &self,
        q: &DeviceTensor,
        k: &DeviceTensor,
        v: &DeviceTensor,
        mask: Option<&DeviceMask>,
        options: &SdpaOptions,
        backends: BackendSet,
    ) -> Result<Attention> {
        let problem = self.problem(q, k, v, mask, options)?;
        let backend = select(backends, &problem, Device::Cuda)?;
        let out = DeviceTensor::alloc(self, problem.dtype, problem.out_shape())?;
        let [b, h, l] = problem.lse_shape();
        let lse = DeviceTensor::alloc(self, DType::F32, [b, h, l, 1])?;
        self.run(backend, &problem, q, k, v, mask, &out, &lse)?;
        Ok(Attention { out, lse, backend })
    }

    /// Uploads, runs [`GpuContext::sdpa`] and downloads.
    pub fn sdpa_host<T: DeviceElement>(
        &self,
        q: ArrayView4<'_, T>,
        k: ArrayView4<'_, T>,
        v: ArrayView4<'_, T>,
        mask: Option<&HostMask<'_, T>>,
        options: &SdpaOptions,
        backends: BackendSet,
    ) -> Result<HostOutput<T>> {
        let dq = DeviceTensor::upload(self, q)?;
        let dk = DeviceTensor::upload(self, k)?;
        let dv = DeviceTensor::upload(self, v)?;
        let dmask = mask.map(|m| m.upload(self)).transpose()?;
        let result = self.sdpa(&dq, &dk, &dv, dmask.as_ref(), options, backends)?;
        Ok(HostOutput {
            out: result.out.download(self)?,
            lse: lse_to_3d(result.lse.download(self)?),
            backend: result.backend,
        })
    }

    /// Runs `backend` on a validated `problem` into caller-owned `out` (contiguous
    /// `[B, Hq, L, Ev]`) and `lse` (contiguous f32 `[B, Hq, L, 1]`), without waiting.
    /// Every argument is checked against the problem and its buffer before the launch.
    #[allow(clippy::too_many_arguments)]
    pub fn run(
        &self,
        backend: Backend,
        problem: &Problem,
        q: &DeviceTensor,
        k: &DeviceTensor,
        v: &DeviceTensor,
        mask: Option<&DeviceMask>,
        out: &DeviceTensor,
        lse: &DeviceTensor,
    ) -> Result<()> {
        if let Err(reason) = check_support(backend, problem, Device::Cuda) {
            return Err(SdpaError::NoBackend(vec![(backend, reason)]).into());
        }
        let mask_desc = mask.map(DeviceMask::desc);
        let again = Problem::new(
            &q.desc(),
            &k.desc(),
            &v.desc(),
            mask_desc.as_ref(),
            &SdpaOptions {
                causal: problem.causal,
                dropout: problem.dropout,
                scale: Some(problem.scale),
                enable_gqa: problem.enable_gqa,
            },
        )?;
        if again != *problem {
            return Err(CudaError::layout(
                "query",
                format!("the tensors of the problem {}", problem.summary()),
                again.summary(),
            ));
        }
        let [b, h, l, ev] = problem.out_shape();
        check_shape("out", out, [b, h, l, ev], problem.dtype)?;
        check_contiguous("out", out)?;
        check_shape("lse", lse, [b, h, l, 1], DType::F32)?;
        check_contiguous("lse", lse)?;
        let mut params = self.tensor_params(problem, q, k, v, mask, out, lse)?;
        if self.poison_outputs() {
            out.poison(self)?;
            lse.poison(self)?;
        }
        match backend {
            Backend::Math => self.run_math(problem, q, k, v, &mut params),
            _ => self.launch_fused(problem, &mut params),
        }
    }

    /// Variable-length SDPA on packed sequences (the varlen mode of the fused kernels):
    /// q `[total_q, Hq, E]`, k `[total_k, Hkv, E]`, v `[total_k, Hkv, Ev]` seen as
    /// `[1, H, total, E]` views (strides `[0, E_stride_h, row_stride, 1]`). Sequence `b`
    /// is rows `cu_seqlens[b]..cu_seqlens[b+1]`; causal alignment is per sequence;
    /// dropout indexes the padded `[B, Hq, max_q, max_k]` space, so the result equals the
    /// padded dense call with a key-padding mask. No padding is computed or stored.
    pub fn sdpa_varlen(
        &self,
        q: &DeviceTensor,
        k: &DeviceTensor,
        v: &DeviceTensor,
        varlen: Varlen<'_>,
        options: &SdpaOptions,
        backends: BackendSet,
    ) -> Result<Attention> {
        let (cq, ck) = (varlen.cu_seqlens_q, varlen.cu_seqlens_k);
        if cq.batch() != ck.batch() {
            return Err(CudaError::layout(
                "cu_seqlens_k",
                format!("{} sequences (those of cu_seqlens_q)", cq.batch()),
                ck.batch(),
            ));
        }
        for (arg, t, total) in [
            ("query", q, cq.total()),
            ("key", k, ck.total()),
            ("value", v, ck.total()),
        ] {
            let s = t.shape();
            if s[0] != 1 || s[2] != total {
                return Err(CudaError::layout(
                    arg,
                    format!("a packed [1, H, {total}, dim] view (total rows from cu_seqlens)"),
                    format!("{s:?}"),
                ));
            }
        }
        // The problem as the padded dense call sees it: B sequences of the longest length.
        let padded = |t: &DeviceTensor, len: usize| {
            let s = t.shape();
            TensorDesc::contiguous(t.dtype(), [cq.batch(), s[1], len, s[3]])
        };
        let problem = Problem::new(
            &padded(q, cq.max_len()),
            &padded(k, ck.max_len()),
            &padded(v, ck.max_len()),
            None,
            options,
        )?;
        let mut reasons = Vec::new();
        let mut chosen = None;
        for backend in backends.iter() {
            let verdict = if backend == Backend::Math {
                Err(
                    "takes no cu_seqlens (variable-length batches run on flash and efficient)"
                        .to_string(),
                )
            } else {
                check_support(backend, &problem, Device::Cuda).and_then(|()| {
                    for (name, t) in [("query", q), ("key", k), ("value", v)] {
                        if !t.layout().last_dim_contiguous() {
                            return Err(format!("needs a unit stride in the last dim of {name}"));
                        }
                    }
                    Ok(())
                })
            };
            match verdict {
                Ok(()) => {
                    chosen = Some(backend);
                    break;
                }
                Err(reason) => reasons.push((backend, reason)),
            }
        }
        let backend = chosen.ok_or(SdpaError::NoBackend(reasons))?;
        let [_, hq, total_q, ev] = [1, problem.heads_q, cq.total(), problem.head_dim_v];
        let storage = DeviceTensor::alloc(self, problem.dtype, [1, 1, total_q * hq, ev])?;
        let out = storage.view(
            [1, hq, total_q, ev],
            [
                (total_q * hq * ev) as isize,
                ev as isize,
                (hq * ev) as isize,
                1,
            ],
            0,
        )?;
        let lse = DeviceTensor::alloc(self, DType::F32, [1, hq, total_q, 1])?;
        let mut params = SdpaParams::from_problem(&problem);
        let fill = |t: &DeviceTensor, arg: &'static str| -> Result<(u64, [i64; 4])> {
            let address = t.check(self, arg)?;
            let s = t.layout().strides;
            Ok((address, [0, s[1] as i64, s[2] as i64, s[3] as i64]))
        };
        let (qa, qs) = fill(q, "query")?;
        let (ka, ks) = fill(k, "key")?;
        let (va, vs) = fill(v, "value")?;
        [params.q, params.k, params.v] = [qa, ka, va];
        [
            params.q_stride_b,
            params.q_stride_h,
            params.q_stride_l,
            params.q_stride_e,
        ] = qs;
        [
            params.k_stride_b,
            params.k_stride_h,
            params.k_stride_l,
            params.k_stride_e,
        ] = ks;
        [
            params.v_stride_b,
            params.v_stride_h,
            params.v_stride_l,
            params.v_stride_e,
        ] = vs;
        params.out = out.check(self, "out")?;
        [
            params.out_stride_b,
            params.out_stride_h,
            params.out_stride_l,
        ] = [0, ev as i64, (hq * ev) as i64];
        params.lse = lse.check(self, "lse")?;
        [
            params.lse_stride_b,
            params.lse_stride_h,
            params.lse_stride_l,
        ] = [0, total_q as i64, 1];
        params.cu_seqlens_q = cq.buffer.address(self);
        params.cu_seqlens_k = ck.buffer.address(self);
        params.varlen = cq.code();
        if cq.code() != ck.code() {
            return Err(CudaError::layout(
                "cu_seqlens_k",
                "the index type of cu_seqlens_q",
                if ck.code() == 2 { "i32" } else { "u32" },
            ));
        }
        params.vec_ok = self.vec_ok(problem.dtype, &[(q, qa), (k, ka), (v, va)]) as i32;
        if self.poison_outputs() {
            out.poison(self)?;
            lse.poison(self)?;
        }
        self.launch_fused(&problem, &mut params)?;
        Ok(Attention { out, lse, backend })
    }

    /// 16-byte loads are valid when every base address is 16-byte aligned and every
    /// batch, head and row stride is a whole number of 16-byte chunks.
    fn vec_ok(&self, dtype: DType, tensors: &[(&DeviceTensor, u64)]) -> bool {
        let per_chunk = (16 / dtype.size_bytes()) as isize;
        tensors.iter().all(|(t, address)| {
            let s = t.layout().strides;
            address % 16 == 0 && s[..3].iter().all(|&x| x % per_chunk == 0)
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn tensor_params(
        &self,
        problem: &Problem,
        q: &DeviceTensor,
        k: &DeviceTensor,
        v: &DeviceTensor,
        mask: Option<&DeviceMask>,
        out: &DeviceTensor,
        lse: &DeviceTensor,
    ) -> Result<SdpaParams> {
        for (what, value) in [
            ("batch", problem.batch),
            ("heads", problem.heads_q),
            ("query length", problem.len_q),
            ("key length", problem.len_kv),
            ("head dim", problem.head_dim.max(problem.head_dim_v)),
        ] {
            fits_i32("query", what, value)?;
        }
        if problem.batch > 65535 || problem.heads_q > 65535 {
            return Err(CudaError::layout(
                "query",
                "B and Hq up to 65535 (the grid's y and z limits)",
                format!("B={} Hq={}", problem.batch, problem.heads_q),
            ));
        }
        let mut p = SdpaParams::from_problem(problem);
        let strides = |t: &DeviceTensor| t.layout().strides.map(|s| s as i64);
        p.q = q.check(self, "query")?;
        p.k = k.check(self, "key")?;
        p.v = v.check(self, "value")?;
        [p.q_stride_b, p.q_stride_h, p.q_stride_l, p.q_stride_e] = strides(q);
        [p.k_stride_b, p.k_stride_h, p.k_stride_l, p.k_stride_e] = strides(k);
        [p.v_stride_b, p.v_stride_h, p.v_stride_l, p.v_stride_e] = strides(v);
        p.out = out.check(self, "out")?;
        let os = strides(out);
        [p.out_stride_b, p.out_stride_h, p.out_stride_l] = [os[0], os[1], os[2]];
        p.lse = lse.check(self, "lse")?;
        let ls = strides(lse);
        [p.lse_stride_b, p.lse_stride_h, p.lse_stride_l] = [ls[0], ls[1], ls[2]];
        if let (Some(m), Some(plan)) = (mask, problem.mask) {
            let size = match plan.kind {
                MaskKind::Bool => 1,
                MaskKind::Additive(dt) => dt.size_bytes(),
            };
            let desc = m.desc();
            let mut last = 0usize;
            for (&extent, &stride) in desc.shape.iter().zip(&desc.strides) {
                if stride < 0 {
                    return Err(CudaError::layout(
                        "attn_mask",
                        "non-negative strides",
                        format!("{:?}", desc.strides),
                    ));
                }
                last += extent.saturating_sub(1) * stride as usize;
            }
            let numel: usize = desc.shape.iter().product();
            if numel > 0 && (last + 1) * size > m.buffer.len() {
                return Err(CudaError::layout(
                    "attn_mask",
                    format!("a view inside its buffer of {} bytes", m.buffer.len()),
                    format!("shape {:?} strides {:?}", desc.shape, desc.strides),
                ));
            }
            p.mask = m.address(self);
            if p.mask % size as u64 != 0 {
                return Err(CudaError::Misaligned {
                    arg: "attn_mask",
                    align: size,
                    address: p.mask,
                });
            }
        }
        p.vec_ok = self.vec_ok(problem.dtype, &[(q, p.q), (k, p.k), (v, p.v)]) as i32;
        Ok(p)
    }

    fn launch_fused(&self, problem: &Problem, params: &mut SdpaParams) -> Result<()> {
        let (spec, rows, threads, shared) = fused_kernel(problem, self.arch());
        let symbol = spec.symbols().remove(0);
        let function = self.function(&spec, &symbol)?;
        let blocks_x = problem.len_q.div_ceil(rows as usize);
        fits_i32("query", "query blocks", blocks_x)?;
        let config = LaunchConfig {
            grid_dim: (
                blocks_x as u32,
                problem.heads_q as u32,
                problem.batch as u32,
            ),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: shared,
        };
        let mut builder = self.stream().launch_builder(&function);
        builder.arg(&*params);
        // SAFETY: `params` was checked against the problem before this call: every
        // address is a live allocation of this context, aligned for its dtype, and every
        // element the kernel reads (strides times extents, mask through its broadcast
        // strides, cu_seqlens within the rows checked) or writes (out, lse) lies inside
        // it; the grid covers B, Hq and L exactly as the kernel expects.
        unsafe { builder.launch(config) }?;
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn run_math(
        &self,
        problem: &Problem,
        q: &DeviceTensor,
        k: &DeviceTensor,
        v: &DeviceTensor,
        params: &mut SdpaParams,
    ) -> Result<()> {
        let (b, hq, l, s, e, ev) = (
            problem.batch,
            problem.heads_q,
            problem.len_q,
            problem.len_kv,
            problem.head_dim,
            problem.head_dim_v,
        );
        if b * hq * l == 0 {
            return Ok(());
        }
        let dtype = problem.dtype;
        let elem = dtype.size_bytes();
        let acc = if dtype == DType::F64 { 8 } else { 4 };
        let spec = KernelSpec::Math { dtype };
        let symbols = spec.symbols();
        let gather = self.function(&spec, &symbols[0])?;
        let softmax = self.function(&spec, &symbols[1])?;
        let batch = b * hq;
        fits_i32("query", "B * Hq", batch)?;

        // Operands cuBLAS can read in place: contiguous, and (k, v) one kv head per query head.
        let mut scratch: Vec<std::sync::Arc<Buffer>> = Vec::new();
        let mut operand =
            |which: i32, t: &DeviceTensor, address: u64, rows: usize, cols: usize| -> Result<u64> {
                let direct = t.layout() == Layout::contiguous(t.shape())
                    && (which == 0 || problem.group_size() == 1);
                if direct {
                    return Ok(address);
                }
                let bytes = batch * rows * cols * elem;
                let buffer = Buffer::alloc(self, bytes, "a gathered math operand")?;
                let dst = buffer.address(self);
                scratch.push(buffer);
                let total = bytes / elem;
                if total > 0 {
                    let config = LaunchConfig {
                        grid_dim: (total.div_ceil(256).min(1 << 16) as u32, 1, 1),
                        block_dim: (256, 1, 1),
                        shared_mem_bytes: 0,
                    };
                    let mut builder = self.stream().launch_builder(&gather);
                    builder.arg(&*params).arg(&which).arg(&dst);
                    // SAFETY: `dst` holds B*Hq*rows*cols elements, exactly what the kernel
                    // writes; the source is read through strides checked against its buffer.
                    unsafe { builder.launch(config) }?;
                }
                Ok(dst)
            };
        let q_ptr = operand(0, q, params.q, l, e)?;
        let k_ptr = operand(1, k, params.k, s, e)?;
        let v_ptr = operand(2, v, params.v, s, ev)?;

        let scores_bytes = batch * l * s * acc;
        let scores = Buffer::alloc(self, scores_bytes, "the math backend's scores")?;
        let scores_ptr = scores.address(self);
        let blas = self.blas()?;
        let handle = *blas.handle();
        let (t_elem, t_acc, compute) = match dtype {
            DType::F64 => (
                blas::cudaDataType::CUDA_R_64F,
                blas::cudaDataType::CUDA_R_64F,
                blas::cublasComputeType_t::CUBLAS_COMPUTE_64F,
            ),
            DType::F32 => (
                blas::cudaDataType::CUDA_R_32F,
                blas::cudaDataType::CUDA_R_32F,
                blas::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            ),
            DType::F16 => (
                blas::cudaDataType::CUDA_R_16F,
                blas::cudaDataType::CUDA_R_32F,
                blas::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            ),
            DType::BF16 => (
                blas::cudaDataType::CUDA_R_16BF,
                blas::cudaDataType::CUDA_R_32F,
                blas::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            ),
        };
        let (one64, zero64, one32, zero32) = (1f64, 0f64, 1f32, 0f32);
        let (one, zero): (*const std::ffi::c_void, *const std::ffi::c_void) = if dtype == DType::F64
        {
            (&one64 as *const f64 as _, &zero64 as *const f64 as _)
        } else {
            (&one32 as *const f32 as _, &zero32 as *const f32 as _)
        };
        for (what, value) in [
            ("key length", s),
            ("query length", l),
            ("head dim", e.max(ev)),
        ] {
            fits_i32("query", what, value)?;
        }
        if e == 0 || s == 0 {
            // An empty dot product is 0 (and with no keys there is nothing to read).
            // SAFETY: the scores buffer holds exactly `scores_bytes` bytes.
            unsafe {
                cudarc::driver::result::memset_d8_async(
                    scores_ptr,
                    0,
                    scores_bytes,
                    self.stream().cu_stream(),
                )
            }?;
        } else {
            // Column-major view: scores^T [S x L] = K [S x E] * Q^T [E x L], per (b, h).
            // SAFETY: every pointer is a live allocation of at least batch * stride
            // elements of its type (checked or allocated above); alpha/beta are host
            // values of the compute type; the handle runs on this context's stream.
            unsafe {
                cudarc::cublas::result::gemm_strided_batched_ex(
                    handle,
                    blas::cublasOperation_t::CUBLAS_OP_T,
                    blas::cublasOperation_t::CUBLAS_OP_N,
                    s as i32,
                    l as i32,
                    e as i32,
                    one,
                    k_ptr as *const _,
                    t_elem,
                    e as i32,
                    (s * e) as i64,
                    q_ptr as *const _,
                    t_elem,
                    e as i32,
                    (l * e) as i64,
                    zero,
                    scores_ptr as *mut _,
                    t_acc,
                    s as i32,
                    (l * s) as i64,
                    batch as i32,
                    compute,
                    blas::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
                )
            }?;
        }
        let config = LaunchConfig {
            grid_dim: (l as u32, hq as u32, b as u32),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut builder = self.stream().launch_builder(&softmax);
        builder.arg(&*params).arg(&scores_ptr);
        // SAFETY: one block per (i, h, b) row of the [B, Hq, L, S] scores buffer allocated
        // above; probabilities overwrite their own row; lse and mask were checked.
        unsafe { builder.launch(config) }?;

        let ratio = acc / elem;
        if s == 0 || ev == 0 {
            if ev > 0 {
                // SAFETY: `out` is contiguous [B, Hq, L, Ev] (checked by `run`).
                unsafe {
                    cudarc::driver::result::memset_d8_async(
                        params.out,
                        0,
                        batch * l * ev * elem,
                        self.stream().cu_stream(),
                    )
                }?;
            }
        } else {
            // out^T [Ev x L] = V^T [Ev x S] * P^T [S x L]; P rows have the scores' pitch.
            // SAFETY: as for the first product; `out` is contiguous [B, Hq, L, Ev].
            unsafe {
                cudarc::cublas::result::gemm_strided_batched_ex(
                    handle,
                    blas::cublasOperation_t::CUBLAS_OP_N,
                    blas::cublasOperation_t::CUBLAS_OP_N,
                    ev as i32,
                    l as i32,
                    s as i32,
                    one,
                    v_ptr as *const _,
                    t_elem,
                    ev as i32,
                    (s * ev) as i64,
                    scores_ptr as *const _,
                    t_elem,
                    (s * ratio) as i32,
                    (l * s * ratio) as i64,
                    zero,
                    params.out as *mut _,
                    t_elem,
                    ev as i32,
                    (l * ev) as i64,
                    batch as i32,
                    compute,
                    blas::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
                )
            }?;
        }
        // Scratch buffers are freed stream-ordered after the products that read them.
        drop(scratch);
        drop(scores);
        Ok(())
    }
}
