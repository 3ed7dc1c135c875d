//! Scaled dot-product attention, `torch.nn.functional.scaled_dot_product_attention` as
//! PyTorch 2.11 defines it, in one call: [`attention`] takes CPU arrays (ndarray views)
//! or CUDA tensors (owned, or borrowed from a framework), runs on the device an
//! [`Exec`] names, and picks the backend with `sdpa_core::select` (flash > efficient >
//! math among those enabled), or says why none can run.
//!
//! # Shapes
//! `q [B, Hq, L, E]`, `k [B, Hkv, S, E]`, `v [B, Hkv, S, Ev]` (any strides; a unit
//! last-dim stride for the fused kernels) -> `out [B, Hq, L, Ev]`, `lse [B, Hq, L]`
//! (f32). A mask broadcasts to `[B, Hq, L, S]`.
//!
//! On the CPU (the f64-accumulating reference, the math backend):
//! ```
//! use ndarray::Array4;
//! use sdpa::{attention, Causal, Exec, SdpaOptions, Tensor};
//!
//! let q = Array4::<f32>::from_shape_fn((2, 4, 16, 8), |(b, h, i, e)| ((b + h + i + e) % 7) as f32 * 0.1);
//! let options = SdpaOptions { causal: Causal::TopLeft, ..Default::default() };
//! let result = attention(Tensor::Host(q.view()), Tensor::Host(q.view()), Tensor::Host(q.view()), None, &options, &Exec::cpu())?;
//! assert_eq!(result.backend, sdpa::Backend::Math);
//! let out = result.out.into_host().unwrap();
//! assert_eq!(out.shape(), &[2, 4, 16, 8]);
//! # Ok::<(), sdpa::Error>(())
//! ```
//!
//! On a CUDA device (run in the GPU bundle; on a machine without one, `GpuContext::new`
//! returns an error naming the missing library):
//! ```no_run
//! use ndarray::Array4;
//! use sdpa::{attention, BackendSet, Exec, GpuContext, SdpaOptions, Tensor};
//!
//! let gpu = GpuContext::new(0)?;
//! let q = Array4::<half::f16>::from_elem((2, 8, 128, 64), half::f16::from_f32(0.1));
//! let exec = Exec::cuda(&gpu).with_backends(BackendSet::ALL);
//! // Host arrays in, host arrays out; device tensors in, device tensors out.
//! let result = attention(Tensor::Host(q.view()), Tensor::Host(q.view()), Tensor::Host(q.view()), None, &SdpaOptions::default(), &exec)?;
//! assert_eq!(result.backend, sdpa::Backend::Flash);
//! # Ok::<(), sdpa::Error>(())
//! ```
#![warn(missing_docs)]
#![forbid(unsafe_code)]

use ndarray::{Array3, Array4, ArrayView1, ArrayView3, ArrayView4, ArrayViewD};
pub use sdpa_core::{
    select, Backend, BackendSet, Causal, DType, Device, Dropout, Problem, SdpaError, SdpaOptions,
};
pub use sdpa_cuda::{
    CudaError, DeviceElement, DeviceKvCache, DeviceMask, DeviceSeqlens, DeviceSlopes, DeviceTensor,
    GpuContext, KernelConfig, Varlen,
};
pub use sdpa_ref::bwd::Gradients;
pub use sdpa_ref::DropoutSpace;

/// An element type every backend takes: f64, f32, f16, bf16 (the reference's
/// `Element`, whose dtype is `sdpa_core::Scalar`'s, the one the device reads too).
pub use sdpa_ref::Element as Elem;

/// Everything that stops a call.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Error {
    /// The call breaks the specification, or no enabled backend can run it.
    #[error(transparent)]
    Spec(#[from] SdpaError),
    /// The CUDA side failed (a missing library, a bad layout, the driver).
    #[error(transparent)]
    Cuda(#[from] CudaError),
    /// The call's outputs and working set do not fit the memory available.
    #[error("query: expected a problem whose {what} fit the {available} bytes of memory available, got {bytes} bytes ({sizes})")]
    TooLarge {
        /// What was counted.
        what: &'static str,
        /// Bytes needed.
        bytes: u128,
        /// Bytes available.
        available: u128,
        /// The problem's sizes.
        sizes: String,
    },
    /// Tensors on a device the call does not run on.
    #[error("{arg}: expected {expected}, got {actual}")]
    Placement {
        /// The argument at fault.
        arg: &'static str,
        /// Where it had to be.
        expected: String,
        /// Where it was.
        actual: String,
    },
}

impl From<Error> for CudaError {
    /// For callers whose own error type is `CudaError` (the CUDA halves of sdpa-nested
    /// and sdpa-nn): the spec and CUDA errors as they are, a placement as a bad layout.
    fn from(e: Error) -> Self {
        match e {
            Error::Spec(s) => CudaError::Spec(s),
            Error::Cuda(c) => c,
            Error::Placement {
                arg,
                expected,
                actual,
            } => CudaError::BadLayout {
                arg,
                expected,
                actual,
            },
            too_large @ Error::TooLarge { .. } => CudaError::BadLayout {
                arg: "query",
                expected: "a problem that fits memory".into(),
                actual: too_large.to_string(),
            },
        }
    }
}

/// The result type of the facade.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Where a call runs.
#[derive(Debug, Clone, Copy)]
pub enum On<'g> {
    /// The CPU reference.
    Cpu,
    /// A CUDA device, through its context (and its stream).
    Cuda(&'g GpuContext),
}

/// Where a call runs and which backends it may use.
#[derive(Debug, Clone, Copy)]
pub struct Exec<'g> {
    /// The device.
    pub device: On<'g>,
    /// The backends dispatch may choose from.
    pub backends: BackendSet,
}

