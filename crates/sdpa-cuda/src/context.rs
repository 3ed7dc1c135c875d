//! The device, its stream, cuBLAS, and the compiled kernels.

use crate::error::{CudaError, Result};
use crate::kernels::{self, KernelSpec};
use cudarc::cublas::CudaBlas;
use cudarc::driver::sys::CUdevice_attribute;
use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaStream};
use cudarc::nvrtc::Ptx;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

/// Whether `libcuda` can be loaded.
pub fn driver_available() -> bool {
    // SAFETY: only tries to dlopen the library by its usual names; no symbol is called.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

/// One CUDA device with one stream: every launch and copy of this crate goes to that
/// stream, in order. Kernels are compiled for the device's arch on first use and kept.
pub struct GpuContext {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    arch: u32,
    name: String,
    max_shared: usize,
    cache_dir: Option<PathBuf>,
    modules: Mutex<HashMap<KernelSpec, Arc<CudaModule>>>,
    functions: Mutex<HashMap<String, CudaFunction>>,
    blas: OnceLock<std::result::Result<Arc<CudaBlas>, CudaError>>,
    poison: AtomicBool,
    compiled: AtomicUsize,
    loaded_from_disk: AtomicUsize,
}

impl std::fmt::Debug for GpuContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuContext")
            .field("name", &self.name)
            .field("arch", &self.arch)
            .finish()
    }
}

