//! `--device cuda`: libtorch's CUDA results for the f32/f16/bf16 cases, one file per
//! PyTorch backend that accepts the case (`golden/cuda/NAME.BACKEND.safetensors`). The
//! inputs and truth stay in the CPU case file `NAME.safetensors`; these files hold `out`
//! and, as metadata, `case` (its name) and `torch_backend` = `cuda_flash`, `cuda_efficient`,
//! `cuda_cudnn` or `cuda_math` (`cuda_math_dropout_mask` for dropout cases, where the
//! fused kernels' own RNG could not match the spec's Philox stream).
//!
//! Needs a binary built with `SDPA_GOLDEN_CUDA=1` (see build.rs), so libtorch_cuda is
//! loaded and registers the CUDA kernels.

use crate::cases::{Case, DType};
use crate::inputs::make_inputs;
use crate::torch::{torch_math, Sdpa};
use crate::{manifest, write, Result};
use sdpa_manifest::{CudaResult, Manifest};
use std::path::Path;
use tch::{Device, Tensor};

/// Opaque `at::Context`.
#[repr(C)]
struct Context {
    _private: [u8; 0],
}

// tch exposes no `sdpa_kernel`; these are libtorch_cpu's exported `at::Context`
// setters (Itanium C++ ABI: a non-virtual member function takes `this` first, like a C
// function), the same calls `torch.nn.attention.sdpa_kernel` makes.
extern "C" {
    #[link_name = "_ZN2at13globalContextEv"]
    fn at_global_context() -> *mut Context;
    #[link_name = "_ZN2at7Context14setSDPUseFlashEb"]
    fn at_set_sdp_use_flash(ctx: *mut Context, enabled: bool);
    #[link_name = "_ZN2at7Context21setSDPUseMemEfficientEb"]
    fn at_set_sdp_use_mem_efficient(ctx: *mut Context, enabled: bool);
    #[link_name = "_ZN2at7Context14setSDPUseCuDNNEb"]
    fn at_set_sdp_use_cudnn(ctx: *mut Context, enabled: bool);
    #[link_name = "_ZN2at7Context13setSDPUseMathEb"]
    fn at_set_sdp_use_math(ctx: *mut Context, enabled: bool);
}

const BACKENDS: [&str; 4] = ["flash", "efficient", "cudnn", "math"];

/// Cases whose `out` is larger than this get no CUDA results: `golden/` must stay under
/// 16 MB, and the smaller cases already cover every bullet (the GPU test still runs the
/// large ones against the CPU case's libtorch result). 6 KiB keeps about 180 of the
/// 260 f32/f16/bf16 cases, ~1.4 MB for all their backends.
pub const MAX_OUT_BYTES: usize = 6 * 1024;

fn out_bytes(case: &Case) -> usize {
    let width = if case.dtype == DType::F32 { 4 } else { 2 };
    case.b * case.hq * case.l * case.ev * width
}

/// Enables exactly one SDPA backend for the calls that follow.
fn enable_only(backend: &str) {
    // SAFETY: `at::globalContext()` returns a reference to libtorch's process-wide
    // context, valid for the life of the process; the setters only store a bool in it,
    // and this program calls libtorch from one thread.
    unsafe {
        let ctx = at_global_context();
        at_set_sdp_use_flash(ctx, backend == "flash");
        at_set_sdp_use_mem_efficient(ctx, backend == "efficient");
        at_set_sdp_use_cudnn(ctx, backend == "cudnn");
        at_set_sdp_use_math(ctx, backend == "math");
    }
}

fn command_line(program: &str, args: &[&str]) -> String {
    std::process::Command::new(program)
        .args(args)
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

pub fn generate(cases: &[Case], dir: &Path, libtorch: &str) -> Result<()> {
    if !tch::Cuda::is_available() {
        return Err(
            "--device cuda: libtorch sees no CUDA device (is the binary built with \
                    SDPA_GOLDEN_CUDA=1, and are torch 2.11's CUDA libraries and a GPU there?)"
                .into(),
        );
    }
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let device = Device::Cuda(0);
    let mut entries = Vec::new();
    let mut skipped = Vec::new();
    for case in cases.iter().filter(|c| c.dtype != DType::F64) {
        crate::tick(&case.name);
        if out_bytes(case) > MAX_OUT_BYTES {
            skipped.push(case.name.clone());
            continue;
        }
        let x = make_inputs(case).to_device(device);
        let mut results: Vec<(String, std::result::Result<Tensor, String>)> = Vec::new();
        if case.dropout.is_active() {
            enable_only("math");
            let out = torch_math(case, &x).map_err(|e| e.to_string());
            results.push(("math_dropout_mask".into(), out));
        } else {
            for backend in BACKENDS {
                enable_only(backend);
                let out = Sdpa::of(case, &x)
                    .run()
                    .map_err(|e| e.to_string().lines().next().unwrap_or("").to_owned());
                results.push((backend.into(), out));
            }
        }
        for (backend, out) in results {
            match out {
                Ok(out) => {
                    let file = format!("{}.{backend}.safetensors", case.name);
                    // Only what names the result: options, inputs and truth are in the
                    // CPU case file, and every header byte counts against the 16 MB.
                    let meta = vec![
                        ("case".to_owned(), case.name.clone()),
                        ("torch_backend".to_owned(), format!("cuda_{backend}")),
                    ];
                    let bytes = write::case_file(&dir.join(&file), &[("out", &out)], &meta)?;
                    entries.push(CudaResult {
                        backend,
                        bytes: Some(bytes),
                        case: case.name.clone(),
                        file: Some(file),
                        rejected: None,
                    });
                }
                Err(reason) => entries.push(CudaResult {
                    backend,
                    bytes: None,
                    case: case.name.clone(),
                    file: None,
                    rejected: Some(reason),
                }),
            }
        }
    }
    enable_only("all");
    let gpu = command_line(
        "nvidia-smi",
        &["--query-gpu=name,driver_version", "--format=csv,noheader"],
    );
    let manifest = Manifest {
        date: Some(command_line("date", &["-u", "+%Y-%m-%d"])),
        device: Some(gpu),
        inputs_and_truth: Some("the CPU case file NAME.safetensors in the folder above".into()),
        max_out_bytes: Some(MAX_OUT_BYTES),
        results: Some(entries),
        skipped_larger_than_max_out_bytes: Some(skipped),
        // As the committed golden/cuda/manifest.json has it, though the crate moved.
        ..manifest::base(
            libtorch,
            "ci/golden.sh --device cuda -> crates/sdpa-golden --device cuda",
        )
    };
    manifest::write(dir, &manifest)?;
    eprintln!("sdpa-golden: CUDA results into {}", dir.display());
    Ok(())
}
