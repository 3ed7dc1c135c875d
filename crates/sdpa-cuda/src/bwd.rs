//! The CUDA backward, math backend: cuBLAS products around the elementwise kernels
//! of `kernels/bwd/math_bwd.cu`, every dtype (DESIGN.md "Backward").
//!
//! # Algorithm and buffers
//! `acc` is f64 for f64 and f32 otherwise; `G = Hq / Hkv`, `M = G * L`. Every product
//! runs per `(b, kv head)` (batch `B * Hkv`) over the `M` query rows of the group's `G`
//! query heads, which are contiguous in a `[B, Hq, L, *]` buffer: so `dk` and `dv` are
//! summed over the group by accumulating products (beta = 1, step 4), with no
//! per-query-head scratch and no reduction kernel, and k, v are never expanded.
//!
//! 1. `convert`: q `[B, Hq, L, E]`, k `[B, Hkv, S, E]`, v `[B, Hkv, S, Ev]`, dout
//!    `[B, Hq, L, Ev]` into contiguous acc copies (any input strides). cuBLAS takes no
//!    16-bit A with an f32 B, and dS and W must stay in f32, so every product runs on
//!    f32 copies: the widening is exact, so this equals an f32-accumulating mixed product.
//! 2. cuBLAS: `scores = q k^T` and `dw = dout v^T`, acc `[B, Hq, L, S]` each.
//! 3. `grad`, one warp per query row: `P = exp(scale * qk (+ mask) - lse)` (0 where masked
//!    or the row's lse is -inf), Z replayed from Philox at the flat index,
//!    `dP = dw Z/(1-p)`, `D = rowsum(P dP)` (the reference's D: the exact equal of
//!    `rowsum(dout * out)` without the rounding of a 16-bit `out`, which is not read),
//!    then `dS = P (dP - D)` over `scores` and `W = P Z/(1-p)` over `dw`; an additive
//!    mask's `dS` is added (atomics) into an acc accumulator in the mask's own shape.
//! 4. cuBLAS: `dv = W^T dout`, `dk = dS^T q`, `dq = dS k`, acc scratch of the outputs'
//!    sizes; dv and dk as one product per query head of the group (its L rows), added
//!    in head order (beta = 1), as PyTorch sums them: one product over the group's
//!    G * L rows would round like a sum of G * L terms.
//! 5. `round`: `dq = scale * dq_acc`, `dk = scale * dk_acc`, `dv`, `dmask`, each rounded
//!    once to its dtype.
//!
//! Scratch: `acc * (B*Hq*L*(E + Ev + 1 + 2S + E) + B*Hkv*S*(2E + 2Ev)) + acc * |mask|`
//! bytes. dq, dk, dv are deterministic run to run (cuBLAS's default algorithms); dmask is
//! not bitwise (atomic order), within f32 rounding of the sum.

use crate::blas::{blas_types, Gemm, Operand};
use crate::context::GpuContext;
use crate::error::{CudaError, Result};
use crate::launch;
use crate::params::{BwdOperands, BwdParams, Operands, Varlen};
use crate::spec::{Entry, KernelSpec, Kind};
use crate::tensor::{Buffer, DeviceElement, DeviceMask, DeviceSlopes, DeviceTensor, HostMask};
use cudarc::driver::{LaunchConfig, PushKernelArg};
use ndarray::{Array4, ArrayD, ArrayView3, ArrayView4, ArrayViewD, IxDyn};
use sdpa_core::{
    check_support, Backend, BackendSet, DType, Device, MaskDesc, MaskKind, Problem, SdpaError,
    SdpaOptions,
};
use std::sync::Arc;

/// The gradients of a CUDA backward, contiguous, in the inputs' dtype.
#[derive(Debug, Clone)]
pub struct DeviceGradients {
    /// `[B, Hq, L, E]`.
    pub dq: DeviceTensor,
    /// `[B, Hkv, S, E]` (summed over each group's query heads).
    pub dk: DeviceTensor,
    /// `[B, Hkv, S, Ev]`.
    pub dv: DeviceTensor,
    /// For an additive mask: its gradient in the mask's own shape (`dmask_shape`), stored
    /// as that shape left-padded with 1s to rank 4; `None` for no mask or a bool mask.
    pub dmask: Option<DeviceTensor>,
    /// The mask's own shape (rank 0 to 4); empty when `dmask` is `None`.
    pub dmask_shape: Vec<usize>,
    /// The backend whose backward ran.
    pub backend: Backend,
}

/// [`DeviceGradients`] on the host (`sdpa_ref::bwd::Gradients`' fields).
#[derive(Debug, Clone)]
pub struct HostGradients<T> {
    /// `[B, Hq, L, E]`.
    pub dq: Array4<T>,
    /// `[B, Hkv, S, E]`.
    pub dk: Array4<T>,
    /// `[B, Hkv, S, Ev]`.
    pub dv: Array4<T>,
    /// In the additive mask's own shape.
    pub dmask: Option<ArrayD<T>>,
    /// The backend whose backward ran.
    pub backend: Backend,
}

/// Where `dS` lands for an additive mask of `shape` over `[B, Hq, L, S]` = `full`: the
/// accumulator's element count, its 4-d shape (left-padded with 1s) and its broadcast
/// strides (contiguous in the mask's own shape, 0 on every axis the mask broadcasts
/// along, so those axes are summed).
///
/// # Errors
/// A shape that does not broadcast to `full`.
pub(crate) fn dmask_plan(
    shape: &[usize],
    full: [usize; 4],
) -> Result<(usize, [usize; 4], [isize; 4])> {
    let desc = MaskDesc::contiguous(MaskKind::Additive(DType::F32), shape);
    let strides = desc.broadcast_strides(full)?;
    let mut padded = [1usize; 4];
    padded[4 - shape.len()..].copy_from_slice(shape);
    let count = shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| CudaError::bad_layout("attn_mask", "a size that fits", shape.len()))?;
    Ok((count, padded, strides))
}

fn product(arg: &'static str, dims: &[usize]) -> Result<usize> {
    dims.iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| {
            CudaError::bad_layout(arg, "a size that fits in memory", format!("{dims:?}"))
        })
}

