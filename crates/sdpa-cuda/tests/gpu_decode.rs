//! GPU tests of the decode kernels (`GpuContext::attention_with_kvcache`) against the
//! KV-cache reference (`sdpa_ref::kvcache`, f64 on the same rounded inputs): dense and
//! paged caches (block sizes 1 to 256 over shuffled tables), appends, GQA groups 1 to 8,
//! Lq from 1 to 40, head dims up to 256, causal, window, softcap and ALiBi, forced and
//! chosen splits, f32/f16/bf16. Every key slot the call must not read (past a row's
//! length, spare blocks) holds NaN, so a stray read shows. The cache after an append
//! must equal the reference's bit for bit. Bad calls are refused with nothing written.
//!
//! Ignored by default (they need a CUDA device): the GPU bundle runs them with
//! `--ignored`. `SDPA_DECODE_CASES` scales the sweep (default 160).

use ndarray::{s, Array1, Array2, Array4, ArrayD};
use sdpa_core::rng::SplitMix64;
use sdpa_core::{Causal, DType, SdpaOptions, Window};
use sdpa_cuda::{DeviceKvCache, DeviceTensor};
use sdpa_harness::compare::compare_with;
use sdpa_harness::gpu::{gpu, GpuElem};
use sdpa_harness::tolerance::{self, Tolerance};
use sdpa_harness::with_dtype;
use sdpa_ref::kvcache::{attention_with_kvcache, KvCache};

struct Rng(SplitMix64);
impl Rng {
    fn below(&mut self, n: usize) -> usize {
        (self.0.next_u64() % n as u64) as usize
    }
    fn pick<T: Copy>(&mut self, xs: &[T]) -> T {
        xs[self.below(xs.len())]
    }
    fn array(&mut self, shape: [usize; 4]) -> Array4<f64> {
        Array4::from_shape_simple_fn(shape, || self.0.symmetric())
    }
}

#[derive(Debug, Clone)]
struct Case {
    dtype: DType,
    b: usize,
    hkv: usize,
    group: usize,
    lq: usize,
    e: usize,
    ev: usize,
    lens: Vec<i32>,
    l_new: usize,
    /// 0: dense.
    block_size: usize,
    options: SdpaOptions,
    alibi: Option<ArrayD<f32>>,
    splits: Option<usize>,
    seed: u64,
}

fn random_case(rng: &mut Rng, seed: u64) -> Case {
    let dtype = rng.pick(&[DType::F16, DType::BF16, DType::F32]);
    let b = 1 + rng.below(3);
    let hkv = 1 + rng.below(2);
    let group = rng.pick(&[1, 2, 4, 8, 3]);
    let lq = rng.pick(&[1, 1, 1, 2, 5, 17, 40]);
    let e = rng.pick(&[64, 128, 40, 96, 256, 200, 8]);
    let ev = if rng.below(4) == 0 {
        8 + rng.below(249)
    } else {
        e
    };
    let long = rng.below(6) == 0;
    let cap = if long {
        3000 + rng.below(3000)
    } else {
        1 + rng.below(400)
    };
    let l_new = rng.pick(&[0, 0, 1, 3]).min(cap);
    let lens = (0..b)
        .map(|_| match rng.below(5) {
            0 => 0,
            1 => (cap - l_new).min(1) as i32,
            _ => rng.below(cap - l_new + 1) as i32,
        })
        .collect();
    let block_size = rng.pick(&[0, 0, 16, 256, 1, 3, 64]);
    let side = |rng: &mut Rng| {
        if rng.below(2) == 0 {
            -1
        } else {
            rng.below(70) as i64
        }
    };
    let window = if rng.below(3) == 0 {
        Window {
            left: side(rng),
            right: side(rng),
        }
    } else {
        Window::NONE
    };
    let options = SdpaOptions {
        causal: rng.pick(&[Causal::None, Causal::BottomRight, Causal::TopLeft]),
        window,
        softcap: (rng.below(4) == 0).then_some(5.0),
        scale: (rng.below(4) == 0).then_some(-0.3),
        enable_gqa: true,
        ..Default::default()
    };
    let hq = hkv * group;
    let alibi = match rng.below(4) {
        0 => Some(Array1::from_shape_fn(hq, |h| 0.5f32.powi(h as i32 + 1)).into_dyn()),
        1 => Some(Array2::from_shape_fn((b, hq), |(i, h)| 0.01 * (1 + i + h) as f32).into_dyn()),
        _ => None,
    };
    let splits = rng.pick(&[None, None, Some(1), Some(2), Some(5)]);
    Case {
        dtype,
        b,
        hkv,
        group,
        lq,
        e,
        ev,
        lens,
        l_new,
        block_size,
        options,
        alibi,
        splits,
        seed,
    }
}

