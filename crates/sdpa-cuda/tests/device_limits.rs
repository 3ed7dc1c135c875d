//! Device tests at the edges: many processes on a cold kernel cache, device
//! out-of-memory as an error, a context on the caller's stream with borrowed tensors,
//! and the kernels' own shared-memory sizes. Run on a CUDA machine (the GPU bundle).

use half::f16;
use ndarray::Array4;
use sdpa_core::{Backend, BackendSet, Causal, DType, Layout, SdpaOptions};
use sdpa_cuda::spec::{Entry, KernelSpec, Kind};
use sdpa_cuda::{CudaError, DeviceTensor, GpuContext, KernelConfig};
use std::process::Command;

const CHILD: &str = "SDPA_DEVICE_LIMITS_CHILD_CACHE";

/// One flash call on a fresh context whose disk cache is `dir`: what each child
/// process of the cold-cache test runs. Returns (compiled, loaded from disk).
fn flash_once(dir: &std::path::Path) -> (usize, usize) {
    let config = KernelConfig::default().with_cache_dir(Some(dir.to_path_buf()));
    let gpu = GpuContext::with_config(0, config).expect("device 0");
    assert_eq!(gpu.disk_cache_refused(), None);
    let a = Array4::from_shape_fn((1, 2, 33, 64), |(_, h, i, e)| {
        f16::from_f32(((h * 5 + i * 3 + e) % 11) as f32 * 0.05)
    });
    let r = gpu
        .sdpa_host(
            a.view(),
            a.view(),
            a.view(),
            None,
            &SdpaOptions {
                causal: Causal::TopLeft,
                ..Default::default()
            },
            BackendSet::only(Backend::Flash),
        )
        .expect("flash runs");
    assert!(r.out.iter().all(|x| x.is_finite()));
    gpu.compile_counts()
}

