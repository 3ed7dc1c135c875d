//! The device, its stream, cuBLAS, and the compiled kernels.

use crate::cache::{cache_key, DiskCache};
use crate::error::{CudaError, Result};
use crate::nvrtc;
use crate::spec::{Entry, KernelSpec, Kind};
use crate::tiles::KernelConfig;
use cudarc::cublas::CudaBlas;
use cudarc::driver::sys::CUdevice_attribute;
use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaStream};
use cudarc::nvrtc::Ptx;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

/// Whether `libcuda` can be loaded.
pub fn driver_available() -> bool {
    // SAFETY: only tries to dlopen the library by its usual names; no symbol is called.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

/// A compiled kernel ready to launch, with the dynamic shared memory its module
/// declares (`sdpa_shared_bytes`; 0 where it has none).
#[derive(Debug, Clone)]
pub struct Kernel {
    /// The function.
    pub function: CudaFunction,
    /// Dynamic shared memory per CTA, bytes.
    pub shared_bytes: u32,
}

/// One CUDA device with one stream: every launch and copy of this crate goes to that
/// stream, in order. Kernels are compiled for the device's arch on first use and kept,
/// in memory and (see [`crate::cache`]) on disk.
pub struct GpuContext {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    arch: u32,
    name: String,
    max_shared: usize,
    config: KernelConfig,
    disk: std::result::Result<Option<DiskCache>, String>,
    modules: Mutex<HashMap<KernelSpec, Arc<CudaModule>>>,
    functions: Mutex<HashMap<(KernelSpec, Entry), Kernel>>,
    blas: OnceLock<std::result::Result<Arc<CudaBlas>, CudaError>>,
    poison: AtomicBool,
    deterministic: AtomicBool,
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
    /// Opens device `ordinal` with the default [`KernelConfig`] on a stream of its own
    /// (the device's default stream).
    ///
    /// # Errors
    /// [`CudaError::Missing`] when `libcuda` or `libnvrtc` cannot be loaded (a machine
    /// without a driver or without NVRTC), [`CudaError::Driver`] when there is no such
    /// device.
    pub fn new(ordinal: usize) -> Result<Self> {
        Self::with_config(ordinal, KernelConfig::default())
    }

    /// Opens device `ordinal` with `config`.
    ///
    /// # Errors
    /// As [`GpuContext::new`].
    pub fn with_config(ordinal: usize, config: KernelConfig) -> Result<Self> {
        check_libraries()?;
        let ctx = CudaContext::new(ordinal)?;
        // SAFETY: this crate uses a single stream per context, so cudarc's cross-stream
        // event tracking has nothing to order; turning it off before any allocation
        // makes raw device addresses safe to pass to kernels.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.default_stream();
        Self::on_stream(stream, config)
    }

    /// A context over a stream the caller owns (a framework's current stream, through
    /// [`CudaContext::wrap_borrowed_stream`], or one of its own): every launch and copy
    /// goes there, in order with the caller's own work on it. Allocations this crate
    /// makes are stream-ordered on it too.
    ///
    /// # Errors
    /// As [`GpuContext::new`].
    pub fn on_stream(stream: Arc<CudaStream>, config: KernelConfig) -> Result<Self> {
        check_libraries()?;
        let ctx = stream.context().clone();
        let (major, minor) = ctx.compute_capability()?;
        let max_shared = ctx
            .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)?
            as usize;
        let disk = config.cache_dir().map(DiskCache::open).transpose();
        Ok(GpuContext {
            name: ctx.name()?,
            ctx,
            stream,
            arch: (major * 10 + minor) as u32,
            max_shared,
            config,
            disk,
            modules: Mutex::new(HashMap::new()),
            functions: Mutex::new(HashMap::new()),
            blas: OnceLock::new(),
            poison: AtomicBool::new(false),
            deterministic: AtomicBool::new(false),
            compiled: AtomicUsize::new(0),
            loaded_from_disk: AtomicUsize::new(0),
        })
    }

    /// The kernel configuration.
    pub fn config(&self) -> &KernelConfig {
        &self.config
    }

    /// Why the disk cache is off, when its folder was refused (another owner, writable
    /// by others, not a folder); `None` when it is in use or was not asked for.
    pub fn disk_cache_refused(&self) -> Option<&str> {
        self.disk.as_ref().err().map(String::as_str)
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

    /// Streaming multiprocessors on the device.
    pub fn sm_count(&self) -> Result<usize> {
        Ok(self
            .ctx
            .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?
            as usize)
    }

    /// L2 cache size, bytes.
    pub fn l2_bytes(&self) -> Result<usize> {
        Ok(self
            .ctx
            .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE)? as usize)
    }

    /// Overrides the disk cache folder (`None` turns the disk cache off).
    pub fn set_cache_dir(&mut self, dir: Option<std::path::PathBuf>) {
        self.disk = dir.as_deref().map(DiskCache::open).transpose();
        self.config = self.config.clone().with_cache_dir(dir);
    }

    /// When on, every output is filled with NaN before its kernel runs, so a test can
    /// check that every element was written.
    pub fn set_poison_outputs(&self, on: bool) {
        self.poison.store(on, Ordering::Relaxed);
    }

    /// When on, the tensor-core backward adds each dq block in a fixed order (key block
    /// 0 first), so dq is bitwise identical run to run on the same device (dk and dv
    /// always are); off (the default), the key blocks add with atomics in whatever order
    /// they run. Like PyTorch's `use_deterministic_algorithms`, a switch of the context.
    /// dmask's sums stay atomic either way.
    pub fn set_deterministic_backward(&self, on: bool) {
        self.deterministic.store(on, Ordering::Relaxed);
    }

    /// Whether [`set_deterministic_backward`](Self::set_deterministic_backward) is on.
    pub fn deterministic_backward(&self) -> bool {
        self.deterministic.load(Ordering::Relaxed)
    }

    /// Device 0, created once per process with [`set_poison_outputs`](Self::set_poison_outputs)
    /// on: the context the workspace's GPU test suites share (sdpa-cuda, sdpa-nested,
    /// sdpa-nn), so an element a kernel leaves unwritten fails the comparison as NaN.
    /// The error, if device 0 cannot be opened, is kept and given to every caller.
    pub fn poisoned_for_tests() -> std::result::Result<&'static GpuContext, String> {
        static CTX: std::sync::OnceLock<std::result::Result<GpuContext, String>> =
            std::sync::OnceLock::new();
        CTX.get_or_init(|| {
            let config = KernelConfig::from_env().map_err(|e| e.to_string())?;
            let gpu = GpuContext::with_config(0, config).map_err(|e| e.to_string())?;
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

    /// The `entry` of `spec`, compiling and loading the module on first use. Its dynamic
    /// shared memory is what the module itself declares, checked against the device.
    pub fn kernel(&self, spec: &KernelSpec, entry: Entry) -> Result<Kernel> {
        if let Some(k) = self.functions.lock().unwrap().get(&(*spec, entry)) {
            return Ok(k.clone());
        }
        let module = self.module(spec)?;
        let function = module.load_function(&spec.symbol(entry, &self.config))?;
        let shared_bytes = match spec.kind {
            Kind::FwdTc | Kind::FwdWgmma => self.declared_shared_bytes(&module, spec)?,
            Kind::BwdTc | Kind::BwdWgmma if entry == Entry::BwdMain => {
                self.declared_shared_bytes(&module, spec)?
            }
            Kind::Decode if matches!(entry, Entry::DecodeSplit(_)) => {
                self.declared_shared_bytes(&module, spec)?
            }
            Kind::DecodeTc => self.declared_shared_bytes(&module, spec)?,
            _ => 0,
        };
        if shared_bytes as usize > self.max_shared {
            return Err(CudaError::bad_layout(
                "head_dim",
                format!(
                    "a tile that fits {} bytes of shared memory",
                    self.max_shared
                ),
                format!("{shared_bytes} bytes for padded head dim {}", spec.head_dim),
            ));
        }
        if shared_bytes > 0 {
            function.set_attribute(
                cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                shared_bytes as i32,
            )?;
        }
        let kernel = Kernel {
            function,
            shared_bytes,
        };
        self.functions
            .lock()
            .unwrap()
            .insert((*spec, entry), kernel.clone());
        Ok(kernel)
    }

    /// The module's `sdpa_shared_bytes` constant: the kernel's own shared-memory layout
    /// size, so no second formula on the host can drift from it.
    fn declared_shared_bytes(&self, module: &Arc<CudaModule>, spec: &KernelSpec) -> Result<u32> {
        let global = module.get_global("sdpa_shared_bytes", &self.stream)?;
        if global.len() != 4 {
            return Err(CudaError::Driver(format!(
                "{}: sdpa_shared_bytes is {} bytes, expected a 4-byte unsigned int",
                spec.source(),
                global.len()
            )));
        }
        let mut raw = [0u8; 4];
        self.stream.memcpy_dtoh(&global, &mut raw)?;
        self.stream.synchronize()?;
        Ok(u32::from_le_bytes(raw))
    }

    fn module(&self, spec: &KernelSpec) -> Result<Arc<CudaModule>> {
        if let Some(m) = self.modules.lock().unwrap().get(spec) {
            return Ok(m.clone());
        }
        let cubin = self.cubin(spec)?;
        let module = self.ctx.load_module(Ptx::from_binary(cubin))?;
        self.modules.lock().unwrap().insert(*spec, module.clone());
        Ok(module)
    }

    /// The cubin of `spec` for this device: from the disk cache when a previous process
    /// compiled the same source, options, compiler and arch, else from NVRTC.
    fn cubin(&self, spec: &KernelSpec) -> Result<Vec<u8>> {
        let compiled = compile(
            spec,
            self.arch,
            &self.config,
            self.disk.as_ref().ok().and_then(Option::as_ref),
        )?;
        if compiled.from_disk {
            self.loaded_from_disk.fetch_add(1, Ordering::Relaxed);
        } else {
            self.compiled.fetch_add(1, Ordering::Relaxed);
        }
        Ok(compiled.cubin)
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

fn check_libraries() -> Result<()> {
    if !driver_available() {
        return Err(CudaError::Missing {
            library: "the CUDA driver (libcuda.so)",
            hint:
                "this machine has no NVIDIA driver; run on a CUDA machine or use the CPU backends",
        });
    }
    nvrtc::nvrtc_version()?;
    Ok(())
}

/// A compiled module.
#[derive(Debug, Clone)]
pub struct Compiled {
    /// CUBIN for the requested arch.
    pub cubin: Vec<u8>,
    /// Whether it came from the disk cache.
    pub from_disk: bool,
}

/// Compiles `spec` for `sm_{arch}` under `config` with NVRTC, or reads it from `disk`.
/// A non-empty NVRTC log (a warning) is an error: the kernels compile clean or not at all.
///
/// # Errors
/// [`CudaError::Compile`] with NVRTC's log; a source that cannot be expanded.
pub fn compile(
    spec: &KernelSpec,
    arch: u32,
    config: &KernelConfig,
    disk: Option<&DiskCache>,
) -> Result<Compiled> {
    let (major, minor) = nvrtc::nvrtc_version()?;
    let source = crate::sources::expanded_source(spec.source(), config.kernel_dir())?;
    let options = spec.options(arch, config);
    let name = spec.symbol(spec.variant().entries[0], config);
    let key = cache_key(&[
        source.as_bytes(),
        options.join(" ").as_bytes(),
        format!("nvrtc {major}.{minor}").as_bytes(),
        nvrtc::nvrtc_library_identity().as_bytes(),
        format!("sm_{arch}").as_bytes(),
    ]);
    let file = format!("{name}-{}-sm{arch}", spec.dtype);
    if let Some(cubin) = disk.and_then(|d| d.load(&file, &key)) {
        return Ok(Compiled {
            cubin,
            from_disk: true,
        });
    }
    let cubin =
        nvrtc::cubin(&source, spec.source(), &options).map_err(|log| CudaError::Compile {
            kernel: name.clone(),
            arch: format!("sm_{arch}"),
            log,
        })?;
    if let Some(d) = disk {
        // A cache that cannot be written only costs the next process a compile.
        let _ = d.store(&file, &key, &cubin);
    }
    Ok(Compiled {
        cubin,
        from_disk: false,
    })
}
