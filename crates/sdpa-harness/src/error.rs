use sdpa_core::SdpaError;

/// Errors of the harness: a case file that cannot be read, or a call the spec rejects.
#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    /// The case file is malformed: `what` is the part at fault.
    #[error("{what}: expected {expected}, got {actual}")]
    Case {
        /// The part of the file at fault (`case file`, `tensor q`, `metadata dropout_p`).
        what: String,
        /// What a valid value looks like.
        expected: String,
        /// What the file holds.
        actual: String,
    },
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The specification rejects the call the case describes.
    #[error(transparent)]
    Sdpa(#[from] SdpaError),
    /// The call failed on its device (no backend there, a CUDA failure).
    #[error(transparent)]
    Run(sdpa::Error),
}

impl From<sdpa::Error> for HarnessError {
    fn from(e: sdpa::Error) -> Self {
        match e {
            sdpa::Error::Spec(spec) => HarnessError::Sdpa(spec),
            other => HarnessError::Run(other),
        }
    }
}

impl HarnessError {
    pub(crate) fn case(
        what: impl Into<String>,
        expected: impl Into<String>,
        actual: impl std::fmt::Display,
    ) -> Self {
        HarnessError::Case {
            what: what.into(),
            expected: expected.into(),
            actual: actual.to_string(),
        }
    }
}

/// The result type of this crate.
pub type Result<T, E = HarnessError> = std::result::Result<T, E>;
