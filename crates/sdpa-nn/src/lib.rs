//! The tutorial's nanoGPT-style `CausalSelfAttention`: one packed projection to q, k,
//! v (`c_attn: Linear(E, 3E)`), scaled dot-product attention over `heads` heads, an
//! output projection (`c_proj: Linear(E, E)`), attention and residual dropout.
//!
//! As in the tutorial's module, training applies dropout and the configured causal
//! mask; eval applies neither (the tutorial's module passes `is_causal=False` in eval).
//! q, k and v are strided views into the one `c_attn` output: no copies.
//!
//! # Shapes
//! `x [B, T, E]` -> `[B, T, E]`; or a nested batch of packed rows `[total, E]` with
//! `cu_seqlens` -> the same layout.
//!
//! ```
//! use ndarray::Array3;
//! use sdpa_nn::{CausalSelfAttention, Linear};
//!
//! let e = 16;
//! let weight = ndarray::Array2::<f32>::from_shape_fn((3 * e, e), |(o, i)| ((o * 7 + i) % 5) as f32 * 0.01);
//! let c_attn = Linear::new(weight, None)?;
//! let c_proj = Linear::new(ndarray::Array2::<f32>::eye(e), None)?;
//! let mut attn = CausalSelfAttention::new(c_attn, c_proj, 4, 0.1, true)?;
//! attn.eval();
//! let y = attn.forward(Array3::<f32>::ones((2, 5, e)).view())?;
//! assert_eq!(y.shape(), &[2, 5, e]);
//! # Ok::<(), sdpa_nn::NnError>(())
//! ```
#![warn(missing_docs)]
#![warn(clippy::undocumented_unsafe_blocks)]

pub mod cuda;
pub mod device;
mod linear;
mod module;
pub mod profile;
pub mod train;

pub use linear::{Linear, LinearGrads};
pub use module::{CausalSelfAttention, DropoutGenerator, ModuleCache, ModuleGrads, Saved};

use sdpa_core::SdpaError;

/// Errors of the module: a missing or mis-shaped weight, an unreadable state_dict, or
/// an input the attention rejects.
#[derive(Debug, thiserror::Error)]
pub enum NnError {
    /// A weight is missing, of the wrong shape, or of the wrong dtype.
    #[error("{name}: expected {expected}, got {actual}")]
    Weight {
        /// The state_dict key (`c_attn.weight`, ...).
        name: String,
        /// What a valid weight looks like.
        expected: String,
        /// What was found.
        actual: String,
    },
    /// The input or options are rejected.
    #[error(transparent)]
    Sdpa(#[from] SdpaError),
    /// The attention call failed for another reason than its specification (on a
    /// device: out of memory, a CUDA error, a backend set that cannot run it).
    #[error(transparent)]
    Exec(sdpa::Error),
}

impl From<sdpa::Error> for NnError {
    fn from(e: sdpa::Error) -> Self {
        match e {
            sdpa::Error::Spec(e) => NnError::Sdpa(e),
            other => NnError::Exec(other),
        }
    }
}

impl NnError {
    pub(crate) fn weight(
        name: impl Into<String>,
        expected: impl Into<String>,
        actual: impl std::fmt::Display,
    ) -> Self {
        NnError::Weight {
            name: name.into(),
            expected: expected.into(),
            actual: actual.to_string(),
        }
    }
}

/// The result type of this crate.
pub type Result<T, E = NnError> = std::result::Result<T, E>;