fn check_shape(
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
    Ok(())
}

/// An acc-typed scratch buffer of `elements`, zeroed (a product with an empty inner
/// dimension leaves its output to us, and zero is its value).
fn zeroed(gpu: &GpuContext, elements: usize, acc_bytes: usize) -> Result<(Arc<Buffer>, u64)> {
    let bytes = product("query", &[elements, acc_bytes])?;
    let buffer = Buffer::alloc(gpu, bytes, "the math backward's scratch")?;
    let ptr = buffer.address(gpu);
    if bytes > 0 {
        // SAFETY: the buffer was just allocated with `bytes` bytes (at least 1).
        unsafe {
            cudarc::driver::result::memset_d8_async(ptr, 0, bytes, gpu.stream().cu_stream())
        }?;
    }
    Ok((buffer, ptr))
}

/// A row-major `[rows, cols]` acc matrix per batch entry, `stride` elements apart.
fn matrix(
    ptr: u64,
    dtype: cudarc::cublas::sys::cudaDataType,
    cols: usize,
    stride: usize,
) -> Operand {
    Operand {
        ptr,
        dtype,
        ld: cols.max(1),
        stride,
    }
}

/// Bytes of device scratch the math backward takes for `problem` (module docs:
/// `acc * (B*Hq*L*(2E + Ev + 1 + 2S) + B*Hkv*S*(2E + 2Ev) + |mask|)` plus the outputs),
/// `None` past `usize`.
pub fn math_backward_scratch(problem: &Problem) -> Option<usize> {
    let acc = if problem.dtype == DType::F64 { 8 } else { 4 };
    let (b, hq, hkv, l, s, e, ev) = (
        problem.batch,
        problem.heads_q,
        problem.heads_kv,
        problem.len_q,
        problem.len_kv,
        problem.head_dim,
        problem.head_dim_v,
    );
    let per_query = (2 * e)
        .checked_add(ev)?
        .checked_add(1)?
        .checked_add(s.checked_mul(2)?)?;
    let queries = b.checked_mul(hq)?.checked_mul(l)?.checked_mul(per_query)?;
    let keys = b
        .checked_mul(hkv)?
        .checked_mul(s)?
        .checked_mul(2 * e + 2 * ev)?;
    let mask = problem.mask.map_or(Some(0), |_| {
        b.checked_mul(hq)?.checked_mul(l)?.checked_mul(s)
    })?;
    queries
        .checked_add(keys)?
        .checked_add(mask)?
        .checked_mul(acc)
}

/// Whether the tensor-core backward (`kernels/bwd/attn_bwd_tc.cu`) covers `problem`:
/// f16/bf16 with the larger of E and Ev at most 128.
pub fn tc_backward_covers(problem: &Problem) -> bool {
    problem.dtype.is_half() && problem.head_dim.max(problem.head_dim_v) <= TC_BACKWARD_MAX_DIM
}

/// The widest head dim of the tensor-core backward (its dK and dV accumulators live in
/// registers: D/2 each a thread).
pub const TC_BACKWARD_MAX_DIM: usize = 128;

/// The backend whose backward runs `problem` from `backends`, first of:
/// 1. flash, where the tensor-core backward covers it (`tc_backward_covers`) and the
///    forward's flash rules hold (no mask, `E == Ev`);
/// 2. efficient on the same tensor-core kernel (any mask, dropout, `E != Ev`);
/// 3. math (cuBLAS) where its scratch ([`math_backward_scratch`], `L x S` buffers) fits
///    in 90% of `free` device bytes (when known): 5-9x the fused scalar kernel;
/// 4. efficient's fused scalar kernel (f32, head dims past 128, or math not fitting),
///    which keeps O(L) extra memory like the tensor-core one; then math.
///
/// Varlen problems never take math (it takes no `cu_seqlens`).
///
/// # Errors
/// `SdpaError::NoBackend` with each candidate's reason when none of the set can run it.
pub fn select_backward(
    problem: &Problem,
    backends: BackendSet,
    free: Option<usize>,
) -> Result<Backend> {
    let mut reasons = Vec::new();
    let math_fits = match (free, math_backward_scratch(problem)) {
        (_, None) => false,
        (None, Some(_)) => true,
        (Some(free), Some(need)) => need <= free / 10 * 9,
    };
    let tc = tc_backward_covers(problem);
    let order = if tc || !math_fits {
        [Backend::Flash, Backend::Efficient, Backend::Math]
    } else {
        [Backend::Flash, Backend::Math, Backend::Efficient]
    };
    for backend in order {
        if !backends.contains(backend) {
            reasons.push((backend, "not in the enabled backends".to_string()));
            continue;
        }
        let support = check_support(backend, problem, Device::Cuda).and_then(|()| {
            if backend == Backend::Flash && !tc {
                Err(format!(
                    "has a backward for f16/bf16 up to head dim {TC_BACKWARD_MAX_DIM}, got {} at {}",
                    problem.dtype,
                    problem.head_dim.max(problem.head_dim_v)
                ))
            } else {
                Ok(())
            }
        });
        match support {
            Ok(()) => return Ok(backend),
            Err(reason) => reasons.push((backend, reason)),
        }
    }
    Err(SdpaError::NoBackend(reasons).into())
}

/// The dmask accumulator of a backward with an additive mask: `count` zeroed values of
/// `acc_bytes` each, its address and broadcast strides written into `params`; `None`
/// without one.
fn dmask_accumulator(
    gpu: &GpuContext,
    params: &mut BwdParams,
    dmask: Option<(&DeviceTensor, usize, [isize; 4])>,
    acc_bytes: usize,
) -> Result<Option<(Arc<Buffer>, u64)>> {
    let Some((_, count, strides)) = dmask else {
        return Ok(None);
    };
    let (buffer, ptr) = zeroed(gpu, count, acc_bytes)?;
    params.dmask = ptr;
    [
        params.dmask_stride_b,
        params.dmask_stride_h,
        params.dmask_stride_l,
        params.dmask_stride_s,
    ] = strides.map(|x| x as i64);
    Ok(Some((buffer, ptr)))
}

