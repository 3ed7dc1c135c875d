//! Errors of the ring: the attention call's own, and the transport's.

use sdpa_core::SdpaError;

/// What can go wrong in a context-parallel call.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DistError {
    /// The call itself is malformed (as the one-device call would say), or a rank's
    /// shard does not match the plan.
    #[error("{0}")]
    Sdpa(#[from] SdpaError),
    /// The ring broke: a neighbour delivered something other than the ring expects.
    #[error("rank {rank}: {what}")]
    Transport {
        /// The rank that saw it.
        rank: usize,
        /// What happened.
        what: String,
    },
    /// A neighbour left the ring (the consequence of an error there, not its cause).
    #[error("rank {rank}: rank {peer} hung up")]
    HungUp {
        /// The rank that saw it.
        rank: usize,
        /// The neighbour that left.
        peer: usize,
    },
}

impl DistError {
    /// Whether this is a rank's report of its neighbour leaving.
    pub fn is_hang_up(&self) -> bool {
        matches!(self, DistError::HungUp { .. })
    }
}

/// The result type of this crate.
pub type Result<T, E = DistError> = std::result::Result<T, E>;