#[test]
#[ignore = "needs a CUDA device"]
fn many_processes_on_a_cold_cache_all_succeed() {
    if let Some(dir) = std::env::var_os(CHILD) {
        let (compiled, loaded) = flash_once(std::path::Path::new(&dir));
        println!("child: compiled {compiled}, loaded {loaded}");
        return;
    }
    let dir = std::env::temp_dir().join(format!("sdpa-cold-cache-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let me = std::env::current_exe().unwrap();
    let children: Vec<_> = (0..8)
        .map(|_| {
            Command::new(&me)
                .args([
                    "--ignored",
                    "--exact",
                    "many_processes_on_a_cold_cache_all_succeed",
                    "--nocapture",
                ])
                .env(CHILD, &dir)
                .spawn()
                .expect("child starts")
        })
        .collect();
    for child in children {
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "a child failed: {:?}", out.status);
    }
    // Every entry whole and digest-checked, no temp file left: a warm context loads
    // from disk and compiles nothing.
    let names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        names.iter().all(|n| n.ends_with(".cubin")),
        "left behind: {names:?}"
    );
    assert!(!names.is_empty());
    assert_eq!(flash_once(&dir), (0, 1));
    // A corrupted entry is deleted and recompiled, never loaded.
    for n in &names {
        let path = dir.join(n);
        let mut bytes = std::fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0x5a;
        std::fs::write(&path, bytes).unwrap();
    }
    assert_eq!(flash_once(&dir), (1, 0));
    assert_eq!(flash_once(&dir), (0, 1));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
#[ignore = "needs a CUDA device"]
fn device_out_of_memory_is_an_error_with_the_sizes() {
    let gpu = GpuContext::new(0).expect("device 0");
    let (free, _total) = gpu.cuda().mem_get_info().unwrap();
    // Twice the free memory in one tensor: the allocation fails, the context survives.
    let elements = free / 2 * 2 + (1 << 20);
    let err = DeviceTensor::alloc(&gpu, DType::F32, [1, 1, elements, 1]).unwrap_err();
    match &err {
        CudaError::OutOfMemory { bytes, .. } => assert_eq!(*bytes, elements * 4),
        other => panic!("expected OutOfMemory, got {other}"),
    }
    assert!(
        err.to_string().contains(&(elements * 4).to_string()),
        "{err}"
    );
    // An attention call whose output cannot fit: an error, then the device still works.
    let len = 1 << 20;
    let q = DeviceTensor::alloc(&gpu, DType::F16, [1, 1, 1, 64]).unwrap();
    let wide = q
        .view([64, 4096, len, 64], [0, 0, 0, 1], 0)
        .expect("a stride-0 view needs no memory");
    let err = gpu
        .sdpa(
            &wide,
            &wide,
            &wide,
            None,
            &SdpaOptions::default(),
            BackendSet::ALL,
        )
        .unwrap_err();
    assert!(
        matches!(
            err,
            CudaError::OutOfMemory { .. } | CudaError::BadLayout { .. }
        ),
        "{err}"
    );
    assert_eq!(flash_once_on(&gpu), 33 * 2 * 64);
}

fn flash_once_on(gpu: &GpuContext) -> usize {
    let a = Array4::from_elem((1, 2, 33, 64), f16::from_f32(0.5));
    let r = gpu
        .sdpa_host(
            a.view(),
            a.view(),
            a.view(),
            None,
            &SdpaOptions::default(),
            BackendSet::ALL,
        )
        .unwrap();
    r.out.iter().filter(|x| x.is_finite()).count()
}

#[test]
#[ignore = "needs a CUDA device"]
fn a_context_on_the_callers_stream_runs_on_borrowed_memory() {
    let owner = GpuContext::new(0).expect("device 0");
    // Memory and a stream the "framework" owns.
    let stream = owner.cuda().new_stream().unwrap();
    let gpu = GpuContext::on_stream(stream.clone(), KernelConfig::default()).unwrap();
    let host = Array4::from_shape_fn((2, 4, 50, 32), |(b, h, i, e)| {
        f16::from_f32(((b * 7 + h * 5 + i * 3 + e) % 13) as f32 * 0.03 - 0.2)
    });
    let owned = DeviceTensor::upload(&owner, host.view()).unwrap();
    owner.synchronize().unwrap();
    let bytes = host.len() * 2;
    let ptr = owned.address(&owner);
    // SAFETY: `owned` keeps the allocation alive for the whole test, on the same device
    // context; nothing else writes it while `gpu` runs.
    let borrowed = unsafe {
        DeviceTensor::from_raw(
            &gpu,
            ptr,
            bytes,
            DType::F16,
            Layout::contiguous([2, 4, 50, 32]),
            0,
        )
    }
    .unwrap();
    let r = gpu
        .sdpa(
            &borrowed,
            &borrowed,
            &borrowed,
            None,
            &SdpaOptions::default(),
            BackendSet::ALL,
        )
        .unwrap();
    let got = r.out.download::<f16>(&gpu).unwrap();
    let want = owner
        .sdpa_host(
            host.view(),
            host.view(),
            host.view(),
            None,
            &SdpaOptions::default(),
            BackendSet::ALL,
        )
        .unwrap();
    assert_eq!(
        got, want.out,
        "the same kernel on borrowed memory and another stream"
    );
    // A view past the lent bytes is refused, not read.
    // SAFETY: as above; the call must fail before any access.
    let past = unsafe {
        DeviceTensor::from_raw(
            &gpu,
            ptr,
            bytes - 2,
            DType::F16,
            Layout::contiguous([2, 4, 50, 32]),
            0,
        )
    };
    assert!(past.is_err());
}

#[test]
#[ignore = "needs a CUDA device"]
fn shared_memory_comes_from_the_kernels() {
    let gpu = GpuContext::new(0).expect("device 0");
    let config = KernelConfig::default();
    // The kernels' own sizes (sdpa_shared_bytes) for the default tiles, as the layouts
    // in kernels/fwd/ give them: mma.sync (BM + 4 BN) * (D + 8) * 2, Hopper 1 KiB +
    // (BM + 4 BN) * D * 2.
    for head_dim in [64u32, 128, 256] {
        let spec = KernelSpec::fitting(Kind::FwdTc, DType::F16, head_dim as usize, false).unwrap();
        let t = config.tc_tiles(head_dim);
        let k = gpu.kernel(&spec, Entry::Forward).unwrap();
        assert_eq!(
            k.shared_bytes,
            (t.block_rows() + 4 * t.block_n) * (head_dim + 8) * 2,
            "tc d={head_dim}"
        );
    }
    if gpu.arch() == 90 {
        for head_dim in [32u32, 64, 96, 128, 192, 256] {
            let spec =
                KernelSpec::fitting(Kind::FwdWgmma, DType::BF16, head_dim as usize, false).unwrap();
            let t = config.wg_tiles(head_dim);
            let k = gpu.kernel(&spec, Entry::Forward).unwrap();
            assert_eq!(
                k.shared_bytes,
                1024 + (t.block_rows() + 4 * t.block_n) * head_dim * 2,
                "wgmma d={head_dim}"
            );
        }
    }
}