/// The case's caches (dense `[B, Hkv, cap, E]` or paged over a shuffled table with spare
/// blocks), NaN in every slot past a row's length.
struct Caches {
    k: Array4<f64>,
    v: Array4<f64>,
    table: Option<Array2<i32>>,
}

fn caches(c: &Case, rng: &mut Rng) -> Caches {
    let cap = c.lens.iter().map(|&n| n as usize).max().unwrap_or(0) + c.l_new + rng.below(20);
    let nan_past = |mut a: Array4<f64>, lens: &[i32], axis_b: bool| {
        if axis_b {
            for (b, &n) in lens.iter().enumerate() {
                a.slice_mut(s![b, .., n as usize.., ..]).fill(f64::NAN);
            }
        }
        a
    };
    if c.block_size == 0 {
        let k = nan_past(rng.array([c.b, c.hkv, cap, c.e]), &c.lens, true);
        let v = nan_past(rng.array([c.b, c.hkv, cap, c.ev]), &c.lens, true);
        return Caches { k, v, table: None };
    }
    let bs = c.block_size;
    let per_row = cap.div_ceil(bs).max(1);
    let blocks = c.b * per_row + 2;
    let mut order: Vec<usize> = (0..blocks).collect();
    for i in (1..blocks).rev() {
        order.swap(i, rng.below(i + 1));
    }
    let table = Array2::from_shape_fn((c.b, per_row), |(b, m)| order[b * per_row + m] as i32);
    let mut k = Array4::from_elem((blocks, bs, c.hkv, c.e), f64::NAN);
    let mut v = Array4::from_elem((blocks, bs, c.hkv, c.ev), f64::NAN);
    for b in 0..c.b {
        for j in 0..c.lens[b] as usize {
            let (blk, slot) = (table[[b, j / bs]] as usize, j % bs);
            for h in 0..c.hkv {
                for d in 0..c.e {
                    k[[blk, slot, h, d]] = rng.0.symmetric();
                }
                for d in 0..c.ev {
                    v[[blk, slot, h, d]] = rng.0.symmetric();
                }
            }
        }
    }
    Caches {
        k,
        v,
        table: Some(table),
    }
}

fn nan_eq(a: &Array4<f64>, b: &Array4<f64>) -> bool {
    a.iter()
        .zip(b.iter())
        .all(|(x, y)| x == y || (x.is_nan() && y.is_nan()))
}

