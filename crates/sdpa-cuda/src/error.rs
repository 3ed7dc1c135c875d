use sdpa_core::SdpaError;

/// Everything that can stop a CUDA SDPA call. Messages name the cause and, where there
/// is one, the argument, the expected and the actual value.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CudaError {
    /// A CUDA library could not be loaded (`libcuda`, `libnvrtc` or `libcublas`).
    #[error("{library} not found: {hint}")]
    Missing {
        /// Which library.
        library: &'static str,
        /// What to install or set.
        hint: &'static str,
    },
    /// A tensor's strides or extent do not fit its buffer or the kernel.
    #[error("{arg}: expected {expected}, got {actual}")]
    BadLayout {
        /// The tensor at fault.
        arg: &'static str,
        /// What a valid layout looks like.
        expected: String,
        /// What was passed.
        actual: String,
    },
    /// A device address is not aligned for its element type.
    #[error("{arg}: expected an address aligned to {align} bytes, got 0x{address:x}")]
    Misaligned {
        /// The tensor at fault.
        arg: &'static str,
        /// Required alignment in bytes.
        align: usize,
        /// The address.
        address: u64,
    },
    /// A device allocation failed for lack of memory.
    #[error("out of device memory allocating {bytes} bytes for {what}")]
    OutOfMemory {
        /// What the allocation was for.
        what: &'static str,
        /// Its size.
        bytes: usize,
    },
    /// NVRTC rejected a kernel, or compiled it with warnings.
    #[error("NVRTC could not compile {kernel} for {arch}:\n{log}")]
    Compile {
        /// Kernel symbol.
        kernel: String,
        /// Target, e.g. `sm_90`.
        arch: String,
        /// NVRTC's log.
        log: String,
    },
    /// The call breaks the SDPA specification, or no enabled backend can run it.
    #[error(transparent)]
    Spec(#[from] SdpaError),
    /// A configuration value (an `SDPA_*` variable or a [`KernelConfig`](crate::KernelConfig)
    /// setting) is malformed.
    #[error("{var}: expected {expected}, got {actual:?}")]
    Config {
        /// The variable or setting.
        var: &'static str,
        /// What it takes.
        expected: String,
        /// What it held.
        actual: String,
    },
    /// A kernel source names a file that is not among the embedded sources.
    #[error("kernels/{file}: includes {include:?}, which is not an embedded kernel source")]
    UnknownInclude {
        /// The including file.
        file: String,
        /// The include it names.
        include: String,
    },
    /// A CUDA driver call failed.
    #[error("CUDA driver: {0}")]
    Driver(String),
    /// A cuBLAS call failed.
    #[error("cuBLAS: {0}")]
    Cublas(String),
}

impl CudaError {
    /// A [`CudaError::BadLayout`] naming `arg`, what it takes and what it got.
    pub fn bad_layout(
        arg: &'static str,
        expected: impl Into<String>,
        actual: impl std::fmt::Display,
    ) -> Self {
        CudaError::BadLayout {
            arg,
            expected: expected.into(),
            actual: actual.to_string(),
        }
    }

    /// Maps a driver error, naming out-of-memory as such.
    pub(crate) fn driver(
        what: &'static str,
        bytes: usize,
    ) -> impl FnOnce(cudarc::driver::DriverError) -> CudaError {
        move |e| {
            if e.0 == cudarc::driver::sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY {
                CudaError::OutOfMemory { what, bytes }
            } else {
                CudaError::Driver(format!("{what}: {e}"))
            }
        }
    }
}

impl From<cudarc::driver::DriverError> for CudaError {
    fn from(e: cudarc::driver::DriverError) -> Self {
        CudaError::Driver(e.to_string())
    }
}

impl From<cudarc::cublas::result::CublasError> for CudaError {
    fn from(e: cudarc::cublas::result::CublasError) -> Self {
        CudaError::Cublas(format!("{e:?}"))
    }
}

/// The result type of this crate.
pub type Result<T, E = CudaError> = std::result::Result<T, E>;