/// The deterministic mode's dq slices: enough CTAs along the keys for about two waves
/// of the `sm_count` SMs over `heads` (batch x kv heads) CTAs a key position, the key
/// blocks spread evenly over them, at most `key_blocks` and at most 1 GiB of f32
/// slices (at least one).
fn dq_splits(key_blocks: usize, heads: usize, sm_count: usize, dq_elems: usize) -> usize {
    let wanted = (2 * sm_count)
        .div_ceil(heads.max(1))
        .clamp(1, key_blocks.max(1));
    let per_cta = key_blocks.max(1).div_ceil(wanted);
    let even = key_blocks.max(1).div_ceil(per_cta);
    let budget = ((1usize << 30) / 4 / dq_elems.max(1)).max(1);
    even.min(budget)
}

/// `dst[n] = to_elem(factor * (src[n] + src[total + n] + ...))` over `splits` slices,
/// summed in slice order, for `n < total` (the math backward's round kernel): a
/// gradient's one rounding to `dtype`. Nothing for `total == 0`.
///
/// # Safety
/// `src` holds `splits * total` accumulator values (f64 for f64, else f32) and `dst`
/// `total` elements of `dtype`, both live allocations of `gpu`'s context.
pub unsafe fn round_into(
    gpu: &GpuContext,
    dtype: DType,
    (src, splits): (u64, usize),
    dst: u64,
    total: usize,
    factor: f64,
) -> Result<()> {
    if total == 0 {
        return Ok(());
    }
    let round = gpu.kernel(
        &KernelSpec::plain(Kind::MathBwd, dtype),
        Entry::MathBwdRound,
    )?;
    let (total64, splits64) = (total as u64, splits as u64);
    let mut builder = gpu.stream().launch_builder(&round.function);
    builder
        .arg(&src)
        .arg(&splits64)
        .arg(&dst)
        .arg(&total64)
        .arg(&factor);
    // SAFETY: the caller's contract above.
    unsafe { builder.launch(launch::elementwise(total)) }?;
    Ok(())
}

impl GpuContext {
    /// The backward of SDPA on the device (the math backend): `dq`, `dk`, `dv` from the
    /// forward's `out` and `lse` (f32 `[B, Hq, L, 1]`, as [`GpuContext::sdpa`] returns
    /// it) and the output gradient `dout` (`[B, Hq, L, Ev]`, the dtype of q), and `dmask`
    /// for an additive mask. `options` must be the forward's (the dropout seed and offset
    /// replay its keep bits). q, k, v take any strides; `out` and `dout` a unit last-dim
    /// stride; `lse` any strides.
    ///
    /// # Errors
    /// What the forward refuses; `out`, `dout` or `lse` of the wrong shape or dtype;
    /// `out`/`dout` with a last-dim stride other than 1; an operand outside its buffer.
    #[allow(clippy::too_many_arguments)]
    pub fn sdpa_backward(
        &self,
        q: &DeviceTensor,
        k: &DeviceTensor,
        v: &DeviceTensor,
        out: &DeviceTensor,
        lse: &DeviceTensor,
        dout: &DeviceTensor,
        mask: Option<&DeviceMask>,
        options: &SdpaOptions,
        backends: BackendSet,
    ) -> Result<DeviceGradients> {
        self.sdpa_backward_with_alibi(q, k, v, out, lse, dout, mask, None, options, backends)
    }

    /// [`GpuContext::sdpa_backward`] of a forward with ALiBi slopes (the slopes get no
    /// gradient: they are constants of the call).
    ///
    /// # Errors
    /// As [`GpuContext::sdpa_backward`], and slopes uploaded for another B or Hq.
    #[allow(clippy::too_many_arguments)]
    pub fn sdpa_backward_with_alibi(
        &self,
        q: &DeviceTensor,
        k: &DeviceTensor,
        v: &DeviceTensor,
        out: &DeviceTensor,
        lse: &DeviceTensor,
        dout: &DeviceTensor,
        mask: Option<&DeviceMask>,
        alibi: Option<&DeviceSlopes>,
        options: &SdpaOptions,
        backends: BackendSet,
    ) -> Result<DeviceGradients> {
        let problem = self.problem(q, k, v, mask, options)?;
        let backend = select_backward(&problem, backends, self.free_memory())?;
        let [b, hq, l, ev] = problem.out_shape();
        let (hkv, s, e) = (problem.heads_kv, problem.len_kv, problem.head_dim);
        check_shape("out", out, [b, hq, l, ev], problem.dtype)?;
        check_shape("dout", dout, [b, hq, l, ev], problem.dtype)?;
        check_shape("lse", lse, [b, hq, l, 1], DType::F32)?;
        let dq = DeviceTensor::alloc(self, problem.dtype, [b, hq, l, e])?;
        let dk = DeviceTensor::alloc(self, problem.dtype, [b, hkv, s, e])?;
        let dv = DeviceTensor::alloc(self, problem.dtype, [b, hkv, s, ev])?;
        let additive = mask.filter(|m| matches!(m.desc().kind, MaskKind::Additive(_)));
        let plan = additive
            .map(|m| dmask_plan(&m.desc().shape, [b, hq, l, s]))
            .transpose()?;
        let dmask = plan
            .map(|(_, padded, _)| DeviceTensor::alloc(self, problem.dtype, padded))
            .transpose()?;
        let ops = BwdOperands {
            fwd: Operands {
                q,
                k,
                v,
                mask,
                out,
                lse,
                seqlens: None,
                alibi,
            },
            dout,
            dq: &dq,
            dk: &dk,
            dv: &dv,
        };
        let mut params = BwdParams::build(self, &problem, &ops)?;
        if self.poison_outputs() {
            for t in [&dq, &dk, &dv].into_iter().chain(dmask.as_ref()) {
                t.poison(self)?;
            }
        }
        let dmask_target = match (&dmask, plan) {
            (Some(t), Some((count, _, strides))) => Some((t, count, strides)),
            _ => None,
        };
        match backend {
            Backend::Math => self.run_math_backward(&problem, &mut params, dmask_target)?,
            _ if tc_backward_covers(&problem) => {
                let dq_elems = product("query", &[b, hq, l, e])?;
                self.run_tc_backward(&problem, &mut params, dmask_target, dq_elems)?
            }
            _ => self.run_fused_backward(&problem, &mut params, dmask_target)?,
        }
        Ok(DeviceGradients {
            dq,
            dk,
            dv,
            dmask,
            dmask_shape: additive.map(|m| m.desc().shape).unwrap_or_default(),
            backend,
        })
    }

