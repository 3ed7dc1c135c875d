//! The CUDA forward: flash and efficient on the fused kernels, math on cuBLAS
//! ([`crate::math`]), dense or variable-length, dispatched through `sdpa_core::select`.

use crate::context::GpuContext;
use crate::error::{CudaError, Result};
use crate::launch;
use crate::params::{FwdParams, Operands, Varlen};
use crate::spec::{Entry, KernelSpec, Kind};
use crate::tensor::{lse_to_3d, DeviceElement, DeviceMask, DeviceSlopes, DeviceTensor, HostMask};
use ndarray::{Array3, Array4, ArrayView4, ArrayViewD};
use sdpa_core::{
    check_support, select, Backend, BackendSet, DType, Device, Layout, Problem, SdpaError,
    SdpaOptions, TensorDesc,
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

/// The fused kernel a problem without ALiBi runs on ([`fused_spec_with`]).
pub fn fused_spec(gpu: &GpuContext, problem: &Problem) -> Result<KernelSpec> {
    fused_spec_with(gpu, problem, false)
}

/// The fused kernel a problem (with ALiBi slopes when `alibi`) runs on for a device of
/// compute capability `arch` under this context's configuration: the Hopper kernel for
/// f16/bf16 without mask or dropout where it has the head dim (window, softcap and ALiBi
/// are run-time switches there), the scalar kernel for f32, the mma.sync kernel
/// otherwise. Masks, dropout, softcap and ALiBi take the scalar and mma.sync variant that
/// has them compiled in; the window needs none.
pub fn fused_spec_with(gpu: &GpuContext, problem: &Problem, alibi: bool) -> Result<KernelSpec> {
    let hopper_lacks = problem.dropout.is_active() || problem.mask.is_some();
    let extras = hopper_lacks || problem.softcap.is_some() || alibi;
    let widest = problem.head_dim.max(problem.head_dim_v);
    if !hopper_lacks && gpu.config().wgmma() {
        if let Some(spec) = KernelSpec::fitting(Kind::FwdWgmma, problem.dtype, widest, false) {
            if spec.runs_on(gpu.arch()) {
                return Ok(spec);
            }
        }
    }
    let kind = if problem.dtype == DType::F32 {
        Kind::FwdSimt
    } else {
        Kind::FwdTc
    };
    KernelSpec::fitting(kind, problem.dtype, widest, extras).ok_or_else(|| {
        CudaError::bad_layout(
            "query",
            "a dtype and head dim a fused kernel takes",
            problem.summary(),
        )
    })
}

fn check_output(
    arg: &'static str,
    tensor: &DeviceTensor,
    want: [usize; 4],
    dtype: DType,
) -> Result<()> {
    if tensor.shape() != want || tensor.dtype() != dtype {
        return Err(CudaError::bad_layout(
            arg,
            format!("{dtype} {want:?}"),
            format!("{} {:?}", tensor.dtype(), tensor.shape()),
        ));
    }
    let layout = tensor.layout();
    if layout != Layout::contiguous(want) {
        return Err(CudaError::bad_layout(
            arg,
            format!("contiguous strides {:?}", Layout::contiguous(want).strides),
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
        self.sdpa_with_alibi(q, k, v, mask, None, options, backends)
    }

    /// [`GpuContext::sdpa`] with ALiBi slopes (DESIGN.md "Inference": `-slope |i + S - L
    /// - j|` added to the scores after the softcap), on every backend.
    ///
    /// # Errors
    /// As [`GpuContext::sdpa`], and slopes uploaded for another B or Hq.
    #[allow(clippy::too_many_arguments)]
    pub fn sdpa_with_alibi(
        &self,
        q: &DeviceTensor,
        k: &DeviceTensor,
        v: &DeviceTensor,
        mask: Option<&DeviceMask>,
        alibi: Option<&DeviceSlopes>,
        options: &SdpaOptions,
        backends: BackendSet,
    ) -> Result<Attention> {
        let problem = self.problem(q, k, v, mask, options)?;
        let backend = select(backends, &problem, Device::Cuda)?;
        let out = DeviceTensor::alloc(self, problem.dtype, problem.out_shape())?;
        let [b, h, l] = problem.lse_shape();
        let lse = DeviceTensor::alloc(self, DType::F32, [b, h, l, 1])?;
        self.run(backend, &problem, q, k, v, mask, alibi, &out, &lse)?;
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
        self.sdpa_host_with_alibi(q, k, v, mask, None, options, backends)
    }

    /// Uploads, runs [`GpuContext::sdpa_with_alibi`] and downloads; `alibi_slopes` are
    /// `[Hq]` or `[B, Hq]`, checked before anything is uploaded.
    #[allow(clippy::too_many_arguments)]
    pub fn sdpa_host_with_alibi<T: DeviceElement>(
        &self,
        q: ArrayView4<'_, T>,
        k: ArrayView4<'_, T>,
        v: ArrayView4<'_, T>,
        mask: Option<&HostMask<'_, T>>,
        alibi_slopes: Option<ArrayViewD<'_, f32>>,
        options: &SdpaOptions,
        backends: BackendSet,
    ) -> Result<HostOutput<T>> {
        // The slopes first: their upload checks them before anything else is uploaded.
        let [b, hq] = [q.shape()[0], q.shape()[1]];
        let slopes = alibi_slopes
            .map(|s| DeviceSlopes::upload(self, s, b, hq))
            .transpose()?;
        let dq = DeviceTensor::upload(self, q)?;
        let dk = DeviceTensor::upload(self, k)?;
        let dv = DeviceTensor::upload(self, v)?;
        let dmask = mask.map(|m| m.upload(self)).transpose()?;
        let result = self.sdpa_with_alibi(
            &dq,
            &dk,
            &dv,
            dmask.as_ref(),
            slopes.as_ref(),
            options,
            backends,
        )?;
        Ok(HostOutput {
            out: result.out.download(self)?,
            lse: lse_to_3d(result.lse.download(self)?),
            backend: result.backend,
        })
    }

    /// Runs `backend` on a validated `problem` into caller-owned `out` (contiguous
    /// `[B, Hq, L, Ev]`) and `lse` (contiguous f32 `[B, Hq, L, 1]`), with ALiBi `alibi` when
    /// given, without waiting.
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
        alibi: Option<&DeviceSlopes>,
        out: &DeviceTensor,
        lse: &DeviceTensor,
    ) -> Result<()> {
        if let Err(reason) = check_support(backend, problem, Device::Cuda) {
            return Err(SdpaError::NoBackend(vec![(backend, reason)]).into());
        }
        let again = self.problem(q, k, v, mask, &problem.options())?;
        if again != *problem {
            return Err(CudaError::bad_layout(
                "query",
                format!("the tensors of the problem {}", problem.summary()),
                again.summary(),
            ));
        }
        let [b, h, l, ev] = problem.out_shape();
        check_output("out", out, [b, h, l, ev], problem.dtype)?;
        check_output("lse", lse, [b, h, l, 1], DType::F32)?;
        let ops = Operands {
            q,
            k,
            v,
            mask,
            out,
            lse,
            seqlens: None,
            alibi,
        };
        let params = FwdParams::build(self, problem, &ops)?;
        if self.poison_outputs() {
            out.poison(self)?;
            lse.poison(self)?;
        }
        match backend {
            Backend::Math => self.run_math(problem, &ops, &params),
            _ => self.launch_fused(problem, &params),
        }
    }

    /// Variable-length SDPA on packed sequences (the varlen mode of the fused kernels):
    /// q `[total_q, Hq, E]`, k `[total_k, Hkv, E]`, v `[total_k, Hkv, Ev]` seen as
    /// `[1, H, total, E]` views (strides `[0, E_stride_h, row_stride, 1]`). Sequence `b`
    /// is rows `cu_seqlens[b]..cu_seqlens[b+1]`; causal alignment is per sequence;
    /// dropout indexes the padded `[B, Hq, max_q, max_k]` space, so the result equals the
    /// padded dense call with a key-padding mask. No padding is computed or stored.
    /// Dispatch is `select`'s, as for dense calls (math takes no `cu_seqlens`).
    pub fn sdpa_varlen(
        &self,
        q: &DeviceTensor,
        k: &DeviceTensor,
        v: &DeviceTensor,
        varlen: Varlen<'_>,
        options: &SdpaOptions,
        backends: BackendSet,
    ) -> Result<Attention> {
        let problem = self.varlen_problem(q, k, v, varlen, options)?;
        let cq = varlen.cu_seqlens_q;
        let backend = select(backends, &problem, Device::Cuda)?;
        let (hq, total_q, ev) = (problem.heads_q, cq.total(), problem.head_dim_v);
        let rows = total_q.checked_mul(hq).ok_or_else(|| {
            CudaError::bad_layout("cu_seqlens_q", "a packed output that fits memory", total_q)
        })?;
        let storage = DeviceTensor::alloc(self, problem.dtype, [1, 1, rows, ev])?;
        let out = storage.view(
            [1, hq, total_q, ev],
            [(rows * ev) as isize, ev as isize, (hq * ev) as isize, 1],
            0,
        )?;
        let lse = DeviceTensor::alloc(self, DType::F32, [1, hq, total_q, 1])?;
        let ops = Operands {
            q,
            k,
            v,
            mask: None,
            out: &out,
            lse: &lse,
            seqlens: Some(varlen),
            alibi: None,
        };
        let params = FwdParams::build(self, &problem, &ops)?;
        if self.poison_outputs() {
            out.poison(self)?;
            lse.poison(self)?;
        }
        self.launch_fused(&problem, &params)?;
        Ok(Attention { out, lse, backend })
    }

    /// The problem of a varlen call as the padded dense call sees it (B sequences of the
    /// longest lengths), after the packed operands' checks.
    pub(crate) fn varlen_problem(
        &self,
        q: &DeviceTensor,
        k: &DeviceTensor,
        v: &DeviceTensor,
        varlen: Varlen<'_>,
        options: &SdpaOptions,
    ) -> Result<Problem> {
        let (cq, ck) = (varlen.cu_seqlens_q, varlen.cu_seqlens_k);
        if cq.batch() != ck.batch() {
            return Err(CudaError::bad_layout(
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
                return Err(CudaError::bad_layout(
                    arg,
                    format!("a packed [1, H, {total}, dim] view (total rows from cu_seqlens)"),
                    format!("{s:?}"),
                ));
            }
            launch::check_index(arg, "packed rows", total)?;
        }
        // The problem as the padded dense call sees it: B sequences of the longest length.
        let padded = |t: &DeviceTensor, len: usize| {
            let s = t.shape();
            TensorDesc::contiguous(t.dtype(), [cq.batch(), s[1], len, s[3]])
        };
        Ok(Problem::new(
            &padded(q, cq.max_len()),
            &padded(k, ck.max_len()),
            &padded(v, ck.max_len()),
            None,
            options,
        )?
        .into_varlen(q.layout(), k.layout(), v.layout()))
    }

    fn launch_fused(&self, problem: &Problem, params: &FwdParams) -> Result<()> {
        let spec = fused_spec_with(self, problem, params.alibi != 0)?;
        let geometry = spec
            .geometry(self.config())
            .expect("fused kernels have a geometry");
        let kernel = self.kernel(&spec, Entry::Forward)?;
        let config = launch::grid(
            problem.len_q.div_ceil(geometry.block_rows as usize),
            problem.heads_q,
            problem.batch,
            geometry.threads,
            kernel.shared_bytes,
        )?;
        // SAFETY: `params` came from `FwdParams::build` for this problem: every address
        // is a live allocation of this context, aligned for its dtype, and every element
        // the kernel reads (strides times extents, mask through its broadcast strides,
        // cu_seqlens within the rows checked) or writes (out, lse) lies inside it; the
        // grid covers B, Hq and L exactly as the kernel expects, in sizes it can index.
        unsafe { launch::launch_params(self.stream(), &kernel.function, config, params) }
    }
}
