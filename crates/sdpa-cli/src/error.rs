use sdpa_core::SdpaError;
use sdpa_harness::HarnessError;

/// Everything the command can fail with; printed as one line.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// A case file or harness failure.
    #[error(transparent)]
    Harness(#[from] HarnessError),
    /// The specification rejects the call.
    #[error(transparent)]
    Sdpa(#[from] SdpaError),
    /// A CUDA failure (driver, NVRTC, cuBLAS, a launch the kernels refuse).
    #[error(transparent)]
    Cuda(#[from] sdpa_cuda::CudaError),
    /// A call of the facade failed off the spec (memory, placement).
    #[error(transparent)]
    Facade(sdpa::Error),
    /// A bad command-line argument or an impossible request.
    #[error("{0}")]
    Usage(String),
    /// Something went wrong with one case file; the cause does not name the file.
    #[error("{path}: {source}")]
    InCase {
        /// The case file.
        path: String,
        /// The cause.
        source: Box<CliError>,
    },
    /// An output the writer will not replace (a device, folder, symlink, the input).
    #[error("{path}: expected {expected}, got {actual}")]
    Refused {
        /// The output named on the command line.
        path: String,
        /// What it may be.
        expected: String,
        /// What it is.
        actual: String,
    },
    /// Writing a result failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
}

impl From<sdpa::Error> for CliError {
    fn from(e: sdpa::Error) -> Self {
        match e {
            sdpa::Error::Spec(spec) => CliError::Sdpa(spec),
            sdpa::Error::Cuda(cuda) => CliError::Cuda(cuda),
            other => CliError::Facade(other),
        }
    }
}

impl CliError {
    /// Names `case` in the message unless the cause already starts with it (the case
    /// reader prefixes its own errors with the path).
    pub fn in_case(case: &std::path::Path, e: impl Into<CliError>) -> CliError {
        let e = e.into();
        let path = case.display().to_string();
        if e.to_string().starts_with(&path) {
            e
        } else {
            CliError::InCase {
                path,
                source: Box::new(e),
            }
        }
    }
}
