//! NVRTC: one translation unit in, a cubin out. The program is a value whose `Drop`
//! destroys it, so no early return leaks it; compile errors and warnings come back
//! with NVRTC's log.

use crate::error::{CudaError, Result};
use cudarc::nvrtc::{result, sys};
use std::ffi::{c_char, CString};

/// Whether `libnvrtc` can be loaded.
pub fn nvrtc_available() -> bool {
    // SAFETY: only tries to dlopen the library by its usual names; no symbol is called.
    unsafe { sys::is_culib_present() }
}

fn missing_nvrtc() -> CudaError {
    CudaError::Missing {
        library: "NVRTC (libnvrtc.so)",
        hint: "install the CUDA toolkit or `pip install nvidia-cuda-nvrtc` and put its lib directory on LD_LIBRARY_PATH",
    }
}

/// NVRTC's version, e.g. (13, 0).
///
/// # Errors
/// [`CudaError::Missing`] when `libnvrtc` cannot be loaded.
pub fn nvrtc_version() -> Result<(i32, i32)> {
    if !nvrtc_available() {
        return Err(missing_nvrtc());
    }
    let (mut major, mut minor) = (0, 0);
    // SAFETY: the library is present (checked above); both pointers are valid for writes.
    let status = unsafe { sys::nvrtcVersion(&mut major, &mut minor) };
    if status != sys::nvrtcResult::NVRTC_SUCCESS {
        return Err(CudaError::Driver(format!("nvrtcVersion: {status:?}")));
    }
    Ok((major, minor))
}

/// Which `libnvrtc` this process loaded: its path, size and modification time, read from
/// `/proc/self/maps` once the library is loaded. NVRTC reports only major.minor, so this
/// is what tells two patch releases (or a rebuilt library) apart in the disk cache's
/// key. Empty where the map cannot be read.
pub fn nvrtc_library_identity() -> String {
    let Ok(maps) = std::fs::read_to_string("/proc/self/maps") else {
        return String::new();
    };
    let Some(path) = maps
        .lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        // The library itself, not libnvrtc-builtins, which NVRTC maps only at its first
        // compile: the identity must not change within a process.
        .find(|p| {
            p.rsplit('/')
                .next()
                .is_some_and(|name| name.starts_with("libnvrtc.so"))
        })
    else {
        return String::new();
    };
    match std::fs::metadata(path) {
        Ok(m) => {
            let mtime = m
                .modified()
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_nanos());
            format!("{path} {} {mtime}", m.len())
        }
        Err(_) => path.to_string(),
    }
}

/// A live NVRTC program, destroyed on drop.
struct Program(sys::nvrtcProgram);

impl Drop for Program {
    fn drop(&mut self) {
        // SAFETY: the program was created by `create_program` and is destroyed only here.
        let _ = unsafe { result::destroy_program(self.0) };
    }
}

impl Program {
    fn new(source: &str, name: &str) -> std::result::Result<Self, String> {
        let src = CString::new(source).map_err(|e| e.to_string())?;
        let cname = CString::new(name).map_err(|e| e.to_string())?;
        result::create_program(&src, Some(&cname))
            .map(Program)
            .map_err(|e| format!("{e:?}"))
    }

    fn log(&self) -> String {
        // SAFETY: `self.0` is a live program.
        unsafe { result::get_program_log(self.0) }
            .map(|raw| {
                let bytes: Vec<u8> = raw
                    .iter()
                    .take_while(|&&c| c != 0)
                    .map(|&c| c as u8)
                    .collect();
                String::from_utf8_lossy(&bytes).trim().to_string()
            })
            .unwrap_or_default()
    }

    fn output(&self, ptx: bool) -> std::result::Result<Vec<u8>, String> {
        let mut size = 0usize;
        // SAFETY: the program compiled; `size` is valid for writes.
        let status = unsafe {
            if ptx {
                sys::nvrtcGetPTXSize(self.0, &mut size)
            } else {
                sys::nvrtcGetCUBINSize(self.0, &mut size)
            }
        };
        if status != sys::nvrtcResult::NVRTC_SUCCESS || size == 0 {
            return Err(format!("nvrtcGet*Size: {status:?} (size {size})"));
        }
        let mut out = vec![0u8; size];
        // SAFETY: `out` has exactly the `size` bytes NVRTC asked for.
        let status = unsafe {
            if ptx {
                sys::nvrtcGetPTX(self.0, out.as_mut_ptr() as *mut c_char)
            } else {
                sys::nvrtcGetCUBIN(self.0, out.as_mut_ptr() as *mut c_char)
            }
        };
        if status != sys::nvrtcResult::NVRTC_SUCCESS {
            return Err(format!("nvrtcGet*: {status:?}"));
        }
        Ok(out)
    }
}

/// Compiles one translation unit; `ptx` picks PTX text over a cubin. Any NVRTC log
/// output (a warning of an otherwise good compile) is an error carrying the log.
fn compile(
    source: &str,
    name: &str,
    options: &[String],
    ptx: bool,
) -> std::result::Result<Vec<u8>, String> {
    let program = Program::new(source, name)?;
    // SAFETY: `program` is live; the option strings outlive the call.
    let compiled = unsafe { result::compile_program(program.0, options) };
    let log = program.log();
    match compiled {
        Err(e) => Err(format!("{e:?}\n{log}")),
        Ok(()) if !log.is_empty() => Err(log),
        Ok(()) => program.output(ptx),
    }
}

/// Compiles one translation unit to a cubin; `Err` carries the log.
pub fn cubin(source: &str, name: &str, options: &[String]) -> std::result::Result<Vec<u8>, String> {
    compile(source, name, options, false)
}

/// Compiles one translation unit to PTX text (for comparisons of generated code).
pub fn ptx(source: &str, name: &str, options: &[String]) -> std::result::Result<Vec<u8>, String> {
    compile(source, name, options, true)
}