/// Runs one case; `Ok(true)` when it ran on the tensor-core split kernel.
fn run_case<T: GpuElem>(c: &Case) -> Result<bool, String> {
    let gpu = gpu();
    let mut rng = Rng(SplitMix64(c.seed));
    let hq = c.hkv * c.group;
    let round = |a: Array4<f64>| a.mapv(|x| if x.is_nan() { x } else { T::narrow(x).wide() });
    let q = round(rng.array([c.b, hq, c.lq, c.e]));
    let kn = round(rng.array([c.b, c.hkv, c.l_new, c.e]));
    let vn = round(rng.array([c.b, c.hkv, c.l_new, c.ev]));
    let mut cache = caches(c, &mut rng);
    cache.k = round(cache.k);
    cache.v = round(cache.v);
    let lens = Array1::from(c.lens.clone());
    let narrow = |a: &Array4<f64>| a.mapv(T::narrow);
    let up = |a: &Array4<f64>| DeviceTensor::upload(gpu, narrow(a).view()).unwrap();
    let (dq, dk, dv, dkn, dvn) = (up(&q), up(&cache.k), up(&cache.v), up(&kn), up(&vn));
    let new = (c.l_new > 0).then_some((&dkn, &dvn));
    let device_cache = match &cache.table {
        None => DeviceKvCache::Dense { k: &dk, v: &dv },
        Some(t) => DeviceKvCache::Paged {
            k: &dk,
            v: &dv,
            block_table: t.view(),
        },
    };
    let got = gpu
        .attention_with_kvcache(
            &dq,
            device_cache,
            lens.view(),
            new,
            c.alibi.as_ref().map(|a| a.view()),
            &c.options,
            c.splits,
        )
        .map_err(|e| format!("GPU call failed: {e}"))?;
    let out = got
        .out
        .download::<T>(gpu)
        .map_err(|e| e.to_string())?
        .mapv(T::wide);
    let lse = got.lse.download::<f32>(gpu).map_err(|e| e.to_string())?;
    let k_after = dk
        .download::<T>(gpu)
        .map_err(|e| e.to_string())?
        .mapv(T::wide);
    let v_after = dv
        .download::<T>(gpu)
        .map_err(|e| e.to_string())?
        .mapv(T::wide);

    let (mut rk, mut rv) = (cache.k.clone(), cache.v.clone());
    let ref_cache = match &cache.table {
        None => KvCache::Dense {
            k: rk.view_mut(),
            v: rv.view_mut(),
        },
        Some(t) => KvCache::Paged {
            k: rk.view_mut(),
            v: rv.view_mut(),
            block_table: t.view(),
        },
    };
    let truth = attention_with_kvcache(
        q.view(),
        ref_cache,
        lens.view(),
        (c.l_new > 0).then(|| (kn.view(), vn.view())),
        c.alibi.as_ref().map(|a| a.view()),
        &c.options,
    )
    .map_err(|e| format!("reference failed: {e}"))?;
    if !nan_eq(&k_after, &rk) || !nan_eq(&v_after, &rv) {
        return Err("the cache after the append differs from the reference's".into());
    }
    let tol = tolerance::for_dtype(c.dtype);
    let report = compare_with(
        out.view().into_dyn(),
        truth.out.view().into_dyn(),
        Some(&tol),
    );
    if !report.passes() {
        return Err(format!(
            "out ({} splits, tensor cores {}): {report}",
            got.splits, got.tensor_cores
        ));
    }
    let lse_tol = Tolerance {
        atol: 1e-4,
        rtol: 1e-4,
        reason: "f32 scores of at most 256 products, then one log",
    };
    let lse = lse
        .mapv(|x| x as f64)
        .into_shape_with_order(truth.lse.raw_dim())
        .unwrap();
    let report = compare_with(
        lse.view().into_dyn(),
        truth.lse.mapv(|x| x as f64).view().into_dyn(),
        Some(&lse_tol),
    );
    if !report.passes() {
        return Err(format!(
            "lse ({} splits, tensor cores {}): {report}",
            got.splits, got.tensor_cores
        ));
    }
    Ok(got.tensor_cores)
}

