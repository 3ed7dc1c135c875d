//! Compiles every module of the kernel table (attention, math and the module's nn
//! kernels), for sm_80 and sm_90, with
//! NVRTC (no GPU needed), failing on any error or warning. Needs libnvrtc:
//! `bash ci/nvrtc.sh` installs the wheel and runs this with `--ignored`.

use sdpa_cuda::nvrtc::nvrtc_version;
use sdpa_cuda::spec::KernelSpec;
use sdpa_cuda::{compile, KernelConfig};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

#[test]
#[ignore = "needs libnvrtc (ci/nvrtc.sh provides it)"]
fn every_variant_compiles_clean_for_sm80_and_sm90() {
    let (major, minor) = nvrtc_version().expect("libnvrtc loads");
    let config = KernelConfig::default().with_cache_dir(None);
    let jobs: Vec<(KernelSpec, u32)> = KernelSpec::all()
        .into_iter()
        .flat_map(|spec| [(spec, 80), (spec, 90)])
        .filter(|(spec, arch)| spec.runs_on(*arch))
        // SDPA_NVRTC_ONLY=<source prefix> (e.g. `decode/`) compiles one family while
        // a kernel is being written; CI sets nothing and compiles all.
        .filter(|(spec, _)| {
            std::env::var("SDPA_NVRTC_ONLY").map_or(true, |only| spec.source().starts_with(&only))
        })
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
                match compile(spec, *arch, &config, None) {
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
