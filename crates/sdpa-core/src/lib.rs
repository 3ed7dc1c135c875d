//! The specification of scaled dot-product attention as PyTorch 2.11 defines it:
//! shapes and strides, dtypes, masks and their broadcasting, causal alignment, the
//! Philox dropout stream, options, errors, and the support checks that pick a backend.
//! No arithmetic on tensors lives here; `sdpa-ref` and `sdpa-cuda` implement it.
//!
//! # Shapes
//! `q [B, Hq, L, E]`, `k [B, Hkv, S, E]`, `v [B, Hkv, S, Ev]` -> `out [B, Hq, L, Ev]`,
//! log-sum-exp `[B, Hq, L]`; `attn_mask` broadcastable to `[B, Hq, L, S]`.
//!
//! ```
//! use sdpa_core::{select, Backend, BackendSet, Causal, DType, Device, Problem, SdpaOptions, TensorDesc};
//!
//! let q = TensorDesc::contiguous(DType::F16, [32, 32, 1024, 32]);
//! let options = SdpaOptions { causal: Causal::TopLeft, ..Default::default() };
//! let problem = Problem::new(&q, &q, &q, None, &options)?;
//! assert_eq!(problem.scale, 1.0 / 32f64.sqrt());
//! assert_eq!(select(BackendSet::ALL, &problem, Device::Cuda)?, Backend::Flash);
//! // Forcing flash on the CPU fails with the reason, as PyTorch's sdpa_kernel does.
//! let err = select(BackendSet::only(Backend::Flash), &problem, Device::Cpu).unwrap_err();
//! assert!(err.to_string().contains("flash: runs on CUDA only"));
//! # Ok::<(), sdpa_core::SdpaError>(())
//! ```
#![warn(missing_docs)]
#![forbid(unsafe_code)]

mod backend;
pub mod dropout;
mod dtype;
mod error;
pub mod hash;
pub mod kvcache;
mod layout;
mod mask;
mod problem;
pub mod rng;

pub use backend::{
    check_support, select, Backend, BackendSet, Device, EFFICIENT_MAX_HEAD_DIM, FLASH_MAX_HEAD_DIM,
};
pub use dropout::{philox4x32_10, Dropout};
pub use dtype::{DType, Scalar};
pub use error::{Result, SdpaError};
pub use layout::{Layout, TensorDesc};
pub use mask::{Causal, MaskDesc, MaskKind, Window};
pub use problem::{
    check_alibi_slopes, geometric_alibi_slopes, shape_text, KvLayout, MaskPlan, Problem,
    SdpaOptions,
};