#[test]
#[ignore = "needs a CUDA device"]
fn decode_equals_the_kvcache_reference_over_random_caches() {
    let n: u64 = std::env::var("SDPA_DECODE_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(160);
    let mut rng = Rng(SplitMix64(0xdec0de));
    let mut failures = Vec::new();
    let (mut tc, mut scalar) = (0, 0);
    for i in 0..n {
        let case = random_case(&mut rng, 1000 + i);
        match with_dtype!(case.dtype, T => run_case::<T>(&case)) {
            Ok(true) => tc += 1,
            Ok(false) => scalar += 1,
            Err(e) => failures.push(format!("case {i} {case:?}: {e}")),
        }
    }
    println!(
        "decode: {} cases ({tc} on the tensor-core split kernel, {scalar} on the scalar one), {} failed",
        n,
        failures.len()
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // Both split kernels met the reference, not one of them only.
    assert!(
        n < 40 || (tc >= 10 && scalar >= 10),
        "tensor-core {tc}, scalar {scalar}"
    );
}

#[test]
#[ignore = "needs a CUDA device"]
fn sanitize_decode_paged_append_and_splits() {
    // The small set compute-sanitizer runs: paged with an append, forced splits, GQA.
    let mut rng = Rng(SplitMix64(77));
    for i in 0..6 {
        let mut case = random_case(&mut rng, 50 + i);
        case.block_size = [16, 3][i as usize % 2];
        case.l_new = 2;
        case.splits = Some(1 + i as usize % 3);
        case.lens = case.lens.iter().map(|&n| n.max(1)).collect();
        let r = with_dtype!(case.dtype, T => run_case::<T>(&case));
        r.unwrap_or_else(|e| panic!("case {i}: {e}"));
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn bad_calls_are_refused_before_anything_is_written() {
    let gpu = gpu();
    let q = DeviceTensor::upload(gpu, Array4::<half::f16>::zeros((2, 4, 1, 64)).view()).unwrap();
    let host_k = Array4::<half::f16>::from_elem((5, 16, 2, 64), half::f16::ONE);
    let k = DeviceTensor::upload(gpu, host_k.view()).unwrap();
    let kn = DeviceTensor::upload(gpu, Array4::<half::f16>::zeros((2, 2, 1, 64)).view()).unwrap();
    let opts = SdpaOptions::default();
    let call = |table: &Array2<i32>, lens: &[i32], splits| {
        let lens = Array1::from(lens.to_vec());
        gpu.attention_with_kvcache(
            &q,
            DeviceKvCache::Paged {
                k: &k,
                v: &k,
                block_table: table.view(),
            },
            lens.view(),
            Some((&kn, &kn)),
            None,
            &opts,
            splits,
        )
        .map(|_| ())
        .map_err(|e| e.to_string())
    };
    let bad = Array2::from_shape_vec((2, 2), vec![0, 1, 2, 7]).unwrap();
    let e = call(&bad, &[3, 20], None).unwrap_err();
    assert!(
        e.contains("block_table") && e.contains("batch row 1, entry 1: 7"),
        "{e}"
    );
    let good = Array2::from_shape_vec((2, 2), vec![0, 1, 2, 3]).unwrap();
    let e = call(&good, &[3, 32], None).unwrap_err();
    assert!(
        e.contains("cache_seqlens") && e.contains("batch row 1: 32 + 1"),
        "{e}"
    );
    let e = call(&good, &[3, 4], Some(0)).unwrap_err();
    assert!(e.contains("num_splits"), "{e}");
    gpu.synchronize().unwrap();
    assert_eq!(
        k.download::<half::f16>(gpu).unwrap(),
        host_k,
        "a refused call wrote the cache"
    );
    // f64 has no decode kernel: refused by name.
    let q64 = DeviceTensor::upload(gpu, Array4::<f64>::zeros((1, 1, 1, 8)).view()).unwrap();
    let k64 = DeviceTensor::upload(gpu, Array4::<f64>::zeros((1, 1, 4, 8)).view()).unwrap();
    let lens = Array1::from(vec![2]);
    let e = gpu
        .attention_with_kvcache(
            &q64,
            DeviceKvCache::Dense { k: &k64, v: &k64 },
            lens.view(),
            None,
            None,
            &opts,
            None,
        )
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with("query") && e.contains("f32, f16 or bf16"),
        "{e}"
    );
}
