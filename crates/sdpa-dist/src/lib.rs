//! Context-parallel attention (ring attention): one call of
//! `scaled_dot_product_attention` whose sequence is sharded over ranks.
//!
//! Each rank holds a shard of `q`, `k`, `v` along the sequence ([`Plan`]: contiguous,
//! or zigzag to balance causal masking). K/V shards travel a ring of ranks over a
//! [`Transport`]; each rank computes its queries against the shard it holds while the
//! next one arrives, and merges the partial results by their row statistics (each
//! row's maximum score and softmax sum: the merge of split-KV decoding,
//! [`sdpa_ref::blocks::merge`]). The backward sends each shard's
//! dK/dV accumulator round the ring after it. Causal masking, the window, ALiBi and
//! dropout are evaluated at global positions, so the result equals the one-device call
//! (dropout: the same keep bits, from the global index of DESIGN.md's stream).
//!
//! This crate runs the ring on the CPU with [`sdpa_ref`]'s blocks as each rank's
//! compute, over [`InProcess`] (threads and channels): the truth for a GPU ring and
//! what CI runs with 1 to 8 simulated ranks. An NCCL transport and ranks computing on
//! GPUs are not built yet: they wait for a machine of several GPUs (issue 19).
//!
//! ```
//! use ndarray::Array4;
//! use sdpa_core::{Causal, SdpaOptions};
//! use sdpa_dist::{simulate_forward, Plan, Ring, Sharding};
//!
//! let x = Array4::<f64>::from_shape_fn((1, 2, 10, 4), |(_, h, i, e)| ((h + 3 * i + e) % 5) as f64 * 0.3);
//! let options = SdpaOptions { causal: Causal::TopLeft, ..Default::default() };
//! let ring = Ring::self_attention(Plan::new(Sharding::Zigzag, 10, 3)?);
//! let cp = simulate_forward(&ring, x.view(), x.view(), x.view(), None, &options)?;
//! let one = sdpa_ref::sdpa(x.view(), x.view(), x.view(), None, &options)?;
//! assert!((&cp.out - &one.out).iter().all(|d| d.abs() < 1e-12));
//! # Ok::<(), sdpa_dist::DistError>(())
//! ```
#![warn(missing_docs)]
#![deny(unsafe_code)]

mod error;
pub mod ring;
pub mod shard;
pub mod transport;

pub use error::{DistError, Result};
pub use ring::{
    backward, forward, simulate_backward, simulate_forward, Message, Ring, RingMessage,
};
pub use shard::{Plan, Segment, Sharding};
pub use transport::{InProcess, Transport};
