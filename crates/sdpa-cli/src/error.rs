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
    /// A bad command-line argument or an impossible request.
    #[error("{0}")]
    Usage(String),
    /// Writing a result failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
}