impl<'g> Exec<'g> {
    /// The CPU, every backend enabled (only math runs there).
    pub fn cpu() -> Self {
        Exec {
            device: On::Cpu,
            backends: BackendSet::ALL,
        }
    }

    /// A CUDA device, every backend enabled.
    pub fn cuda(gpu: &'g GpuContext) -> Self {
        Exec {
            device: On::Cuda(gpu),
            backends: BackendSet::ALL,
        }
    }

    /// The same device with only `backends` enabled.
    pub fn with_backends(self, backends: BackendSet) -> Self {
        Exec { backends, ..self }
    }

    /// `sdpa_core`'s name of the device.
    pub fn kind(&self) -> Device {
        match self.device {
            On::Cpu => Device::Cpu,
            On::Cuda(_) => Device::Cuda,
        }
    }

    /// The backend dispatch picks for `problem` here, or every enabled backend's reason.
    ///
    /// # Errors
    /// [`SdpaError::NoBackend`] with the reasons.
    pub fn select(&self, problem: &Problem) -> Result<Backend> {
        Ok(select(self.backends, problem, self.kind())?)
    }
}

/// q, k or v: a host array or a device tensor.
#[derive(Debug, Clone)]
pub enum Tensor<'a, T> {
    /// An ndarray view (any strides).
    Host(ArrayView4<'a, T>),
    /// A device tensor of element type `T`.
    Cuda(&'a DeviceTensor),
}

/// An `attn_mask`: bool (true = takes part) or additive, on the host or the device.
#[derive(Debug, Clone)]
pub enum Mask<'a, T> {
    /// A host bool mask.
    Bool(ArrayViewD<'a, bool>),
    /// A host additive mask in the dtype of q.
    Additive(ArrayViewD<'a, T>),
    /// A device mask (bool or additive).
    Cuda(&'a DeviceMask),
}

/// ALiBi slopes (DESIGN.md "Inference": `-slope |i + S - L - j|` added to the scores after
/// the softcap), f32 `[Hq]` or `[B, Hq]`, on the host or (uploaded and checked once) the
/// device.
#[derive(Debug, Clone)]
pub enum Alibi<'a> {
    /// Host slopes, checked by every call.
    Host(ArrayViewD<'a, f32>),
    /// Device slopes ([`DeviceSlopes::upload`] checked them).
    Cuda(&'a DeviceSlopes),
}

/// A result tensor where the inputs were: host arrays in, host arrays out.
#[derive(Debug, Clone)]
pub enum Out<H> {
    /// On the host.
    Host(H),
    /// On the device.
    Cuda(DeviceTensor),
}

impl<H> Out<H> {
    /// The host array, when the call took host arrays.
    pub fn into_host(self) -> Option<H> {
        match self {
            Out::Host(h) => Some(h),
            Out::Cuda(_) => None,
        }
    }

    /// The device tensor, when the call took device tensors.
    pub fn into_cuda(self) -> Option<DeviceTensor> {
        match self {
            Out::Cuda(t) => Some(t),
            Out::Host(_) => None,
        }
    }
}

/// What [`attention`] returns.
#[derive(Debug, Clone)]
pub struct Attention<T> {
    /// `[B, Hq, L, Ev]` in the inputs' dtype (device: contiguous `[B, Hq, L, Ev]`).
    pub out: Out<Array4<T>>,
    /// Log-sum-exp of each query row, f32 `[B, Hq, L]` (device: `[B, Hq, L, 1]`);
    /// `-inf` for a row with no key.
    pub lse: Out<Array3<f32>>,
    /// The backend that ran.
    pub backend: Backend,
}

impl<T> Attention<T> {
    /// `(out, lse)` on the host, when the call took host arrays.
    pub fn into_host(self) -> Option<(Array4<T>, Array3<f32>)> {
        Some((self.out.into_host()?, self.lse.into_host()?))
    }

    /// `(out, lse)` on the device, when the call took device tensors.
    pub fn into_cuda(self) -> Option<(DeviceTensor, DeviceTensor)> {
        Some((self.out.into_cuda()?, self.lse.into_cuda()?))
    }
}

fn placement(arg: &'static str, expected: &str, actual: &str) -> Error {
    Error::Placement {
        arg,
        expected: expected.to_string(),
        actual: actual.to_string(),
    }
}

/// Attention of `q` over `k`, `v` with `mask` and `options`, on `exec`'s device.
///
/// Host arrays run on the CPU reference, or on CUDA through an upload and a download
/// (results come back on the host); device tensors run on CUDA and stay there. q, k, v
/// and the mask must all be on the host or all on the device.
///
/// # Errors
/// Everything the specification rejects (names the argument, the expected and the
/// actual value), no enabled backend for the problem on this device (every backend's
/// reason), device tensors on a CPU call, a device tensor whose dtype is not `T`, and
/// CUDA failures.
pub fn attention<T: Elem>(
    q: Tensor<'_, T>,
    k: Tensor<'_, T>,
    v: Tensor<'_, T>,
    mask: Option<Mask<'_, T>>,
    options: &SdpaOptions,
    exec: &Exec<'_>,
) -> Result<Attention<T>> {
    attention_with_alibi(q, k, v, mask, None, options, exec)
}

/// [`attention`] with ALiBi slopes, on every backend of either device: host slopes with
/// host arrays, device slopes with device tensors.
///
/// # Errors
/// As [`attention`]; `alibi_slopes` of a shape other than `[Hq]` or `[B, Hq]`, with a
/// slope that is not finite, or on the other device than q.
pub fn attention_with_alibi<T: Elem>(
    q: Tensor<'_, T>,
    k: Tensor<'_, T>,
    v: Tensor<'_, T>,
    mask: Option<Mask<'_, T>>,
    alibi: Option<Alibi<'_>>,
    options: &SdpaOptions,
    exec: &Exec<'_>,
) -> Result<Attention<T>> {
    match (q, k, v) {
        (Tensor::Host(q), Tensor::Host(k), Tensor::Host(v)) => {
            let mask = match mask {
                None => None,
                Some(Mask::Bool(m)) => Some(sdpa_ref::Mask::Bool(m)),
                Some(Mask::Additive(m)) => Some(sdpa_ref::Mask::Additive(m)),
                Some(Mask::Cuda(_)) => {
                    return Err(placement(
                        "attn_mask",
                        "a host mask (q, k, v are host arrays)",
                        "a device mask",
                    ))
                }
            };
            let alibi = match alibi {
                None => None,
                Some(Alibi::Host(a)) => Some(a),
                Some(Alibi::Cuda(_)) => {
                    return Err(placement(
                        "alibi_slopes",
                        "host slopes (q, k, v are host arrays)",
                        "device slopes",
                    ))
                }
            };
            host(q, k, v, mask, alibi, options, exec)
        }
        (Tensor::Cuda(q), Tensor::Cuda(k), Tensor::Cuda(v)) => {
            let On::Cuda(gpu) = exec.device else {
                return Err(placement(
                    "query",
                    "host arrays for a CPU call",
                    "a device tensor",
                ));
            };
            for (arg, t) in [("query", q), ("key", k), ("value", v)] {
                if t.dtype() != T::DTYPE {
                    return Err(placement(arg, T::DTYPE.name(), t.dtype().name()));
                }
            }
            let mask = match mask {
                None => None,
                Some(Mask::Cuda(m)) => Some(m),
                Some(_) => {
                    return Err(placement(
                        "attn_mask",
                        "a device mask (q, k, v are device tensors)",
                        "a host mask",
                    ))
                }
            };
            let alibi = match alibi {
                None => None,
                Some(Alibi::Cuda(a)) => Some(a),
                Some(Alibi::Host(_)) => {
                    return Err(placement(
                        "alibi_slopes",
                        "device slopes (q, k, v are device tensors)",
                        "host slopes",
                    ))
                }
            };
            let r = gpu.sdpa_with_alibi(q, k, v, mask, alibi, options, exec.backends)?;
            Ok(Attention {
                out: Out::Cuda(r.out),
                lse: Out::Cuda(r.lse),
                backend: r.backend,
            })
        }
        _ => Err(placement(
            "key",
            "the device of query (q, k, v all host arrays or all device tensors)",
            "another",
        )),
    }
}

fn host<T: Elem>(
    q: ArrayView4<'_, T>,
    k: ArrayView4<'_, T>,
    v: ArrayView4<'_, T>,
    mask: Option<sdpa_ref::Mask<'_, T>>,
    alibi: Option<ArrayViewD<'_, f32>>,
    options: &SdpaOptions,
    exec: &Exec<'_>,
) -> Result<Attention<T>> {
    match exec.device {
        On::Cpu => {
            let problem = sdpa_ref::problem(&q, &k, &v, mask.as_ref(), options)?;
            let backend = exec.select(&problem)?;
            check_host_memory::<T>(&problem)?;
            let r = match alibi {
                None => sdpa_ref::sdpa(q, k, v, mask, options)?,
                Some(a) => sdpa_ref::sdpa_with_alibi(q, k, v, mask, a, options)?,
            };
            Ok(Attention {
                out: Out::Host(r.out),
                lse: Out::Host(r.lse),
                backend,
            })
        }
        On::Cuda(gpu) => {
            let mask = mask.map(|m| match m {
                sdpa_ref::Mask::Bool(b) => sdpa_cuda::HostMask::Bool(b),
                sdpa_ref::Mask::Additive(a) => sdpa_cuda::HostMask::Additive(a),
            });
            let r =
                gpu.sdpa_host_with_alibi(q, k, v, mask.as_ref(), alibi, options, exec.backends)?;
            Ok(Attention {
                out: Out::Host(r.out),
                lse: Out::Host(r.lse),
                backend: r.backend,
            })
        }
    }
}

/// [`attention`] of host arrays on the CPU with the call's elements placed in a larger
/// dropout index space: what a nested batch needs so that sequence `b` draws the
/// dropout bits of row `b` of the padded `[B, Hq, Lmax, Smax]` problem (on CUDA the
/// varlen kernels index that space themselves: [`attention_varlen`]).
///
/// # Errors
/// As [`attention`], and a `space` that does not contain the problem.
pub fn attention_in_space<T: Elem>(
    q: ArrayView4<'_, T>,
    k: ArrayView4<'_, T>,
    v: ArrayView4<'_, T>,
    options: &SdpaOptions,
    space: DropoutSpace,
    backends: BackendSet,
) -> Result<Attention<T>> {
    let problem = sdpa_ref::problem(&q, &k, &v, None, options)?;
    let backend = Exec::cpu().with_backends(backends).select(&problem)?;
    let r = sdpa_ref::sdpa_in_space(q, k, v, None, options, Some(space))?;
    Ok(Attention {
        out: Out::Host(r.out),
        lse: Out::Host(r.lse),
        backend,
    })
}

/// Bytes of memory available to this process: `MemAvailable` of `/proc/meminfo`, or
/// `None` where it cannot be read (then only the checked sizes of `Problem::new` guard).
fn available_memory() -> Option<u128> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u128 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Refuses, before anything is allocated, a CPU call whose output, lse and the
/// reference's working set (k and v widened to the accumulator type, a 64-row score
/// block per worker) exceed the memory available: a problem of stride-0 views can
/// declare sizes no data backs.
fn check_host_memory<T: Elem>(problem: &Problem) -> Result<()> {
    let Some(available) = available_memory() else {
        return Ok(());
    };
    let n = |x: usize| x as u128;
    let acc = n(std::mem::size_of::<T::Acc>());
    let (b, hq, hkv, l, s, e, ev) = (
        n(problem.batch),
        n(problem.heads_q),
        n(problem.heads_kv),
        n(problem.len_q),
        n(problem.len_kv),
        n(problem.head_dim),
        n(problem.head_dim_v),
    );
    let workers = n(std::thread::available_parallelism().map_or(1, |w| w.get()));
    let bytes = b * hq * l * ev * n(std::mem::size_of::<T>())
        + b * hq * l * 4
        + b * hkv * s * (e + ev) * acc
        + workers * 64 * s * (acc + 1);
    if bytes > available {
        return Err(Error::TooLarge {
            what: "output, lse and working set",
            bytes,
            available,
            sizes: problem.summary(),
        });
    }
    Ok(())
}

/// Attention over packed variable-length sequences on CUDA (the fused kernels' varlen
/// mode): q `[1, Hq, total_q, E]`, k `[1, Hkv, total_k, E]`, v `[1, Hkv, total_k, Ev]`
/// views of packed `[total, H, dim]` storage; sequence `b` is rows
/// `cu_seqlens[b]..cu_seqlens[b+1]`. Dispatch is `select`'s over the padded problem
/// (math takes no `cu_seqlens`). On the CPU, `sdpa-nested` runs nested batches
/// sequence by sequence through [`attention`].
///
/// # Errors
/// As [`attention`]; a CPU `exec`.
pub fn attention_varlen(
    q: &DeviceTensor,
    k: &DeviceTensor,
    v: &DeviceTensor,
    varlen: Varlen<'_>,
    options: &SdpaOptions,
    exec: &Exec<'_>,
) -> Result<Attention<()>> {
    let On::Cuda(gpu) = exec.device else {
        return Err(placement(
            "query",
            "a CUDA exec for device tensors (sdpa-nested runs nested batches on the CPU)",
            "the cpu",
        ));
    };
    let r = gpu.sdpa_varlen(q, k, v, varlen, options, exec.backends)?;
    Ok(Attention {
        out: Out::Cuda(r.out),
        lse: Out::Cuda(r.lse),
        backend: r.backend,
    })
}

/// The backward of [`attention_varlen`] on CUDA (the efficient backend's fused backward
/// in its varlen mode): q, k, v and `varlen` as the forward took them, its `out`
/// `[1, Hq, total_q, Ev]` and `lse` `[1, Hq, total_q, 1]`, and `dout` like `out`; the
/// gradients packed like their inputs ([`sdpa_cuda::GpuContext::sdpa_varlen_backward`]).
///
/// # Errors
/// A CPU `exec`; what the forward refuses; `out`, `lse` or `dout` of another shape; a
/// backend set without efficient.
#[allow(clippy::too_many_arguments)]
pub fn attention_varlen_backward(
    q: &DeviceTensor,
    k: &DeviceTensor,
    v: &DeviceTensor,
    varlen: Varlen<'_>,
    out: &DeviceTensor,
    lse: &DeviceTensor,
    dout: &DeviceTensor,
    options: &SdpaOptions,
    exec: &Exec<'_>,
) -> Result<sdpa_cuda::DeviceGradients> {
    let On::Cuda(gpu) = exec.device else {
        return Err(placement(
            "query",
            "a CUDA exec for device tensors",
            "the cpu",
        ));
    };
    Ok(gpu.sdpa_varlen_backward(q, k, v, varlen, out, lse, dout, options, exec.backends)?)
}

/// A KV cache: host arrays (the CPU reference; on CUDA uploaded, and written back after
/// an append) or device tensors (updated in place).
#[derive(Debug)]
pub enum KvCache<'a, T> {
    /// Host arrays, dense or paged.
    Host(sdpa_ref::kvcache::KvCache<'a, T>),
    /// Device tensors, dense or paged.
    Cuda(DeviceKvCache<'a>),
}

/// What [`attention_with_kvcache`] returns.
#[derive(Debug, Clone)]
pub struct KvAttention<T> {
    /// `[B, Hq, Lq, Ev]` where the inputs were (device: contiguous).
    pub out: Out<Array4<T>>,
    /// f32 `[B, Hq, Lq]` (device: `[B, Hq, Lq, 1]`); `-inf` for a row with no key.
    pub lse: Out<Array3<f32>>,
    /// Key splits the CUDA decode kernels ran with (1 on the CPU).
    pub splits: usize,
}

/// Attention of `q [B, Hq, Lq, E]` over a KV cache (DESIGN.md, "Inference"), after
/// `new` (`k_new`, `v_new` `[B, Hkv, L_new, E / Ev]`) is written into the cache at
/// `cache_seqlens[b]`, in place: dense `[B, Hkv, S_max, E]` or paged
/// `[num_blocks, block_size, Hkv, E]` with a block table; causal bottom-right; window,
/// softcap and `alibi_slopes` (`[Hq]` or `[B, Hq]`, f32); GQA implied. On the CPU the
/// reference ([`sdpa_ref::kvcache::attention_with_kvcache`]); on CUDA the split-KV decode
/// kernels ([`GpuContext::attention_with_kvcache`], splits chosen from the grid). Host
/// arrays on a CUDA exec are uploaded, and the caches written back after an append.
///
/// ```
/// use ndarray::{Array1, Array4};
/// use sdpa::{attention_with_kvcache, Exec, KvCache, SdpaOptions, Tensor};
///
/// let q = Array4::<f32>::from_elem((1, 4, 1, 8), 0.1);
/// let (mut k, mut v) = (Array4::<f32>::zeros((1, 2, 16, 8)), Array4::<f32>::ones((1, 2, 16, 8)));
/// let (kn, vn) = (Array4::<f32>::zeros((1, 2, 1, 8)), Array4::<f32>::ones((1, 2, 1, 8)));
/// let lens = Array1::from(vec![5]);
/// let cache = KvCache::Host(sdpa_ref::kvcache::KvCache::Dense { k: k.view_mut(), v: v.view_mut() });
/// let new = Some((Tensor::Host(kn.view()), Tensor::Host(vn.view())));
/// let r = attention_with_kvcache(Tensor::Host(q.view()), cache, lens.view(), new, None, &SdpaOptions::default(), &Exec::cpu())?;
/// assert!(r.out.into_host().unwrap().iter().all(|&x| (x - 1.0).abs() < 1e-6));
/// # Ok::<(), sdpa::Error>(())
/// ```
///
/// # Errors
/// What `sdpa_core::kvcache::check` refuses (a bad table or length names the batch row),
/// bad slopes, mixed host and device arguments, device tensors on a CPU exec, CUDA
/// failures. Nothing is written on an error.
pub fn attention_with_kvcache<T: Elem>(
    q: Tensor<'_, T>,
    cache: KvCache<'_, T>,
    cache_seqlens: ArrayView1<'_, i32>,
    new: Option<(Tensor<'_, T>, Tensor<'_, T>)>,
    alibi_slopes: Option<ArrayViewD<'_, f32>>,
    options: &SdpaOptions,
    exec: &Exec<'_>,
) -> Result<KvAttention<T>> {
    let mixed = || {
        placement(
            "k_new",
            "the device of query (q, the cache and k_new / v_new all host or all device)",
            "another",
        )
    };
    match (q, cache) {
        (Tensor::Host(q), KvCache::Host(cache)) => {
            let new = match new {
                None => None,
                Some((Tensor::Host(k), Tensor::Host(v))) => Some((k, v)),
                Some(_) => return Err(mixed()),
            };
            match exec.device {
                On::Cpu => {
                    let r = sdpa_ref::kvcache::attention_with_kvcache(
                        q,
                        cache,
                        cache_seqlens,
                        new,
                        alibi_slopes,
                        options,
                    )?;
                    Ok(KvAttention {
                        out: Out::Host(r.out),
                        lse: Out::Host(r.lse),
                        splits: 1,
                    })
                }
                On::Cuda(gpu) => {
                    host_kvcache_on_cuda(gpu, q, cache, cache_seqlens, new, alibi_slopes, options)
                }
            }
        }
        (Tensor::Cuda(q), KvCache::Cuda(cache)) => {
            let On::Cuda(gpu) = exec.device else {
                return Err(placement(
                    "query",
                    "host arrays for a CPU call",
                    "a device tensor",
                ));
            };
            let new = match new {
                None => None,
                Some((Tensor::Cuda(k), Tensor::Cuda(v))) => Some((k, v)),
                Some(_) => return Err(mixed()),
            };
            if q.dtype() != T::DTYPE {
                return Err(placement("query", T::DTYPE.name(), q.dtype().name()));
            }
            let r = gpu.attention_with_kvcache(
                q,
                cache,
                cache_seqlens,
                new,
                alibi_slopes,
                options,
                None,
            )?;
            Ok(KvAttention {
                out: Out::Cuda(r.out),
                lse: Out::Cuda(r.lse),
                splits: r.splits,
            })
        }
        _ => Err(placement(
            "k_cache",
            "the device of query (host arrays or device tensors for both)",
            "another",
        )),
    }
}

/// Host arrays through the CUDA decode kernels: uploaded, run, downloaded; after an
/// append the caches are written back into the caller's views.
fn host_kvcache_on_cuda<T: Elem>(
    gpu: &GpuContext,
    q: ArrayView4<'_, T>,
    cache: sdpa_ref::kvcache::KvCache<'_, T>,
    cache_seqlens: ArrayView1<'_, i32>,
    new: Option<(ArrayView4<'_, T>, ArrayView4<'_, T>)>,
    alibi_slopes: Option<ArrayViewD<'_, f32>>,
    options: &SdpaOptions,
) -> Result<KvAttention<T>> {
    use sdpa_ref::kvcache::KvCache as H;
    let dq = DeviceTensor::upload(gpu, q)?;
    let new_dev = match &new {
        None => None,
        Some((k, v)) => Some((
            DeviceTensor::upload(gpu, k.view())?,
            DeviceTensor::upload(gpu, v.view())?,
        )),
    };
    let new_ref = new_dev.as_ref().map(|(k, v)| (k, v));
    let (mut k_host, mut v_host, table) = match cache {
        H::Dense { k, v } => (k, v, None),
        // A local copy: the device cache's borrows end with this call.
        H::Paged { k, v, block_table } => (k, v, Some(block_table.to_owned())),
    };
    let (dk, dv) = (
        DeviceTensor::upload(gpu, k_host.view())?,
        DeviceTensor::upload(gpu, v_host.view())?,
    );
    let c = match &table {
        None => DeviceKvCache::Dense { k: &dk, v: &dv },
        Some(t) => DeviceKvCache::Paged {
            k: &dk,
            v: &dv,
            block_table: t.view(),
        },
    };
    let r =
        gpu.attention_with_kvcache(&dq, c, cache_seqlens, new_ref, alibi_slopes, options, None)?;
    let out = r.out.download::<T>(gpu)?;
    let lse = sdpa_cuda::lse_to_3d(r.lse.download::<f32>(gpu)?);
    if new.is_some() {
        // Both downloads succeed before either host view is touched.
        let (k_new, v_new) = (dk.download::<T>(gpu)?, dv.download::<T>(gpu)?);
        k_host.assign(&k_new);
        v_host.assign(&v_new);
    }
    Ok(KvAttention {
        out: Out::Host(out),
        lse: Out::Host(lse),
        splits: r.splits,
    })
}

/// Gradients of attention (`dq`, `dk`, `dv`, and `dmask` for an additive mask) from
/// the forward call's inputs, its `out` and `lse`, and the incoming gradient `dout`,
/// with the forward's `options` (dropout replays its keep bits from the same seed and
/// offset). Host arrays: on the CPU the reference ([`sdpa_ref::bwd::sdpa_backward`]),
/// on CUDA (uploaded, results downloaded) [`sdpa_cuda::select_backward`]'s choice among
/// `exec.backends`: flash's tensor-core backward (f16/bf16, head dims up to 128), the
/// math backend's backward (cuBLAS, every dtype) where its `L x S` scratch fits in the
/// device's free memory, else the efficient backend's fused backward (f32/f16/bf16, head
/// dims up to 256, O(L) extra memory).
///
/// # Errors
/// As [`attention`]; `out`, `lse` or `grad_out` of a shape other than the problem's; a
/// device mask; a CUDA `exec` whose backends have no backward for the problem.
// PyTorch's `_scaled_dot_product_*_backward` argument list, plus where it runs.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward<T: Elem>(
    q: ArrayView4<'_, T>,
    k: ArrayView4<'_, T>,
    v: ArrayView4<'_, T>,
    out: ArrayView4<'_, T>,
    lse: ArrayView3<'_, f32>,
    dout: ArrayView4<'_, T>,
    mask: Option<Mask<'_, T>>,
    options: &SdpaOptions,
    exec: &Exec<'_>,
) -> Result<Gradients<T>> {
    attention_backward_with_alibi(q, k, v, out, lse, dout, mask, None, options, exec)
}

/// [`attention_backward`] of a forward with ALiBi slopes (`[Hq]` or `[B, Hq]`, host):
/// the slopes are constants of the call and get no gradient.
///
/// # Errors
/// As [`attention_backward`], and bad `alibi_slopes` (named).
#[allow(clippy::too_many_arguments)]
pub fn attention_backward_with_alibi<T: Elem>(
    q: ArrayView4<'_, T>,
    k: ArrayView4<'_, T>,
    v: ArrayView4<'_, T>,
    out: ArrayView4<'_, T>,
    lse: ArrayView3<'_, f32>,
    dout: ArrayView4<'_, T>,
    mask: Option<Mask<'_, T>>,
    alibi: Option<ArrayViewD<'_, f32>>,
    options: &SdpaOptions,
    exec: &Exec<'_>,
) -> Result<Gradients<T>> {
    if let On::Cuda(gpu) = exec.device {
        // On CUDA: GpuContext::sdpa_backward's dispatch (select_backward: flash's tensor
        // cores, math where its scratch fits, else the efficient backend's fused backward).
        let mask = match mask {
            None => None,
            Some(Mask::Bool(m)) => Some(sdpa_cuda::HostMask::Bool(m)),
            Some(Mask::Additive(m)) => Some(sdpa_cuda::HostMask::Additive(m)),
            Some(Mask::Cuda(_)) => {
                return Err(placement(
                    "attn_mask",
                    "a host mask (q, k, v are host arrays)",
                    "a device mask",
                ))
            }
        };
        let g = gpu.sdpa_backward_host_with_alibi(
            q,
            k,
            v,
            out,
            lse,
            dout,
            mask.as_ref(),
            alibi,
            options,
            exec.backends,
        )?;
        return Ok(Gradients {
            dq: g.dq,
            dk: g.dk,
            dv: g.dv,
            dmask: g.dmask,
        });
    }
    let mask = match mask {
        None => None,
        Some(Mask::Bool(m)) => Some(sdpa_ref::Mask::Bool(m)),
        Some(Mask::Additive(m)) => Some(sdpa_ref::Mask::Additive(m)),
        Some(Mask::Cuda(_)) => {
            return Err(placement(
                "attn_mask",
                "a host mask (the backward runs on the CPU)",
                "a device mask",
            ))
        }
    };
    let problem = sdpa_ref::problem(&q, &k, &v, mask.as_ref(), options)?;
    exec.select(&problem)?;
    check_host_memory::<T>(&problem)?;
    Ok(match alibi {
        None => sdpa_ref::bwd::sdpa_backward(q, k, v, out, lse, dout, mask, options)?,
        Some(a) => {
            sdpa_ref::bwd::sdpa_backward_with_alibi(q, k, v, out, lse, dout, mask, a, options)?
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{Array4, ShapeBuilder};

    fn inputs() -> Array4<f64> {
        Array4::from_shape_fn((1, 2, 5, 4), |(_, h, i, e)| {
            ((h * 7 + i * 3 + e) % 5) as f64 * 0.2 - 0.4
        })
    }

    #[test]
    fn cpu_call_is_the_reference() {
        let x = inputs();
        let r = attention(
            Tensor::Host(x.view()),
            Tensor::Host(x.view()),
            Tensor::Host(x.view()),
            None,
            &SdpaOptions::default(),
            &Exec::cpu(),
        )
        .unwrap();
        let want =
            sdpa_ref::sdpa(x.view(), x.view(), x.view(), None, &SdpaOptions::default()).unwrap();
        assert_eq!(r.backend, Backend::Math);
        assert_eq!(r.out.into_host().unwrap(), want.out);
        assert_eq!(r.lse.into_host().unwrap(), want.lse);
    }

    #[test]
    fn cpu_alibi_call_is_the_reference_and_checks_its_slopes() {
        let x = inputs();
        let slopes = ndarray::arr1(&[0.5f32, 0.25]).into_dyn();
        let opts = SdpaOptions {
            softcap: Some(3.0),
            window: sdpa_core::Window { left: 2, right: 1 },
            ..Default::default()
        };
        let r = attention_with_alibi(
            Tensor::Host(x.view()),
            Tensor::Host(x.view()),
            Tensor::Host(x.view()),
            None,
            Some(Alibi::Host(slopes.view())),
            &opts,
            &Exec::cpu(),
        )
        .unwrap();
        let want =
            sdpa_ref::sdpa_with_alibi(x.view(), x.view(), x.view(), None, slopes.view(), &opts)
                .unwrap();
        let plain = sdpa_ref::sdpa(x.view(), x.view(), x.view(), None, &opts).unwrap();
        let out = r.out.into_host().unwrap();
        assert_eq!(out, want.out);
        assert_ne!(out, plain.out, "the slopes change the result");
        let g = attention_backward_with_alibi(
            x.view(),
            x.view(),
            x.view(),
            want.out.view(),
            want.lse.view(),
            x.view(),
            None,
            Some(slopes.view()),
            &opts,
            &Exec::cpu(),
        )
        .unwrap();
        let want_g = sdpa_ref::bwd::sdpa_backward_with_alibi(
            x.view(),
            x.view(),
            x.view(),
            want.out.view(),
            want.lse.view(),
            x.view(),
            None,
            slopes.view(),
            &opts,
        )
        .unwrap();
        assert_eq!(g.dq, want_g.dq);
        let three = ndarray::arr1(&[0.5f32, 0.25, 1.0]).into_dyn();
        let e = attention_with_alibi(
            Tensor::Host(x.view()),
            Tensor::Host(x.view()),
            Tensor::Host(x.view()),
            None,
            Some(Alibi::Host(three.view())),
            &opts,
            &Exec::cpu(),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("alibi_slopes"), "{e}");
    }

    #[test]
    fn cpu_refuses_fused_backends_with_every_reason() {
        let x = inputs();
        let e = attention(
            Tensor::Host(x.view()),
            Tensor::Host(x.view()),
            Tensor::Host(x.view()),
            None,
            &SdpaOptions::default(),
            &Exec::cpu().with_backends(BackendSet::only(Backend::Flash)),
        )
        .unwrap_err();
        assert!(e.to_string().contains("flash: runs on CUDA only"), "{e}");
    }

    #[test]
    fn a_problem_no_memory_holds_is_refused_before_allocation() {
        // Stride-0 views: 2^40 query rows declared, one element stored.
        let one = [0.5f32];
        let q =
            ArrayView4::from_shape((1, 1, 1usize << 40, 1).strides((0, 0, 0, 0)), &one).unwrap();
        let k = ArrayView4::from_shape((1, 1, 4, 1).strides((0, 0, 0, 0)), &one).unwrap();
        let started = std::time::Instant::now();
        let e = attention(
            Tensor::Host(q),
            Tensor::Host(k),
            Tensor::Host(k),
            None,
            &SdpaOptions::default(),
            &Exec::cpu(),
        )
        .unwrap_err();
        assert!(started.elapsed().as_secs_f64() < 1.0);
        assert!(matches!(e, Error::TooLarge { .. }), "{e}");
        assert!(e.to_string().contains("bytes of memory available"), "{e}");
    }

    #[test]
    fn bad_input_names_the_argument() {
        let x = inputs();
        let k = Array4::<f64>::zeros((1, 2, 5, 3));
        let e = attention(
            Tensor::Host(x.view()),
            Tensor::Host(k.view()),
            Tensor::Host(x.view()),
            None,
            &SdpaOptions::default(),
            &Exec::cpu(),
        )
        .unwrap_err();
        assert!(e.to_string().starts_with("key"), "{e}");
    }

    #[test]
    fn cpu_backward_is_the_reference() {
        let x = inputs();
        let mask = ndarray::Array2::from_shape_fn((5, 5), |(i, j)| (i * j) as f64 * 0.1).into_dyn();
        let options = SdpaOptions {
            causal: Causal::TopLeft,
            ..Default::default()
        };
        let fwd = sdpa_ref::sdpa(
            x.view(),
            x.view(),
            x.view(),
            Some(sdpa_ref::Mask::Additive(mask.view())),
            &options,
        )
        .unwrap();
        let dout = x.mapv(|x| 1.0 - x);
        let got = attention_backward(
            x.view(),
            x.view(),
            x.view(),
            fwd.out.view(),
            fwd.lse.view(),
            dout.view(),
            Some(Mask::Additive(mask.view())),
            &options,
            &Exec::cpu(),
        )
        .unwrap();
        let want = sdpa_ref::sdpa_backward(
            x.view(),
            x.view(),
            x.view(),
            fwd.out.view(),
            fwd.lse.view(),
            dout.view(),
            Some(sdpa_ref::Mask::Additive(mask.view())),
            &options,
        )
        .unwrap();
        assert_eq!(got, want);
        assert_eq!(got.dmask.unwrap().shape(), &[5, 5]);
    }
}
