//! The golden cases (`golden/`, libtorch 2.11) through every CUDA backend that accepts
//! each, judged by DESIGN.md's tolerance policy with `sdpa_harness::judge`:
//! - against the CPU case: within 2x of libtorch's CPU error in the case dtype (plus the
//!   dtype's floor), the lse within `judge::LSE`, never non-finite where the truth is
//!   finite;
//! - where `golden/cuda/` holds libtorch's CUDA result for the case
//!   (`NAME.BACKEND.safetensors`, ci/gpu_goldens.sh): within 2x of libtorch's CUDA
//!   error as well, taking libtorch's result of the same backend (flash, efficient,
//!   math) or, where libtorch's backend rejected the case, libtorch's CUDA math result
//!   (`math_dropout_mask` for dropout cases: the spec's keep-mask fed to the math path).
//!   A comparison is skipped only where that file does not exist.
//!
//! Ignored by default (needs a CUDA device); the GPU bundle's run.sh runs it with
//! `--ignored`. The goldens are read at run time from `SDPA_GOLDEN_DIR` (run.sh points
//! it at the working tree's golden/, so a golden/cuda/ made earlier in the same session
//! on the device is used), else from the source tree. The context is the suites' shared
//! one (`sdpa_harness::gpu::gpu`): outputs poisoned (NaN) before every launch, kernels
//! configured from the environment (`SDPA_KERNEL_DIR` for planted-bug runs).

use ndarray::{ArrayD, ArrayView4, Ix4};
use sdpa_core::{check_support, Backend, BackendSet, DType, Device};
use sdpa_cuda::{DeviceElement, GpuContext, HostMask};
use sdpa_harness::case::{read_tensor_file, Case};
use sdpa_harness::golden::golden_dir;
use sdpa_harness::{judge, run, Tensor};
use serde_json::Value;
use std::collections::BTreeSet;
use std::path::Path;

fn read_json(path: &Path) -> Result<Value, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
}

fn four<'a, T>(name: &str, a: &'a ArrayD<T>) -> Result<ArrayView4<'a, T>, String> {
    a.view()
        .into_dimensionality::<Ix4>()
        .map_err(|_| format!("{name}: expected 4 dims, got {:?}", a.shape()))
}

/// Runs `case` on `backend` in its dtype `T`: (out, lse) as the harness holds them.
#[allow(clippy::too_many_arguments)]
fn run_typed<T: DeviceElement>(
    gpu: &GpuContext,
    case: &Case,
    backend: Backend,
    q: &ArrayD<T>,
    k: &ArrayD<T>,
    v: &ArrayD<T>,
    mask: Option<HostMask<'_, T>>,
    wrap: fn(ArrayD<T>) -> Tensor,
) -> Result<(Tensor, ArrayD<f32>), String> {
    let got = gpu
        .sdpa_host(
            four("q", q)?,
            four("k", k)?,
            four("v", v)?,
            mask.as_ref(),
            &case.options,
            BackendSet::only(backend),
        )
        .map_err(|e| format!("CUDA call failed: {e}"))?;
    if got.backend != backend {
        return Err(format!("ran {} instead of {backend}", got.backend));
    }
    Ok((wrap(got.out.into_dyn()), got.lse.into_dyn()))
}

fn run_cuda(
    gpu: &GpuContext,
    case: &Case,
    backend: Backend,
) -> Result<(Tensor, ArrayD<f32>), String> {
    macro_rules! typed {
        ($variant:ident) => {{
            let (Tensor::$variant(q), Tensor::$variant(k), Tensor::$variant(v)) =
                (&case.q, &case.k, &case.v)
            else {
                return Err("q, k, v: expected one dtype".into());
            };
            let mask = match &case.attn_mask {
                None => None,
                Some(Tensor::Bool(m)) => Some(HostMask::Bool(m.view())),
                Some(Tensor::$variant(m)) => Some(HostMask::Additive(m.view())),
                Some(other) => {
                    return Err(format!(
                        "attn_mask: expected bool or the case dtype, got {}",
                        other.dtype_name()
                    ))
                }
            };
            run_typed(gpu, case, backend, q, k, v, mask, Tensor::$variant)
        }};
    }
    match case.q {
        Tensor::F64(_) => typed!(F64),
        Tensor::F32(_) => typed!(F32),
        Tensor::F16(_) => typed!(F16),
        Tensor::BF16(_) => typed!(BF16),
        Tensor::Bool(_) | Tensor::I32(_) => Err(format!(
            "q: expected a float dtype, got {}",
            case.q.dtype_name()
        )),
    }
}

