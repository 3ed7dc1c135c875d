use crate::backend::Backend;
use std::fmt::Write as _;

/// Everything that can go wrong before (or instead of) computing attention.
///
/// Messages name the argument, what was expected and what came, e.g.
/// `key: expected head dim 64 (the head dim of query), got 32`.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SdpaError {
    /// An argument is malformed or inconsistent with another one.
    #[error("{arg}: expected {expected}, got {actual}")]
    InvalidArgument {
        /// The argument at fault (`query`, `attn_mask`, `dropout_p`, ...).
        arg: &'static str,
        /// What a valid value looks like.
        expected: String,
        /// What was passed.
        actual: String,
    },
    /// No backend in the requested set can run this problem; one reason per backend.
    #[error("no enabled backend can run this problem: {}", format_reasons(.0))]
    NoBackend(Vec<(Backend, String)>),
}

fn format_reasons(reasons: &[(Backend, String)]) -> String {
    if reasons.is_empty() {
        return "the backend set is empty".to_string();
    }
    let mut out = String::new();
    for (i, (backend, reason)) in reasons.iter().enumerate() {
        if i > 0 {
            out.push_str("; ");
        }
        let _ = write!(out, "{backend}: {reason}");
    }
    out
}

impl SdpaError {
    /// Shorthand for [`SdpaError::InvalidArgument`].
    pub fn invalid(
        arg: &'static str,
        expected: impl Into<String>,
        actual: impl std::fmt::Display,
    ) -> Self {
        SdpaError::InvalidArgument {
            arg,
            expected: expected.into(),
            actual: actual.to_string(),
        }
    }
}

/// The result type of this crate.
pub type Result<T, E = SdpaError> = std::result::Result<T, E>;