impl GpuContext {
    /// Opens device `ordinal`.
    ///
    /// # Errors
    /// [`CudaError::Missing`] when `libcuda` or `libnvrtc` cannot be loaded (a machine
    /// without a driver or without NVRTC), [`CudaError::Driver`] when there is no such
    /// device.
    pub fn new(ordinal: usize) -> Result<Self> {
        if !driver_available() {
            return Err(CudaError::Missing {
                library: "the CUDA driver (libcuda.so)",
                hint: "this machine has no NVIDIA driver; run on a CUDA machine or use the CPU backends",
            });
        }
        kernels::nvrtc_version()?;
        let ctx = CudaContext::new(ordinal)?;
        // SAFETY: this crate uses a single stream per context, so cudarc's cross-stream
        // event tracking has nothing to order; turning it off before any allocation
        // makes raw device addresses safe to pass to kernels.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.default_stream();
        let (major, minor) = ctx.compute_capability()?;
        let max_shared = ctx
            .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)?
            as usize;
        Ok(GpuContext {
            name: ctx.name()?,
            ctx,
            stream,
            arch: (major * 10 + minor) as u32,
            max_shared,
            cache_dir: kernels::default_cache_dir(),
            modules: Mutex::new(HashMap::new()),
            functions: Mutex::new(HashMap::new()),
            blas: OnceLock::new(),
            poison: AtomicBool::new(false),
            compiled: AtomicUsize::new(0),
            loaded_from_disk: AtomicUsize::new(0),
        })
    }

    /// The stream every operation runs on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// The cudarc context.
    pub fn cuda(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// Compute capability as one number (90 for sm_90).
    pub fn arch(&self) -> u32 {
        self.arch
    }

    /// Device name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Opt-in shared memory per block, bytes.
    pub fn max_shared_bytes(&self) -> usize {
        self.max_shared
    }

    /// L2 cache size, bytes.
    pub fn l2_bytes(&self) -> Result<usize> {
        Ok(self
            .ctx
            .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE)? as usize)
    }

    /// Overrides the disk cache directory (`None` turns the disk cache off).
    pub fn set_cache_dir(&mut self, dir: Option<PathBuf>) {
        self.cache_dir = dir;
    }

    /// When on, every output is filled with NaN before its kernel runs, so a test can
    /// check that every element was written.
    pub fn set_poison_outputs(&self, on: bool) {
        self.poison.store(on, Ordering::Relaxed);
    }

    /// Device 0, created once per process with [`set_poison_outputs`](Self::set_poison_outputs)
    /// on: the context the workspace's GPU test suites share (sdpa-cuda, sdpa-nested,
    /// sdpa-nn), so an element a kernel leaves unwritten fails the comparison as NaN.
    /// The error, if device 0 cannot be opened, is kept and given to every caller.
    pub fn poisoned_for_tests() -> std::result::Result<&'static GpuContext, String> {
        static CTX: std::sync::OnceLock<std::result::Result<GpuContext, String>> =
            std::sync::OnceLock::new();
        CTX.get_or_init(|| {
            let gpu = GpuContext::new(0).map_err(|e| e.to_string())?;
            gpu.set_poison_outputs(true);
            Ok(gpu)
        })
        .as_ref()
        .map_err(Clone::clone)
    }

    pub(crate) fn poison_outputs(&self) -> bool {
        self.poison.load(Ordering::Relaxed)
    }

    /// (kernels compiled by NVRTC, kernels read from the disk cache) by this context.
    pub fn compile_counts(&self) -> (usize, usize) {
        (
            self.compiled.load(Ordering::Relaxed),
            self.loaded_from_disk.load(Ordering::Relaxed),
        )
    }

    /// Waits for all queued work and reports any asynchronous error.
    pub fn synchronize(&self) -> Result<()> {
        self.stream.synchronize()?;
        Ok(())
    }

    /// The kernel `symbol` of `spec`, compiling and loading the module on first use.
    pub(crate) fn function(&self, spec: &KernelSpec, symbol: &str) -> Result<CudaFunction> {
        if let Some(f) = self.functions.lock().unwrap().get(symbol) {
            return Ok(f.clone());
        }
        let module = self.module(spec)?;
        let function = module.load_function(symbol)?;
        let shared = match spec {
            KernelSpec::Tc { head_dim, .. } => {
                Some((*head_dim, kernels::tc_shared_bytes(*head_dim)))
            }
            KernelSpec::Wg { head_dim, .. } => Some((
                *head_dim,
                kernels::wg_tile_shape(*head_dim).shared_bytes(*head_dim),
            )),
            _ => None,
        };
        if let Some((head_dim, bytes)) = shared {
            let bytes = bytes as usize;
            if bytes > self.max_shared {
                return Err(CudaError::layout(
                    "head_dim",
                    format!(
                        "a tile that fits {} bytes of shared memory",
                        self.max_shared
                    ),
                    format!("{bytes} bytes for padded head dim {head_dim}"),
                ));
            }
            function.set_attribute(
                cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                bytes as i32,
            )?;
        }
        self.functions
            .lock()
            .unwrap()
            .insert(symbol.to_string(), function.clone());
        Ok(function)
    }

    fn module(&self, spec: &KernelSpec) -> Result<Arc<CudaModule>> {
        if let Some(m) = self.modules.lock().unwrap().get(spec) {
            return Ok(m.clone());
        }
        let compiled = kernels::compile(spec, self.arch, self.cache_dir.as_deref())?;
        if compiled.from_disk {
            self.loaded_from_disk.fetch_add(1, Ordering::Relaxed);
        } else {
            self.compiled.fetch_add(1, Ordering::Relaxed);
        }
        let module = self.ctx.load_module(Ptx::from_binary(compiled.cubin))?;
        self.modules.lock().unwrap().insert(*spec, module.clone());
        Ok(module)
    }

    /// cuBLAS on this context's stream, created on first use.
    pub(crate) fn blas(&self) -> Result<Arc<CudaBlas>> {
        self.blas
            .get_or_init(|| {
                // SAFETY: only tries to dlopen the library by its usual names.
                if !unsafe { cudarc::cublas::sys::is_culib_present() } {
                    return Err(CudaError::Missing {
                        library: "cuBLAS (libcublas.so)",
                        hint: "the math backend needs cuBLAS: install the CUDA toolkit or the nvidia-cublas wheel and put its lib directory on LD_LIBRARY_PATH",
                    });
                }
                CudaBlas::new(self.stream.clone())
                    .map(Arc::new)
                    .map_err(CudaError::from)
            })
            .clone()
    }
}
