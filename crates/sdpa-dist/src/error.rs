//! Errors of the ring: the attention call's own, and the transport's.

use sdpa_core::SdpaError;

/// What can go wrong in a context-parallel call.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DistError {
    /// The call itself is malformed (as the one-device call would say), or a rank's
    /// shard does not match the plan.
    #[error("{0}")]
    Sdpa(#[from] SdpaError),
    /// The ring broke: a neighbour went away or delivered out of order.
    #[error("rank {rank}: {what}")]
    Transport {
        /// The rank that saw it.
        rank: usize,
        /// What happened.
        what: String,
    },
}

impl DistError {
    /// Whether this is a rank's report of its neighbour leaving (the consequence of an
    /// error elsewhere, not its cause).
    pub fn is_hang_up(&self) -> bool {
        matches!(self, DistError::Transport { what, .. } if what.contains("hung up"))
    }
}

/// The result type of this crate.
pub type Result<T, E = DistError> = std::result::Result<T, E>;
