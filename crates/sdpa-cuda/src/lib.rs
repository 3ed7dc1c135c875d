//! Fused CUDA kernels for scaled dot-product attention, and the CUDA math backend.
//!
//! - **flash**: tensor cores (`mma.sync` m16n8k16, f32 accumulation), online softmax,
//!   f16/bf16, head dims up to 256 (padded inside), both causal alignments with fully
//!   masked tiles skipped, GQA/MQA without copies, Philox dropout bit-identical to
//!   `sdpa-core`, log-sum-exp out.
//! - **efficient**: the same kernel with any bool/additive mask read through broadcast
//!   strides and `Ev != E` for f16/bf16; a scalar kernel for f32.
//! - **decode** ([`GpuContext::attention_with_kvcache`]): split-KV attention over a dense
//!   or paged KV cache with the append of new keys, GQA heads packed a tile, window,
//!   softcap and ALiBi; f32/f16/bf16, head dims up to 256.
//! - **math**: two cuBLAS GEMMs around a softmax kernel, every dtype including f64;
//!   its backward ([`GpuContext::sdpa_backward`]): five GEMMs around elementwise kernels.
//! - **backward** ([`select_backward`]): the tensor-core kernel (mma.sync, f16/bf16,
//!   head dims up to 128) for flash and for efficient with masks; math (cuBLAS) for f32
//!   where it fits; efficient's scalar kernel otherwise. Deterministic dq on request
//!   ([`GpuContext::set_deterministic_backward`]).
//!
//! Kernels (`kernels/*/*.cu`) are embedded, compiled with NVRTC for the device's arch on
//! first use, and cached in memory and on disk. cudarc loads the CUDA libraries at run
//! time, so this crate builds (and `GpuContext::new` returns an error naming the
//! missing library) on a machine without CUDA. Varlen (`cu_seqlens`) is a mode of the
//! fused kernels: [`GpuContext::sdpa_varlen`].
//!
//! # Shapes
//! `q [B, Hq, L, E]`, `k [B, Hkv, S, E]`, `v [B, Hkv, S, Ev]` (any strides; unit last-dim
//! stride for the fused kernels) -> `out [B, Hq, L, Ev]`, `lse [B, Hq, L]` (f32).
//!
//! ```no_run
//! use ndarray::Array4;
//! use sdpa_core::{BackendSet, Causal, SdpaOptions};
//! use sdpa_cuda::GpuContext;
//!
//! let gpu = GpuContext::new(0)?; // Err(Missing { .. }) without a driver or NVRTC
//! let q = Array4::<half::f16>::from_elem((2, 8, 128, 64), half::f16::from_f32(0.1));
//! let options = SdpaOptions { causal: Causal::TopLeft, ..Default::default() };
//! let result = gpu.sdpa_host(q.view(), q.view(), q.view(), None, &options, BackendSet::ALL)?;
//! assert_eq!(result.backend, sdpa_core::Backend::Flash);
//! assert_eq!(result.out.shape(), &[2, 8, 128, 64]);
//! # Ok::<(), sdpa_cuda::CudaError>(())
//! ```
#![warn(missing_docs)]
#![warn(clippy::undocumented_unsafe_blocks)]

pub mod bench;
pub mod blas;
mod bwd;
pub mod cache;
mod context;
mod decode;
mod error;
mod fwd;
pub mod launch;
mod math;
pub mod nvrtc;
pub mod params;
pub mod sources;
pub mod spec;
mod tensor;
pub mod tiles;

pub use bwd::{
    math_backward_scratch, round_into, select_backward, tc_backward_spec, tc_backward_spec_with,
    DeviceGradients, HostGradients,
};
pub use context::{compile, driver_available, Compiled, GpuContext, Kernel};
pub use decode::{choose_splits, tile_rows, DecodeParams, DeviceKvCache, KvAttention, MAX_SPLITS};
pub use error::{CudaError, Result};
pub use fwd::{fused_spec, fused_spec_with, Attention, HostOutput};
pub use params::Varlen;
pub use tensor::{
    extent, lse_to_3d, DeviceElement, DeviceMask, DeviceSeqlens, DeviceSlopes, DeviceTensor,
    HostMask,
};
pub use tiles::KernelConfig;