/// `golden/cuda/`'s files, checked one to one against its manifest; `None` where the
/// folder does not exist.
fn cuda_files(dir: &Path, problems: &mut Vec<String>) -> Option<BTreeSet<String>> {
    if !dir.is_dir() {
        return None;
    }
    let manifest = match read_json(&dir.join("manifest.json")) {
        Ok(m) => m,
        Err(e) => {
            problems.push(e);
            return Some(BTreeSet::new());
        }
    };
    let listed: BTreeSet<String> = manifest["results"]
        .as_array()
        .map(|r| {
            r.iter()
                .filter_map(|e| e["file"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    let on_disk: BTreeSet<String> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|d| {
            d.expect("dir entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .filter(|n| n.ends_with(".safetensors"))
        .collect();
    for f in listed.difference(&on_disk) {
        problems.push(format!("golden/cuda/{f}: in manifest.json, no such file"));
    }
    for f in on_disk.difference(&listed) {
        problems.push(format!("golden/cuda/{f}: not in manifest.json"));
    }
    println!(
        "golden/cuda: {} results from {} (libtorch {})",
        on_disk.len(),
        manifest["device"],
        manifest["libtorch"]
    );
    Some(on_disk)
}

/// The case with libtorch's CUDA result in place of its CPU `out`.
fn with_cuda_out(case: &Case, dir: &Path, file: &str, dtype: DType) -> Result<Case, String> {
    let path = dir.join(file);
    let bytes = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let f = read_tensor_file(&bytes).map_err(|e| format!("golden/cuda/{file}: {e}"))?;
    let out = f
        .tensors
        .get("out")
        .ok_or(format!("golden/cuda/{file}: no tensor out"))?;
    let cpu_out = case.result("out").ok_or("the CPU case has no out")?;
    if out.dtype() != Some(dtype) || out.shape() != cpu_out.shape() {
        return Err(format!(
            "golden/cuda/{file}: tensor out: expected {} {:?}, got {} {:?}",
            dtype.name(),
            cpu_out.shape(),
            out.dtype_name(),
            out.shape()
        ));
    }
    if f.metadata.get("case").map(String::as_str) != case.name() {
        return Err(format!(
            "golden/cuda/{file}: metadata case {:?}, expected {:?}",
            f.metadata.get("case"),
            case.name()
        ));
    }
    let mut c = case.clone();
    c.results.insert("out".into(), out.clone());
    Ok(c)
}

fn torch_name(backend: Backend) -> &'static str {
    match backend {
        Backend::Flash => "flash",
        Backend::Efficient => "efficient",
        Backend::Math => "math",
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn golden_cases_pass_on_every_cuda_backend() {
    let gpu = sdpa_harness::gpu::gpu();
    let dir = golden_dir();
    let manifest = read_json(&dir.join("manifest.json")).unwrap_or_else(|e| panic!("{e}"));
    let entries = manifest["cases"]
        .as_array()
        .expect("manifest.json: `cases` is an array");
    assert!(!entries.is_empty(), "golden/manifest.json lists no case");
    let mut problems = Vec::new();
    let cuda_dir = dir.join("cuda");
    let cuda = cuda_files(&cuda_dir, &mut problems);
    let (mut runs, mut cuda_checks, mut cuda_missing) = (0usize, 0usize, 0usize);
    let mut worst = (0.0f64, String::new());
    let mut worst_cuda = (0.0f64, String::new());
    for entry in entries {
        let name = entry["name"].as_str().unwrap_or("?");
        let file = entry["file"].as_str().unwrap_or("?");
        let case = match Case::read(dir.join(file)) {
            Ok(c) => c,
            Err(e) => {
                problems.push(format!("{name}: {e}"));
                continue;
            }
        };
        let problem = match run::problem(&case) {
            Ok(p) => p,
            Err(e) => {
                problems.push(format!("{name}: the spec rejects it: {e}"));
                continue;
            }
        };
        let dtype = problem.dtype;
        let backends: Vec<Backend> = Backend::PRIORITY
            .into_iter()
            .filter(|&b| check_support(b, &problem, Device::Cuda).is_ok())
            .collect();
        if backends.is_empty() {
            problems.push(format!("{name}: no CUDA backend accepts it"));
        }
        for backend in backends {
            runs += 1;
            let label = format!("{name} on {backend}");
            let (out, lse) = match run_cuda(gpu, &case, backend) {
                Ok(r) => r,
                Err(e) => {
                    problems.push(format!("{label}: {e}"));
                    continue;
                }
            };
            match judge::judge(&case, dtype, &out, Some(&lse)) {
                Ok(v) if v.passed => {
                    if let Some(bound) = v.bound {
                        if v.ours.max_abs / bound > worst.0 {
                            worst = (v.ours.max_abs / bound, label.clone());
                        }
                    }
                }
                Ok(v) => problems.push(format!("{label} vs libtorch CPU: {v}")),
                Err(e) => problems.push(format!("{label}: {e}")),
            }
            let Some(cuda) = &cuda else { continue };
            if dtype == DType::F64 {
                continue;
            }
            let candidates = if case.options.dropout.is_active() {
                vec!["math_dropout_mask"]
            } else {
                vec![torch_name(backend), "math"]
            };
            let Some(peer) = candidates
                .iter()
                .map(|b| format!("{name}.{b}.safetensors"))
                .find(|f| cuda.contains(f))
            else {
                cuda_missing += 1;
                continue;
            };
            cuda_checks += 1;
            match with_cuda_out(&case, &cuda_dir, &peer, dtype)
                .and_then(|c| judge::judge(&c, dtype, &out, Some(&lse)).map_err(|e| e.to_string()))
            {
                Ok(v) if v.passed => {
                    if let Some(bound) = v.bound {
                        if v.ours.max_abs / bound > worst_cuda.0 {
                            worst_cuda = (v.ours.max_abs / bound, format!("{label} vs {peer}"));
                        }
                    }
                }
                Ok(v) => problems.push(format!("{label} vs libtorch CUDA ({peer}): {v}")),
                Err(e) => problems.push(format!("{label}: {e}")),
            }
        }
    }
    println!(
        "golden on CUDA ({}): {} cases, {runs} backend runs; closest to the CPU-peer bound: {} at {:.2}; \
         {cuda_checks} runs also against libtorch CUDA ({}), closest: {} at {:.2}; {cuda_missing} runs with no libtorch CUDA result",
        gpu.name(),
        entries.len(),
        worst.1,
        worst.0,
        if cuda.is_some() { "golden/cuda/" } else { "no golden/cuda/ here" },
        worst_cuda.1,
        worst_cuda.0
    );
    assert!(
        problems.is_empty(),
        "{} golden problem(s) on CUDA:\n{}",
        problems.len(),
        problems.join("\n")
    );
}

/// The KV-cache goldens (`golden/kvcache/`, libtorch over the gathered pages) through
/// the CUDA decode kernels: `out` within 2x of libtorch's CPU error in the case dtype
/// plus the dtype's floor, the lse within `judge::LSE` of `lse_f64`, the appended caches
/// bit for bit equal to `k_cache_after` / `v_cache_after`.
#[test]
#[ignore = "needs a CUDA device"]
fn kvcache_goldens_pass_on_the_decode_kernels() {
    use sdpa_harness::compare::{compare, compare_with};
    use sdpa_harness::kvcase::run_kvcache;
    use sdpa_harness::tolerance::{peer_floor, PEER_FACTOR};
    let gpu = sdpa_harness::gpu::gpu();
    let exec = sdpa::Exec::cuda(gpu);
    let cases = sdpa_harness::golden::kvcache_cases().unwrap_or_else(|e| panic!("{e}"));
    assert!(cases.len() >= 10, "{} KV-cache goldens", cases.len());
    let mut failures = Vec::new();
    for (name, case) in &cases {
        let dtype = case.q.dtype().expect("floating-point q");
        if dtype == DType::F64 {
            // The decode kernels take f32, f16 and bf16; an f64 case is refused by name.
            let e = run_kvcache(case, &exec).unwrap_err().to_string();
            assert!(e.contains("query") || e.contains("f64"), "{name}: {e}");
            continue;
        }
        let truth = case.result("out_f64").unwrap().to_f64();
        let peer = compare(case.result("out").unwrap().to_f64().view(), truth.view());
        let bound = PEER_FACTOR * peer.max_abs + peer_floor(dtype);
        let r = match run_kvcache(case, &exec) {
            Ok(r) => r,
            Err(e) => {
                failures.push(format!("{name}: {e}"));
                continue;
            }
        };
        let ours = compare(r.out.to_f64().view(), truth.view());
        let line = format!(
            "{name} ({} splits): max|gpu - truth| {:.3e}, max|libtorch - truth| {:.3e}, bound {bound:.3e}",
            r.splits, ours.max_abs, peer.max_abs
        );
        println!("{line}");
        if ours.non_finite > 0 || ours.max_abs.is_nan() || ours.max_abs > bound {
            failures.push(line);
        }
        let lse = compare_with(
            r.lse.mapv(f64::from).view(),
            case.result("lse_f64").unwrap().to_f64().view(),
            Some(&judge::LSE),
        );
        if !lse.passes() {
            failures.push(format!("{name}: lse {lse}"));
        }
        for (what, got) in [("k_cache_after", &r.k_cache), ("v_cache_after", &r.v_cache)] {
            if got.as_ref() != case.result(what) {
                failures.push(format!("{name}: {what} differs (or only one side has it)"));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