    /// The backward of [`GpuContext::sdpa_varlen`] (the efficient backend's fused
    /// backward in its varlen mode; math takes no `cu_seqlens`): q, k, v and `varlen` as
    /// the forward took them, its `out` `[1, Hq, total_q, Ev]` and `lse`
    /// `[1, Hq, total_q, 1]`, `dout` like `out` (unit last-dim stride). The gradients
    /// come packed like their inputs: `dq` `[1, Hq, total_q, E]`, `dk` `[1, Hkv, total_k,
    /// E]`, `dv` `[1, Hkv, total_k, Ev]` views of `[total, H, dim]` storage. Dropout
    /// replays the padded `[B, Hq, max_q, max_k]` index space of the forward.
    ///
    /// # Errors
    /// What [`GpuContext::sdpa_varlen`] refuses; `out`, `dout` or `lse` of another shape
    /// or dtype; a backend set without efficient.
    #[allow(clippy::too_many_arguments)]
    pub fn sdpa_varlen_backward(
        &self,
        q: &DeviceTensor,
        k: &DeviceTensor,
        v: &DeviceTensor,
        varlen: Varlen<'_>,
        out: &DeviceTensor,
        lse: &DeviceTensor,
        dout: &DeviceTensor,
        options: &SdpaOptions,
        backends: BackendSet,
    ) -> Result<DeviceGradients> {
        let problem = self.varlen_problem(q, k, v, varlen, options)?;
        let backend = select_backward(&problem, backends, self.free_memory())?;
        let (cq, ck) = (varlen.cu_seqlens_q, varlen.cu_seqlens_k);
        let (hq, hkv, e, ev) = (
            problem.heads_q,
            problem.heads_kv,
            problem.head_dim,
            problem.head_dim_v,
        );
        check_shape("out", out, [1, hq, cq.total(), ev], problem.dtype)?;
        check_shape("dout", dout, [1, hq, cq.total(), ev], problem.dtype)?;
        check_shape("lse", lse, [1, hq, cq.total(), 1], DType::F32)?;
        let packed =
            |arg: &'static str, heads: usize, total: usize, dim: usize| -> Result<DeviceTensor> {
                let rows = total.checked_mul(heads).ok_or_else(|| {
                    CudaError::bad_layout(arg, "a packed gradient that fits memory", total)
                })?;
                let storage = DeviceTensor::alloc(self, problem.dtype, [1, 1, rows, dim])?;
                storage.view(
                    [1, heads, total, dim],
                    [
                        (rows * dim) as isize,
                        dim as isize,
                        (heads * dim) as isize,
                        1,
                    ],
                    0,
                )
            };
        let dq = packed("cu_seqlens_q", hq, cq.total(), e)?;
        let dk = packed("cu_seqlens_k", hkv, ck.total(), e)?;
        let dv = packed("cu_seqlens_k", hkv, ck.total(), ev)?;
        let ops = BwdOperands {
            fwd: Operands {
                q,
                k,
                v,
                mask: None,
                out,
                lse,
                seqlens: Some(varlen),
                alibi: None,
            },
            dout,
            dq: &dq,
            dk: &dk,
            dv: &dv,
        };
        let mut params = BwdParams::build(self, &problem, &ops)?;
        if self.poison_outputs() {
            for t in [&dq, &dk, &dv] {
                t.poison(self)?;
            }
        }
        match backend {
            Backend::Flash | Backend::Efficient if tc_backward_covers(&problem) => {
                let dq_elems = product("cu_seqlens_q", &[cq.total(), hq, e])?;
                self.run_tc_backward(&problem, &mut params, None, dq_elems)?
            }
            Backend::Efficient => self.run_fused_backward(&problem, &mut params, None)?,
            other => {
                return Err(SdpaError::NoBackend(vec![(
                    other,
                    "has no variable-length backward".to_string(),
                )])
                .into())
            }
        }
        Ok(DeviceGradients {
            dq,
            dk,
            dv,
            dmask: None,
            dmask_shape: Vec::new(),
            backend,
        })
    }

    /// Uploads, runs [`GpuContext::sdpa_backward`] and downloads. `lse` is `[B, Hq, L]`.
    ///
    /// # Errors
    /// As [`GpuContext::sdpa_backward`].
    #[allow(clippy::too_many_arguments)]
    pub fn sdpa_backward_host<T: DeviceElement>(
        &self,
        q: ArrayView4<'_, T>,
        k: ArrayView4<'_, T>,
        v: ArrayView4<'_, T>,
        out: ArrayView4<'_, T>,
        lse: ArrayView3<'_, f32>,
        dout: ArrayView4<'_, T>,
        mask: Option<&HostMask<'_, T>>,
        options: &SdpaOptions,
        backends: BackendSet,
    ) -> Result<HostGradients<T>> {
        self.sdpa_backward_host_with_alibi(q, k, v, out, lse, dout, mask, None, options, backends)
    }

    /// [`GpuContext::sdpa_backward_host`] with ALiBi slopes `[Hq]` or `[B, Hq]`, checked
    /// before anything is uploaded.
    ///
    /// # Errors
    /// As [`GpuContext::sdpa_backward`], and bad `alibi_slopes`.
    #[allow(clippy::too_many_arguments)]
    pub fn sdpa_backward_host_with_alibi<T: DeviceElement>(
        &self,
        q: ArrayView4<'_, T>,
        k: ArrayView4<'_, T>,
        v: ArrayView4<'_, T>,
        out: ArrayView4<'_, T>,
        lse: ArrayView3<'_, f32>,
        dout: ArrayView4<'_, T>,
        mask: Option<&HostMask<'_, T>>,
        alibi_slopes: Option<ArrayViewD<'_, f32>>,
        options: &SdpaOptions,
        backends: BackendSet,
    ) -> Result<HostGradients<T>> {
        // The slopes first: their upload checks them before anything else is uploaded.
        let [b, hq] = [q.shape()[0], q.shape()[1]];
        let slopes = alibi_slopes
            .map(|s| DeviceSlopes::upload(self, s, b, hq))
            .transpose()?;
        let [lb, lh, ll] = [lse.shape()[0], lse.shape()[1], lse.shape()[2]];
        let lse4 = lse
            .to_owned()
            .into_shape_with_order((lb, lh, ll, 1))
            .map_err(|e| CudaError::bad_layout("lse", "a [B, Hq, L] array", e))?;
        let up = |a: ArrayView4<'_, T>| DeviceTensor::upload(self, a);
        let (dq_, dk_, dv_) = (up(q)?, up(k)?, up(v)?);
        let (out_, dout_) = (up(out)?, up(dout)?);
        let lse_ = DeviceTensor::upload(self, lse4.view())?;
        let mask_ = mask.map(|m| m.upload(self)).transpose()?;
        let g = self.sdpa_backward_with_alibi(
            &dq_,
            &dk_,
            &dv_,
            &out_,
            &lse_,
            &dout_,
            mask_.as_ref(),
            slopes.as_ref(),
            options,
            backends,
        )?;
        let dmask = match &g.dmask {
            Some(t) => Some(
                t.download::<T>(self)?
                    .into_shape_with_order(IxDyn(&g.dmask_shape))
                    .map_err(|e| CudaError::bad_layout("attn_mask", "its own shape", e))?,
            ),
            None => None,
        };
        Ok(HostGradients {
            dq: g.dq.download(self)?,
            dk: g.dk.download(self)?,
            dv: g.dv.download(self)?,
            dmask,
            backend: g.backend,
        })
    }

    /// Runs the pipeline of the module docs on checked parameters; `dmask` is the rounded
    /// output with the accumulator's element count and broadcast strides.
    fn run_math_backward(
        &self,
        problem: &Problem,
        params: &mut BwdParams,
        dmask: Option<(&DeviceTensor, usize, [isize; 4])>,
    ) -> Result<()> {
        let (b, hq, hkv, l, s, e, ev) = (
            problem.batch,
            problem.heads_q,
            problem.heads_kv,
            problem.len_q,
            problem.len_kv,
            problem.head_dim,
            problem.head_dim_v,
        );
        let dtype = problem.dtype;
        let types = blas_types(dtype);
        let (acc, acc_bytes) = (types.acc, types.acc_bytes);
        let spec = KernelSpec::plain(Kind::MathBwd, dtype);
        let convert = self.kernel(&spec, Entry::MathBwdConvert)?;
        let grad = self.kernel(&spec, Entry::MathBwdGrad)?;
        let stream = self.stream();

        // The product layout: batch (b, kv head), M = group * L query rows.
        let batch = b * hkv;
        let m = problem.group_size() * l;
        let q_elems = product("query", &[b, hq, l, e])?;
        let do_elems = product("dout", &[b, hq, l, ev])?;
        let k_elems = product("key", &[b, hkv, s, e])?;
        let v_elems = product("value", &[b, hkv, s, ev])?;
        let score_elems = product("query", &[b, hq, l, s])?;
        let rows = product("query", &[b, hq, l])?;

        let mut scratch = Vec::new();
        let mut copy = |which: i32, elements: usize| -> Result<u64> {
            let (buffer, dst) = zeroed(self, elements, acc_bytes)?;
            scratch.push(buffer);
            if elements > 0 {
                let mut builder = stream.launch_builder(&convert.function);
                builder.arg(&*params).arg(&which).arg(&dst);
                // SAFETY: `dst` holds `elements` acc values, exactly the [B, H, rows, cols]
                // the kernel writes for `which`; the source is read through the strides
                // `BwdParams::build` checked against its buffer.
                unsafe { builder.launch(launch::elementwise(elements)) }?;
            }
            Ok(dst)
        };
        let qa = copy(0, q_elems)?;
        let ka = copy(1, k_elems)?;
        let va = copy(2, v_elems)?;
        let da = copy(3, do_elems)?;

        let (d_buf, d_ptr) = zeroed(self, rows, acc_bytes)?;
        params.softmax_d = d_ptr;

        let (scores_buf, scores) = zeroed(self, score_elems, acc_bytes)?;
        let (dw_buf, dw) = zeroed(self, score_elems, acc_bytes)?;
        // Column-major views: scores^T [S x M] = K [S x E] * Q^T [E x M], per (b, kv head);
        // likewise dw^T = V * dout^T.
        for (x, y, out, inner) in [(ka, qa, scores, e), (va, da, dw, ev)] {
            let gemm = Gemm {
                trans_a: true,
                trans_b: false,
                m: s,
                n: m,
                k: inner,
                a: matrix(x, acc, inner, s * inner),
                b: matrix(y, acc, inner, m * inner),
                c: matrix(out, acc, s, m * s),
                batch,
                accumulate: false,
                compute: types.compute,
            };
            if inner > 0 {
                // SAFETY: the acc copies hold `batch` [S, inner] and [M, inner] matrices
                // (M = G*L rows of the group's contiguous query heads); `out` holds
                // `batch` [M, S] matrices.
                unsafe { gemm.run(self) }?;
            }
        }

        let dmask_acc = dmask_accumulator(self, params, dmask, acc_bytes)?;
        if score_elems > 0 {
            // One warp per query row, eight to a block, grid-stride past 2^16 blocks.
            let config = LaunchConfig {
                grid_dim: (rows.div_ceil(8).clamp(1, 1 << 16) as u32, 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            let mut builder = stream.launch_builder(&grad.function);
            builder.arg(&*params).arg(&scores).arg(&dw);
            // SAFETY: one warp per row of the two [B, Hq, L, S] acc buffers above (rows
            // of S elements); lse, mask and softmax_d ([B, Hq, L], `rows` values) read
            // or written inside their checked extents; the dmask accumulator is indexed
            // through broadcast strides of its own shape.
            unsafe { builder.launch(config) }?;
        }

        let (dq_buf, dq_acc) = zeroed(self, q_elems, acc_bytes)?;
        let (dk_buf, dk_acc) = zeroed(self, k_elems, acc_bytes)?;
        let (dv_buf, dv_acc) = zeroed(self, v_elems, acc_bytes)?;
        params.dq_accum = dq_acc;
        // dk and dv: one product per query head of the group (inner dimension L, its rows
        // at offset g * L of the group's M), the first with beta = 0 and the others
        // added (beta = 1), in head order. One product over all M = G * L rows rounds
        // like a sum of G * L terms (measured at 1.5-2.6x PyTorch's error in f32 at
        // G = 4, L = 192); PyTorch's per-head products and sum over the heads round like
        // L + G, and so do these. dq is per query head already (inner dimension S).
        let group = problem.group_size();
        let offset = |ptr: u64, g: usize, cols: usize| -> Result<u64> {
            let bytes = product("query", &[g, l, cols, acc_bytes])?;
            Ok(ptr + bytes as u64)
        };
        // C^T [rows x cols] (+)= A [rows x inner] * B, B an [M, S] matrix (dS or W) of
        // each batch entry, from `b` on.
        let gemm =
            |rows: usize, cols: usize, inner: usize, a: Operand, b: u64, c: u64, trans_b: bool| {
                Gemm {
                    trans_a: false,
                    trans_b,
                    m: rows,
                    n: cols,
                    k: inner,
                    a,
                    b: matrix(b, acc, s, m * s),
                    c: matrix(c, acc, rows, rows * cols),
                    batch,
                    accumulate: false,
                    compute: types.compute,
                }
            };
        let mut products = Vec::with_capacity(2 * group + 1);
        for g in 0..group {
            let later = g > 0;
            // dv^T [Ev x S] += dout_g^T [Ev x L] * W_g [L x S]
            let da_g = matrix(offset(da, g, ev)?, acc, ev, m * ev);
            products.push(Gemm {
                accumulate: later,
                ..gemm(ev, s, l, da_g, offset(dw, g, s)?, dv_acc, true)
            });
            // dk^T [E x S] += q_g^T [E x L] * dS_g [L x S]
            let qa_g = matrix(offset(qa, g, e)?, acc, e, m * e);
            products.push(Gemm {
                accumulate: later,
                ..gemm(e, s, l, qa_g, offset(scores, g, s)?, dk_acc, true)
            });
        }
        // dq^T [E x M] = k^T [E x S] * dS^T [S x M]
        let ka_all = matrix(ka, acc, e, s * e);
        products.push(gemm(e, m, s, ka_all, scores, dq_acc, false));
        for product in products {
            if product.k > 0 {
                // SAFETY: A is a `batch` of acc matrices of the sizes named above (a head's
                // L rows start g * L rows into its group's M, inside the batch entry), B
                // the [M, S] dS or W matrices (likewise offset), C a zeroed acc buffer of
                // `batch` [cols, rows] row-major matrices (the gradient's [B, Hkv, S, *]
                // or [B, Hq, L, E]).
                unsafe { product.run(self) }?;
            }
        }

        let scale = problem.scale;
        let mut rounds = vec![
            (dq_acc, params.dq, q_elems, scale),
            (dk_acc, params.dk, k_elems, scale),
            (dv_acc, params.dv, v_elems, 1.0),
        ];
        if let (Some((out, count, _)), Some((_, ptr))) = (dmask, &dmask_acc) {
            rounds.push((*ptr, out.checked_address(self, "dmask")?, count, 1.0));
        }
        for (src, dst, total, factor) in rounds {
            // SAFETY: `src` holds `total` acc values (scratch above) and `dst` is a
            // contiguous output of `total` elements of the dtype, allocated by the caller.
            unsafe { round_into(self, dtype, (src, 1), dst, total, factor) }?;
        }
        // Scratch is freed stream-ordered after the kernels that read it.
        drop((scratch, d_buf, scores_buf, dw_buf, dmask_acc));
        drop((dq_buf, dk_buf, dv_buf));
        Ok(())
    }
}

/// The launch of a kernel with one warp per query row, four to a block:
/// `(ceil(L / 4), Hq, B)` blocks of 128 threads.
/// The tensor-core backward module a problem runs on: the Hopper kernel
/// (`kernels/bwd/attn_bwd_wgmma.cu`) on sm_90 at head dims 33 to 128, masks and dropout
/// included (its `extras` variant), unless the context's configuration keeps mma.sync
/// (`SDPA_CUDA_WGMMA=0`); the mma.sync kernel otherwise.
pub fn tc_backward_spec(gpu: &GpuContext, problem: &Problem) -> Result<KernelSpec> {
    tc_backward_spec_with(gpu, problem, false)
}

/// [`tc_backward_spec`] of a problem with ALiBi slopes when `alibi`: softcap and ALiBi
/// take the `extras` variant too (the window runs in both).
pub fn tc_backward_spec_with(
    gpu: &GpuContext,
    problem: &Problem,
    alibi: bool,
) -> Result<KernelSpec> {
    let widest = problem.head_dim.max(problem.head_dim_v);
    let extras =
        problem.dropout.is_active() || problem.mask.is_some() || problem.softcap.is_some() || alibi;
    if widest > 32 && gpu.config().wgmma() {
        if let Some(spec) = KernelSpec::fitting(Kind::BwdWgmma, problem.dtype, widest, extras) {
            if spec.runs_on(gpu.arch()) {
                return Ok(spec);
            }
        }
    }
    KernelSpec::fitting(Kind::BwdTc, problem.dtype, widest, extras).ok_or_else(|| {
        SdpaError::NoBackend(vec![(
            Backend::Flash,
            format!(
                "has no tensor-core backward for {} at head dim {widest}",
                problem.dtype
            ),
        )])
        .into()
    })
}

fn query_row_warps(problem: &Problem) -> Result<LaunchConfig> {
    launch::grid(
        problem.len_q.div_ceil(4),
        problem.heads_q,
        problem.batch,
        128,
        0,
    )
}

impl GpuContext {
    /// Rounds an f32 dmask accumulator (`acc`, from [`dmask_accumulator`]) once into
    /// the output `dmask`; nothing without one.
    fn round_dmask(
        &self,
        dtype: DType,
        dmask: Option<(&DeviceTensor, usize, [isize; 4])>,
        acc: Option<&(Arc<Buffer>, u64)>,
    ) -> Result<()> {
        if let (Some((out, count, _)), Some((_, ptr))) = (dmask, acc) {
            let dst = out.checked_address(self, "dmask")?;
            // SAFETY: `ptr` holds `count` f32 values (the accumulator), `dst` the
            // contiguous dmask of `count` elements of the dtype.
            unsafe { round_into(self, dtype, (*ptr, 1), dst, count, 1.0) }?;
        }
        Ok(())
    }
}

impl GpuContext {
    /// The driver's free memory on this context's device, if it answers.
    pub fn free_memory(&self) -> Option<usize> {
        self.cuda().mem_get_info().ok().map(|(free, _)| free)
    }

    /// The fused efficient backward (`kernels/bwd/attn_bwd_simt.cu`): the dq kernel (D,
    /// dq, dmask's sums), then the dk/dv kernel; f32 scratch of `2 * B * Hq * L` for D
    /// and the rows' renormalisation and,
    /// for an additive mask, of the mask's size for dmask. No L x S buffer.
    fn run_fused_backward(
        &self,
        problem: &Problem,
        params: &mut BwdParams,
        dmask: Option<(&DeviceTensor, usize, [isize; 4])>,
    ) -> Result<()> {
        let widest = problem.head_dim.max(problem.head_dim_v);
        let spec =
            KernelSpec::fitting(Kind::BwdSimt, problem.dtype, widest, true).ok_or_else(|| {
                SdpaError::NoBackend(vec![(
                    Backend::Efficient,
                    format!(
                        "has no fused backward for {} at head dim {widest}",
                        problem.dtype
                    ),
                )])
            })?;
        let dq_kernel = self.kernel(&spec, Entry::BwdDq)?;
        let dkdv_kernel = self.kernel(&spec, Entry::BwdDkDv)?;
        // D of every row, then 1 / z of every row (the kernels' renormalisation).
        let rows = product("query", &[2, problem.batch, problem.heads_q, problem.len_q])?;
        let (d_buf, d_ptr) = zeroed(self, rows, 4)?;
        params.softmax_d = d_ptr;
        let dmask_acc = dmask_accumulator(self, params, dmask, 4)?;
        let stream = self.stream();
        if problem.len_q > 0 {
            // One warp per query row, four to a block.
            let config = query_row_warps(problem)?;
            // SAFETY: one warp per query row (b, h, i) of the grid; q, k, v, dout, lse and
            // the mask are read through strides `BwdParams::build` checked against their
            // buffers; dq is written at (b, h, i) of its contiguous [B, Hq, L, E] buffer,
            // D and 1 / z at row (b, h, i) of the `rows` f32 values above, dmask through
            // broadcast strides of its own shape.
            unsafe { launch::launch_params(stream, &dq_kernel.function, config, &*params) }?;
        }
        if problem.len_kv > 0 {
            // One warp per key row, four to a block (Hkv <= Hq: the grid's checks hold).
            let config = launch::grid(
                problem.len_kv.div_ceil(4),
                problem.heads_kv,
                problem.batch,
                128,
                0,
            )?;
            // SAFETY: one warp per key row (b, hkv, j); reads as above and D (written by
            // the dq kernel before it on the stream); dk and dv written at (b, hkv, j) of
            // their contiguous buffers.
            unsafe { launch::launch_params(stream, &dkdv_kernel.function, config, &*params) }?;
        }
        self.round_dmask(problem.dtype, dmask, dmask_acc.as_ref())?;
        // Scratch is freed stream-ordered after the kernels that read it.
        drop((d_buf, dmask_acc));
        Ok(())
    }

    /// The tensor-core backward (`kernels/bwd/attn_bwd_tc.cu`): the pre kernel (D), the
    /// main kernel over key blocks (dk, dv; dq into an f32 accumulator laid out like dq's
    /// storage), then dq (and dmask) rounded once. Scratch: f32 `2 * B * Hq * L` for D
    /// and the log2 lse, the dq accumulator (`4 * |dq|` bytes), and for an additive mask
    /// one of its size; no L x S buffer. The mask-and-dropout variant only where the call has either.
    /// `dq_elems` is the element count of dq's storage (`B * Hq * L * E` dense,
    /// `total_q * Hq * E` packed).
    fn run_tc_backward(
        &self,
        problem: &Problem,
        params: &mut BwdParams,
        dmask: Option<(&DeviceTensor, usize, [isize; 4])>,
        dq_elems: usize,
    ) -> Result<()> {
        let spec = tc_backward_spec_with(self, problem, params.fwd.alibi != 0)?;
        let geometry = spec
            .geometry(self.config())
            .expect("the tensor-core backward has a geometry");
        let pre = self.kernel(&spec, Entry::BwdPre)?;
        let main = self.kernel(&spec, Entry::BwdMain)?;
        let rows = product("query", &[problem.batch, problem.heads_q, problem.len_q])?;
        // D, then lse in log2 units (both written by the pre kernel).
        let (d_buf, d_ptr) = zeroed(self, product("query", &[rows, 2])?, 4)?;
        params.softmax_d = d_ptr;
        let key_blocks = problem.len_kv.div_ceil(geometry.block_rows as usize);
        // Deterministic mode: `splits` CTAs along the keys, each with its own dq slice.
        let splits = if self.deterministic_backward() {
            dq_splits(
                key_blocks,
                problem.batch * problem.heads_kv,
                self.sm_count()?,
                dq_elems,
            )
        } else {
            1
        };
        params.dq_split_stride = if splits > 1 {
            i64::try_from(dq_elems)
                .map_err(|_| CudaError::bad_layout("dq", "a size a kernel can index", dq_elems))?
        } else {
            0
        };
        let (dq_buf, dq_acc) = zeroed(self, product("dq", &[dq_elems, splits])?, 4)?;
        params.dq_accum = dq_acc;
        let dmask_acc = dmask_accumulator(self, params, dmask, 4)?;
        let stream = self.stream();
        if problem.len_q > 0 {
            let config = query_row_warps(problem)?;
            // SAFETY: one warp per query row (b, h, i): out and dout read through strides
            // `BwdParams::build` checked against their buffers, D written at row (b, h, i)
            // of the `rows` f32 values above.
            unsafe { launch::launch_params(stream, &pre.function, config, &*params) }?;
        }
        // With no query rows the main kernel writes dk = dv = 0.
        if problem.len_kv > 0 {
            let grid_x = if self.deterministic_backward() {
                splits
            } else {
                key_blocks
            };
            let config = launch::grid(
                grid_x,
                problem.heads_kv,
                problem.batch,
                geometry.threads,
                main.shared_bytes,
            )?;
            // SAFETY: one CTA per (key block, kv head, batch) with the shared memory the
            // module declares; q, k, v, dout, lse and the mask read through checked
            // strides; D read at rows written by the pre kernel before it on the stream;
            // dk and dv written at (b, hkv, j) of their buffers; dq_accum (dq's storage
            // layout, `dq_elems` f32) and the dmask accumulator indexed like dq and
            // through the mask's broadcast strides.
            unsafe { launch::launch_params(stream, &main.function, config, &*params) }?;
        }
        // SAFETY: `dq_acc` holds `splits` slices of `dq_elems` f32 values laid out like
        // dq's storage, whose `dq_elems` elements start at `params.dq`.
        unsafe {
            round_into(
                self,
                problem.dtype,
                (dq_acc, splits),
                params.dq,
                dq_elems,
                problem.scale,
            )
        }?;
        self.round_dmask(problem.dtype, dmask, dmask_acc.as_ref())?;
        drop((d_buf, dq_buf, dmask_acc));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sdpa_core::TensorDesc;

    fn problem(dtype: DType, l: usize, s: usize) -> Problem {
        let t = |len| TensorDesc::contiguous(dtype, [2, 4, len, 64]);
        Problem::new(&t(l), &t(s), &t(s), None, &SdpaOptions::default()).unwrap()
    }

    #[test]
    fn backward_dispatch_takes_tensor_cores_then_math_where_its_scratch_fits() {
        // f16 at head dim 64: flash's tensor-core backward, efficient's where flash is off
        // or the call has a mask, whatever the memory.
        let p = problem(DType::F16, 1024, 1024);
        assert_eq!(
            select_backward(&p, BackendSet::ALL, Some(0)).unwrap(),
            Backend::Flash
        );
        let no_flash = BackendSet::ALL.without(Backend::Flash);
        assert_eq!(
            select_backward(&p, no_flash, Some(0)).unwrap(),
            Backend::Efficient
        );
        // f32: math where its scratch fits in 90% of the free memory, else the fused
        // scalar kernel.
        let p32 = problem(DType::F32, 1024, 1024);
        let need = math_backward_scratch(&p32).unwrap();
        // 4 bytes * (2*4*1024*(128 + 64 + 1 + 2048) + 2*4*1024*256).
        assert_eq!(
            need,
            4 * (2 * 4 * 1024 * (2 * 64 + 64 + 1 + 2 * 1024) + 2 * 4 * 1024 * 256)
        );
        for (free, want) in [
            (None, Backend::Math),
            (Some(2 * need), Backend::Math),
            (Some(need), Backend::Efficient),
        ] {
            assert_eq!(select_backward(&p32, BackendSet::ALL, free).unwrap(), want);
        }
        let e = select_backward(&p32, BackendSet::only(Backend::Flash), None).unwrap_err();
        assert!(e.to_string().contains("f16 or bf16"), "{e}");
        // Head dim 256 in bf16: past the tensor-core backward; flash says so.
        let t = |len| TensorDesc::contiguous(DType::BF16, [1, 2, len, 256]);
        let wide = Problem::new(&t(64), &t(64), &t(64), None, &SdpaOptions::default()).unwrap();
        let e = select_backward(&wide, BackendSet::only(Backend::Flash), None).unwrap_err();
        assert!(e.to_string().contains("up to head dim 128"), "{e}");
        assert_eq!(
            select_backward(&wide, BackendSet::ALL, Some(0)).unwrap(),
            Backend::Efficient
        );
        // f64: efficient has no f64 kernel, math runs whatever the memory.
        let p64 = problem(DType::F64, 16, 16);
        assert_eq!(
            select_backward(&p64, BackendSet::ALL, Some(0)).unwrap(),
            Backend::Math
        );
    }

    #[test]
    fn dmask_plan_sums_the_broadcast_axes() {
        let full = [2, 8, 5, 7];
        assert_eq!(
            dmask_plan(&[5, 7], full).unwrap(),
            (35, [1, 1, 5, 7], [0, 0, 7, 1])
        );
        assert_eq!(
            dmask_plan(&[2, 1, 5, 7], full).unwrap(),
            (70, [2, 1, 5, 7], [35, 0, 7, 1])
        );
        assert_eq!(
            dmask_plan(&[2, 8, 1, 7], full).unwrap(),
            (112, [2, 8, 1, 7], [56, 7, 0, 1])
        );
        assert_eq!(dmask_plan(&[], full).unwrap(), (1, [1, 1, 1, 1], [0; 4]));
        assert_eq!(dmask_plan(&[2, 8, 5, 7], full).unwrap().2, [280, 35, 7, 1]);
        // An extent-1 axis of the problem itself: one entry, never strided.
        assert_eq!(
            dmask_plan(&[1, 1, 5, 1], [1, 1, 5, 1]).unwrap(),
            (5, [1, 1, 5, 1], [0, 0, 1, 0])
        );
        let e = dmask_plan(&[3, 7], full).unwrap_err();
        assert!(e.to_string().starts_with("attn_mask:"), "{e}");
    }
}
