//! Compiles every kernel variant the dispatcher can ask for, for sm_80 and sm_90, with
//! NVRTC (no GPU needed), failing on any error or warning. Needs libnvrtc:
//! `bash ci/nvrtc.sh` installs the wheel and runs this with `--ignored`.

use sdpa_cuda::kernels::{compile, nvrtc_version, KernelSpec};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

#[test]
#[ignore = "needs libnvrtc (ci/nvrtc.sh provides it)"]
fn every_variant_compiles_clean_for_sm80_and_sm90() {
    let (major, minor) = nvrtc_version().expect("libnvrtc loads");
    let jobs: Vec<(KernelSpec, u32)> = KernelSpec::all()
        .into_iter()
        .flat_map(|spec| [(spec, 80), (spec, 90)])
        .filter(|(spec, arch)| spec.runs_on(*arch))
        .collect();
    let next = AtomicUsize::new(0);
    let failures = Mutex::new(Vec::new());
    let threads = std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .min(8);
    let started = std::time::Instant::now();
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some((spec, arch)) = jobs.get(i) else {
                    break;
                };
                match compile(spec, *arch, None) {
                    Ok(c) => assert!(!c.cubin.is_empty()),
                    Err(e) => failures.lock().unwrap().push(e.to_string()),
                }
            });
        }
    });
    let failures = failures.into_inner().unwrap();
    println!(
        "nvrtc {major}.{minor}: {} compiles (every variant for each arch it runs on: sm_80, sm_90; the Hopper kernel sm_90a only) in {:.1} s on {threads} threads, {} failed",
        jobs.len(),
        started.elapsed().as_secs_f64(),
        failures.len()
    );
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
#[ignore = "needs libnvrtc (ci/nvrtc.sh provides it)"]
fn module_kernels_compile_clean_for_sm80_and_sm90() {
    nvrtc_version().expect("libnvrtc loads");
    for arch in [80, 90] {
        if let Err(e) = sdpa_cuda::nn::compile_check(arch) {
            panic!("kernels/nn/nn.cu for sm_{arch}: {e}");
        }
    }
}
