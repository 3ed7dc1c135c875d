//! GPU tests: each CUDA backend against the f64 reference (`sdpa-ref`) over random
//! shapes, masks, seeds and dtypes; dropout keep decisions bit for bit; varlen against
//! the padded dense reference; strided views; errors before launch. Outputs are
//! poisoned with NaN before every launch and must come back fully written.
//!
//! Ignored by default (they need a CUDA device): the GPU bundle's `run.sh` runs them
//! with `--ignored`. `PROPTEST_CASES` scales the property tests (default 48 each).
//! Tests named `sanitize_*` are the small set compute-sanitizer runs.

use half::f16;
use ndarray::{Array, Array4, ArrayD, Axis, IxDyn};
use sdpa_core::{Backend, BackendSet, Causal, DType, Dropout, SdpaOptions};
use sdpa_cuda::{CudaError, DeviceSeqlens, DeviceTensor, GpuContext, HostMask, Varlen};
use sdpa_harness::compare::compare_with;
use sdpa_harness::elem::Elem;
use sdpa_harness::gpu::{self, gpu, gpu_case, gpu_case_mods, random, GpuCase, GpuElem};
use sdpa_harness::strategies::{MaskSpec, ProblemSpec, SplitMix64};
use sdpa_harness::tolerance::{self, Tolerance};
use sdpa_harness::with_dtype;

/// Default number of cases of each property (`PROPTEST_CASES` overrides it).
const CASES: u32 = 48;

/// Runs one case on `backends` (`expect` must be the one dispatch picks) and compares
/// out and lse with the f64 reference on the same rounded inputs.
fn check_case<T: GpuElem>(
    case: &GpuCase,
    backends: BackendSet,
    expect: Backend,
) -> Result<(), String> {
    let gpu = gpu();
    let x = case.inputs::<T>();
    let host_mask = match (&x.bool_mask, &x.additive_mask) {
        (Some(b), _) => Some(HostMask::Bool(b.view())),
        (_, Some(a)) => Some(HostMask::Additive(a.view())),
        _ => None,
    };
    let options = &case.problem.options;
    let slopes = case.alibi_slopes();
    let got = gpu
        .sdpa_host_with_alibi(
            x.q.view(),
            x.k.view(),
            x.v.view(),
            host_mask.as_ref(),
            slopes.as_ref().map(|s| s.view()),
            options,
            backends,
        )
        .map_err(|e| format!("GPU call failed: {e}"))?;
    if got.backend != expect {
        return Err(format!(
            "dispatch chose {} instead of {expect}",
            got.backend
        ));
    }
    let (q64, k64, v64) = (x.q.mapv(T::wide), x.k.mapv(T::wide), x.v.mapv(T::wide));
    let add64: Option<ArrayD<f64>> = x.additive_mask.as_ref().map(|a| a.mapv(T::wide));
    let ref_mask = match (&x.bool_mask, &add64) {
        (Some(b), _) => Some(sdpa_ref::Mask::Bool(b.view())),
        (_, Some(a)) => Some(sdpa_ref::Mask::Additive(a.view())),
        _ => None,
    };
    let truth = match &slopes {
        None => sdpa_ref::sdpa::<f64>(q64.view(), k64.view(), v64.view(), ref_mask, options),
        Some(a) => sdpa_ref::sdpa_with_alibi::<f64>(
            q64.view(),
            k64.view(),
            v64.view(),
            ref_mask,
            a.view(),
            options,
        ),
    }
    .map_err(|e| format!("reference failed: {e}"))?;
    let out = got.out.mapv(T::wide);
    let dtype = <T as sdpa_cuda::DeviceElement>::DTYPE;
    let out_tol = if case.logit_shift != 0.0 && matches!(dtype, DType::F32 | DType::F64) {
        // The preset assumes scores of order 1. Scores near |shift| = 4096 carry an f32
        // accumulation error of about 4096 * 2^-24 * sqrt(E) (< 1e-3 nats after the
        // 1/sqrt(E) scale), i.e. a relative error of the weights, hence the outputs
        // (|v| <= 1), below 1e-3. (f16/bf16 presets are wider than that already.)
        Tolerance {
            atol: 1e-3,
            rtol: 1e-3,
            reason: "f32 scores shifted by 4096: weights carry ~1e-3 relative error",
        }
    } else {
        tolerance::for_dtype(dtype)
    };
    let report = compare_with(
        out.view().into_dyn(),
        truth.out.view().into_dyn(),
        Some(&out_tol),
    );
    if !report.passes() {
        return Err(format!("out: {report}"));
    }
    let lse_tol = Tolerance {
        atol: 1e-4,
        rtol: 1e-4,
        reason: "f32 scores of at most 256 products, then one log",
    };
    let lse = got.lse.mapv(|x| x as f64);
    let truth_lse = truth.lse.mapv(|x| x as f64);
    let report = compare_with(
        lse.view().into_dyn(),
        truth_lse.view().into_dyn(),
        Some(&lse_tol),
    );
    if !report.passes() {
        return Err(format!("lse: {report}"));
    }
    Ok(())
}

fn check_any(case: &GpuCase, backends: BackendSet, expect: Backend) -> Result<(), String> {
    with_dtype!(case.dtype, T => check_case::<T>(case, backends, expect))
}

fn property(
    strategy: impl proptest::strategy::Strategy<Value = GpuCase>,
    backends: BackendSet,
    expect: Backend,
) {
    gpu::property(CASES, &strategy, |case| {
        check_any(&case, backends, expect)
            .map_err(|e| proptest::test_runner::TestCaseError::fail(format!("{case:?}: {e}")))
    });
}

/// A fixed case: B = 1, GQA as `group` says, no logit shift.
#[allow(clippy::too_many_arguments)]
fn fixed_case(
    dtype: DType,
    (heads_kv, group): (usize, usize),
    (len_q, len_kv): (usize, usize),
    (head_dim, head_dim_v): (usize, usize),
    mask: MaskSpec,
    options: SdpaOptions,
    data_seed: u64,
) -> GpuCase {
    GpuCase::new(
        dtype,
        ProblemSpec {
            batch: 1,
            heads_kv,
            group,
            len_q,
            len_kv,
            head_dim,
            head_dim_v,
            mask,
            options,
            data_seed,
        },
    )
}

#[test]
#[ignore = "needs a CUDA device"]
fn flash_matches_reference() {
    property(
        gpu_case(vec![DType::F16, DType::BF16], false, true),
        BackendSet::only(Backend::Flash),
        Backend::Flash,
    );
}

/// Window, softcap and ALiBi (DESIGN.md "Inference") on flash: the Hopper kernel takes
/// all three at run time, the mma.sync kernel's extras variant softcap and ALiBi.
#[test]
#[ignore = "needs a CUDA device"]
fn flash_with_window_softcap_alibi_matches_reference() {
    property(
        gpu_case_mods(vec![DType::F16, DType::BF16], false, true),
        BackendSet::only(Backend::Flash),
        Backend::Flash,
    );
}

/// The same options on efficient (masks and dropout too) and math, every dtype each takes.
#[test]
#[ignore = "needs a CUDA device"]
fn efficient_and_math_with_window_softcap_alibi_match_reference() {
    property(
        gpu_case_mods(vec![DType::F32, DType::F16, DType::BF16], true, false),
        BackendSet::only(Backend::Efficient),
        Backend::Efficient,
    );
    property(
        gpu_case_mods(DType::ALL.to_vec(), true, false),
        BackendSet::only(Backend::Math),
        Backend::Math,
    );
}

#[test]
#[ignore = "needs a CUDA device"]
fn efficient_matches_reference() {
    property(
        gpu_case(vec![DType::F32, DType::F16, DType::BF16], true, false),
        BackendSet::only(Backend::Efficient),
        Backend::Efficient,
    );
}

#[test]
#[ignore = "needs a CUDA device"]
fn math_matches_reference() {
    property(
        gpu_case(
            vec![DType::F64, DType::F32, DType::F16, DType::BF16],
            true,
            false,
        ),
        BackendSet::only(Backend::Math),
        Backend::Math,
    );
}

/// Scores of +-500 nats and more, the same shift on every key of a row: the softmax is
/// that of the small random parts, but exp of a raw score overflows f32 (or underflows
/// to a zero sum). Catches a kernel that skips the max subtraction, which random inputs
/// of unit size never show (the planted bug `softmax-no-max-wgmma` of VERIFICATION.md).
#[test]
#[ignore = "needs a CUDA device"]
fn shifted_logits_match_reference() {
    let runs = [
        (DType::F16, Backend::Flash),
        (DType::BF16, Backend::Flash),
        (DType::F16, Backend::Efficient),
        (DType::F32, Backend::Efficient),
        (DType::BF16, Backend::Math),
    ];
    let shapes = [(130, 130, 64), (77, 200, 128), (64, 33, 32), (40, 90, 256)];
    let mut failures = Vec::new();
    for (dtype, backend) in runs {
        for (len_q, len_kv, e) in shapes {
            for causal in [Causal::None, Causal::TopLeft] {
                // 64^2 = 4096: exact in every dtype; times 1/sqrt(E), 256 to 724 nats.
                for logit_shift in [4096.0, -4096.0] {
                    let case = GpuCase {
                        logit_shift,
                        ..fixed_case(
                            dtype,
                            (2, 2),
                            (len_q, len_kv),
                            (e, e),
                            MaskSpec::None,
                            SdpaOptions {
                                causal,
                                enable_gqa: true,
                                ..SdpaOptions::default()
                            },
                            17,
                        )
                    };
                    if let Err(e) = check_any(&case, BackendSet::only(backend), backend) {
                        failures.push(format!("{backend} {case:?}: {e}"));
                    }
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
#[ignore = "needs a CUDA device"]
fn auto_dispatch_picks_flash_then_efficient_then_math() {
    // The mask has axes L and S (broadcast over B and H) where a case has one.
    let base = |dtype, e, mask| {
        fixed_case(
            dtype,
            (2, 1),
            (33, 47),
            (e, e),
            gpu::mask_spec(mask, [false, false, true, true], [1, 2, 33, 47]),
            SdpaOptions::default(),
            5,
        )
    };
    check_any(&base(DType::F16, 64, 0), BackendSet::ALL, Backend::Flash).unwrap();
    check_any(
        &base(DType::F16, 64, 1),
        BackendSet::ALL,
        Backend::Efficient,
    )
    .unwrap();
    check_any(
        &base(DType::F32, 64, 0),
        BackendSet::ALL,
        Backend::Efficient,
    )
    .unwrap();
    check_any(&base(DType::F64, 64, 0), BackendSet::ALL, Backend::Math).unwrap();
    check_any(&base(DType::F16, 300, 0), BackendSet::ALL, Backend::Math).unwrap();
}

/// The output of [`keep_pattern`]'s call in `T`, widened.
fn keep_pattern_out<T: GpuElem>(
    backend: Backend,
    (b, h): (usize, usize),
    len_q: usize,
    len_kv: usize,
    dropout: Dropout,
) -> Array4<f64> {
    let mut rng = SplitMix64(dropout.seed ^ 0x5eed);
    let q = random::<T, _>(&mut rng, [b, h, len_q, len_kv]);
    let k = random::<T, _>(&mut rng, [b, h, len_kv, len_kv]);
    let eye = Array4::from_shape_fn((b, h, len_kv, len_kv), |(_, _, i, j)| {
        T::narrow((i == j) as u8 as f64)
    });
    let options = SdpaOptions {
        dropout,
        ..Default::default()
    };
    let r = gpu()
        .sdpa_host(
            q.view(),
            k.view(),
            eye.view(),
            None,
            &options,
            BackendSet::only(backend),
        )
        .unwrap();
    r.out.mapv(T::wide)
}

/// With v = identity (Ev = S), out[i][j] = softmax weight * keep / (1-p): zero exactly
/// where the element was dropped. The zero pattern must equal sdpa-core's stream.
fn keep_pattern(backend: Backend, dtype: DType, len_q: usize, len_kv: usize, dropout: Dropout) {
    let (b, h) = (2, 3);
    let got =
        with_dtype!(dtype, T => keep_pattern_out::<T>(backend, (b, h), len_q, len_kv, dropout));
    let mut dropped = 0;
    for ((bi, hi, i, j), &x) in got.indexed_iter() {
        let n = sdpa_core::dropout::flat_index(bi, hi, i, j, h, len_q, len_kv);
        let keep = dropout.keeps(n);
        assert!(x.is_finite(), "{backend} ({bi},{hi},{i},{j}) not written");
        assert_eq!(
            x != 0.0,
            keep,
            "{backend} {dtype} element ({bi},{hi},{i},{j}) n={n}: got {x}, keep={keep}"
        );
        dropped += (!keep) as usize;
    }
    assert!(
        dropped > 0 && dropped < got.len(),
        "{dropped} of {} dropped",
        got.len()
    );
}

#[test]
#[ignore = "needs a CUDA device"]
fn dropout_keep_decisions_are_bit_identical_to_the_spec() {
    for (seed, offset) in [
        (0u64, 0u64),
        (0x1234_5678_9abc_def0, 3),
        (42, u32::MAX as u64 - 1),
    ] {
        let d = Dropout::new(0.4, seed, offset);
        for (l, s) in [(37, 53), (64, 64), (5, 129)] {
            keep_pattern(Backend::Flash, DType::F16, l, s, d);
            keep_pattern(Backend::Efficient, DType::F16, l, s, d);
            keep_pattern(Backend::Efficient, DType::F32, l, s, d);
            keep_pattern(Backend::Math, DType::F32, l, s, d);
        }
    }
}

/// q, k, v as views of one packed `[B, L, 3, H, E]` projection, as a module passes them.
#[test]
#[ignore = "needs a CUDA device"]
fn packed_qkv_views_match_reference() {
    let gpu = gpu();
    for (e, l) in [(64, 100), (40, 77), (128, 256)] {
        let (b, h) = (2, 4);
        let mut rng = SplitMix64(e as u64);
        let packed = random::<f16, _>(&mut rng, (b, l, 3, h, e));
        let flat = packed
            .view()
            .into_shape_with_order((1, 1, 1, b * l * 3 * h * e))
            .unwrap();
        let buffer = DeviceTensor::upload(gpu, flat).unwrap();
        let strides = [
            (l * 3 * h * e) as isize,
            e as isize,
            (3 * h * e) as isize,
            1,
        ];
        let view = |which: usize| buffer.view([b, h, l, e], strides, which * h * e).unwrap();
        let (q, k, v) = (view(0), view(1), view(2));
        let options = SdpaOptions {
            causal: Causal::TopLeft,
            ..Default::default()
        };
        let host = |which: usize| {
            packed
                .index_axis(Axis(2), which)
                .permuted_axes([0, 2, 1, 3])
                .mapv(|x| x.to_f64())
        };
        let truth = sdpa_ref::sdpa::<f64>(
            host(0).view(),
            host(1).view(),
            host(2).view(),
            None,
            &options,
        )
        .unwrap();
        for backend in [Backend::Flash, Backend::Efficient, Backend::Math] {
            let r = gpu
                .sdpa(&q, &k, &v, None, &options, BackendSet::only(backend))
                .unwrap();
            let out = r.out.download::<f16>(gpu).unwrap().mapv(f16::wide);
            let report = compare_with(
                out.view().into_dyn(),
                truth.out.view().into_dyn(),
                Some(&tolerance::F16),
            );
            assert!(report.passes(), "{backend} e={e} l={l}: {report}");
        }
    }
}

/// Varlen (packed sequences + cu_seqlens) equals the padded dense reference with a
/// key-padding mask, dropout included (the padded index space).
fn varlen_case(
    backend: Backend,
    lens_q: &[usize],
    lens_k: &[usize],
    causal: Causal,
    p: f64,
    signed: bool,
) {
    let gpu = gpu();
    let (hq, hkv, e) = (4, 2, 64);
    let batch = lens_q.len();
    let (max_q, max_k) = (*lens_q.iter().max().unwrap(), *lens_k.iter().max().unwrap());
    let mut rng = SplitMix64(lens_q.iter().sum::<usize>() as u64 * 31 + p.to_bits());
    let q = random::<f16, _>(&mut rng, [batch, hq, max_q, e]);
    let k = random::<f16, _>(&mut rng, [batch, hkv, max_k, e]);
    let v = random::<f16, _>(&mut rng, [batch, hkv, max_k, e]);
    // Pack: [total, H, E] stored as [1, 1, total*H, E], viewed as [1, H, total, E].
    let pack = |a: &Array4<f16>, lens: &[usize]| {
        let heads = a.shape()[1];
        let mut rows = Vec::new();
        for (bi, &len) in lens.iter().enumerate() {
            for i in 0..len {
                for hi in 0..heads {
                    rows.extend(a.slice(ndarray::s![bi, hi, i, ..]).iter().copied());
                }
            }
        }
        let total: usize = lens.iter().sum();
        let arr = Array4::from_shape_vec((1, 1, total * heads, e), rows).unwrap();
        let t = DeviceTensor::upload(gpu, arr.view()).unwrap();
        t.view(
            [1, heads, total, e],
            [0, e as isize, (heads * e) as isize, 1],
            0,
        )
        .unwrap()
    };
    let cu = |lens: &[usize]| {
        let mut c = vec![0usize];
        for l in lens {
            c.push(c.last().unwrap() + l);
        }
        if signed {
            DeviceSeqlens::upload_i32(gpu, &c.iter().map(|&x| x as i32).collect::<Vec<_>>())
                .unwrap()
        } else {
            DeviceSeqlens::upload_u32(gpu, &c.iter().map(|&x| x as u32).collect::<Vec<_>>())
                .unwrap()
        }
    };
    let (cq, ck) = (cu(lens_q), cu(lens_k));
    let options = SdpaOptions {
        causal,
        dropout: Dropout::new(p, 77, 5),
        enable_gqa: true,
        ..Default::default()
    };
    let r = gpu
        .sdpa_varlen(
            &pack(&q, lens_q),
            &pack(&k, lens_k),
            &pack(&v, lens_k),
            Varlen {
                cu_seqlens_q: &cq,
                cu_seqlens_k: &ck,
            },
            &options,
            BackendSet::only(backend),
        )
        .unwrap();
    assert_eq!(r.backend, backend);
    let out = r.out.download::<f16>(gpu).unwrap(); // [1, Hq, total_q, E]
    let lse = r.lse.download::<f32>(gpu).unwrap();
    let key_pad = Array::from_shape_fn(IxDyn(&[batch, 1, 1, max_k]), |ix| ix[3] < lens_k[ix[0]]);
    let truth = sdpa_ref::sdpa::<f64>(
        q.mapv(|x| x.to_f64()).view(),
        k.mapv(|x| x.to_f64()).view(),
        v.mapv(|x| x.to_f64()).view(),
        Some(sdpa_ref::Mask::Bool(key_pad.view())),
        &options,
    )
    .unwrap();
    let mut row0 = 0;
    for (bi, &len) in lens_q.iter().enumerate() {
        for i in 0..len {
            for hi in 0..hq {
                for d in 0..e {
                    let got = out[[0, hi, row0 + i, d]].to_f64();
                    let want = truth.out[[bi, hi, i, d]];
                    assert!(
                        (got - want).abs() <= 1e-3 + 1e-3 * want.abs(),
                        "{backend} seq {bi} row {i} head {hi} dim {d}: got {got}, want {want}"
                    );
                }
                let (gl, wl) = (lse[[0, hi, row0 + i, 0]], truth.lse[[bi, hi, i]]);
                assert!(
                    gl == wl || (gl - wl).abs() <= 1e-4 * (1.0 + wl.abs()),
                    "{backend} lse seq {bi} row {i}: {gl} vs {wl}"
                );
            }
        }
        row0 += len;
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn varlen_matches_padded_reference() {
    let lens_q = [1usize, 130, 7, 64, 0, 33];
    let lens_k = [5usize, 130, 1, 200, 9, 33];
    for backend in [Backend::Flash, Backend::Efficient] {
        for (causal, p, signed) in [
            (Causal::None, 0.0, false),
            (Causal::None, 0.3, true),
            (Causal::TopLeft, 0.2, false),
        ] {
            // Top-left causal with keys padded at the end is the same on both sides.
            varlen_case(backend, &lens_q, &lens_k, causal, p, signed);
        }
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn bad_inputs_are_errors_before_any_launch() {
    let gpu = gpu();
    let a = Array4::from_elem((1, 2, 8, 16), f16::from_f32(0.5));
    let t = DeviceTensor::upload(gpu, a.view()).unwrap();
    let o = SdpaOptions::default();
    // A view one byte into the buffer: misaligned for f16.
    let odd = t
        .reinterpret(DType::F16, sdpa_core::Layout::contiguous([1, 2, 4, 16]), 1)
        .unwrap();
    let err = gpu
        .sdpa(&odd, &odd, &odd, None, &o, BackendSet::ALL)
        .unwrap_err();
    assert!(
        matches!(
            err,
            CudaError::Misaligned {
                arg: "query",
                align: 2,
                ..
            }
        ),
        "{err}"
    );
    // ALiBi slopes: the shape [Hq] or [B, Hq], finite, and uploaded for this call's B, Hq.
    let bad_shape = ndarray::Array1::from_elem(3, 0.5f32).into_dyn();
    let err = sdpa_cuda::DeviceSlopes::upload(gpu, bad_shape.view(), 1, 2).unwrap_err();
    assert!(err.to_string().contains("alibi_slopes"), "{err}");
    let nan = ndarray::Array1::from_vec(vec![0.5f32, f32::NAN]).into_dyn();
    let err = sdpa_cuda::DeviceSlopes::upload(gpu, nan.view(), 1, 2).unwrap_err();
    assert!(err.to_string().contains("alibi_slopes"), "{err}");
    let four = ndarray::Array1::from_elem(4, 0.5f32).into_dyn();
    let other = sdpa_cuda::DeviceSlopes::upload(gpu, four.view(), 1, 4).unwrap();
    let err = gpu
        .sdpa_with_alibi(&t, &t, &t, None, Some(&other), &o, BackendSet::ALL)
        .unwrap_err();
    assert!(err.to_string().contains("alibi_slopes"), "{err}");
    // Negative strides are refused; a view past the buffer too.
    let neg = sdpa_core::Layout {
        shape: [1, 2, 8, 16],
        strides: [256, 128, -16, 1],
    };
    assert!(matches!(
        t.reinterpret(DType::F16, neg, 0),
        Err(CudaError::BadLayout { .. })
    ));
    assert!(matches!(
        t.view([1, 2, 8, 16], [256, 128, 16, 1], 1),
        Err(CudaError::BadLayout { .. })
    ));
    // Last-dim stride 2: the fused backends say why; math runs it.
    let strided = t.view([1, 2, 4, 8], [256, 128, 16, 2], 0).unwrap();
    let err = gpu
        .sdpa(
            &strided,
            &strided,
            &strided,
            None,
            &o,
            BackendSet::only(Backend::Flash).with(Backend::Efficient),
        )
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "no enabled backend can run this problem: flash: needs a unit stride in the last dim of query, got 2; efficient: needs a unit stride in the last dim of query, got 2"
    );
    assert_eq!(
        gpu.sdpa(&strided, &strided, &strided, None, &o, BackendSet::ALL)
            .unwrap()
            .backend,
        Backend::Math
    );
    // Out of memory names the allocation.
    let err = DeviceTensor::alloc(gpu, DType::F32, [1 << 20, 1 << 10, 1 << 10, 64]).unwrap_err();
    assert!(matches!(err, CudaError::OutOfMemory { .. }), "{err}");
    // A mask on flash: the tutorial's "not supported" case, with the reason.
    let mask = ndarray::Array2::from_elem((8, 8), true).into_dyn();
    let err = gpu
        .sdpa_host(
            a.view(),
            a.view(),
            a.view(),
            Some(&HostMask::Bool(mask.view())),
            &o,
            BackendSet::only(Backend::Flash),
        )
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "no enabled backend can run this problem: flash: takes no explicit attn_mask (causal only)"
    );
}

#[test]
#[ignore = "needs a CUDA device"]
fn second_context_reads_kernels_from_the_disk_cache() {
    let dir = std::env::temp_dir().join(format!("sdpa-cuda-cache-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let a = Array4::from_elem((1, 1, 4, 8), f16::from_f32(0.25));
    let run = || {
        let mut ctx = GpuContext::new(0).unwrap();
        ctx.set_cache_dir(Some(dir.clone()));
        ctx.sdpa_host(
            a.view(),
            a.view(),
            a.view(),
            None,
            &SdpaOptions::default(),
            BackendSet::ALL,
        )
        .unwrap();
        ctx.compile_counts()
    };
    assert_eq!(run(), (1, 0));
    assert_eq!(run(), (0, 1));
    let _ = std::fs::remove_dir_all(&dir);
}

/// The small set compute-sanitizer (memcheck, racecheck) runs: one call of each kernel
/// family, odd sizes, every feature.
#[test]
#[ignore = "needs a CUDA device"]
fn sanitize_small_set() {
    // The mask has axes B, L and S (broadcast over H) where a case has one.
    let case = |dtype, mask_kind, e, ev, causal, p| {
        fixed_case(
            dtype,
            (2, 2),
            (37, 70),
            (e, ev),
            gpu::mask_spec(mask_kind, [true, false, true, true], [1, 4, 37, 70]),
            SdpaOptions {
                causal,
                dropout: Dropout::new(p, 9, 1),
                scale: None,
                enable_gqa: true,
                ..Default::default()
            },
            11,
        )
    };
    check_any(
        &case(DType::F16, 0, 59, 59, Causal::BottomRight, 0.0),
        BackendSet::only(Backend::Flash),
        Backend::Flash,
    )
    .unwrap();
    check_any(
        &case(DType::BF16, 0, 128, 128, Causal::TopLeft, 0.2),
        BackendSet::only(Backend::Flash),
        Backend::Flash,
    )
    .unwrap();
    check_any(
        &case(DType::F16, 0, 256, 256, Causal::None, 0.0),
        BackendSet::only(Backend::Flash),
        Backend::Flash,
    )
    .unwrap();
    check_any(
        &case(DType::BF16, 2, 40, 72, Causal::None, 0.1),
        BackendSet::only(Backend::Efficient),
        Backend::Efficient,
    )
    .unwrap();
    check_any(
        &case(DType::F32, 1, 33, 17, Causal::TopLeft, 0.3),
        BackendSet::only(Backend::Efficient),
        Backend::Efficient,
    )
    .unwrap();
    check_any(
        &case(DType::F64, 2, 16, 24, Causal::BottomRight, 0.2),
        BackendSet::only(Backend::Math),
        Backend::Math,
    )
    .unwrap();
    check_any(
        &case(DType::F16, 1, 64, 64, Causal::None, 0.0),
        BackendSet::only(Backend::Math),
        Backend::Math,
    )
    .unwrap();
    varlen_case(Backend::Flash, &[3, 40], &[17, 9], Causal::None, 0.2, false);
    // Window, softcap and ALiBi: the Hopper kernel (run-time switches), the mma.sync and
    // scalar kernels' extras variants, math.
    let with_mods = |mut c: GpuCase| {
        c.problem.options.window = sdpa_core::Window { left: 9, right: 4 };
        c.problem.options.softcap = Some(3.0);
        c.alibi = true;
        c
    };
    for (dtype, mask_kind, e, backend) in [
        (DType::F16, 0, 64, Backend::Flash),
        (DType::BF16, 2, 40, Backend::Efficient),
        (DType::F32, 1, 33, Backend::Efficient),
        (DType::F32, 2, 24, Backend::Math),
    ] {
        check_any(
            &with_mods(case(dtype, mask_kind, e, e, Causal::None, 0.0)),
            BackendSet::only(backend),
            backend,
        )
        .unwrap();
    }
}

/// A moving result is a race: the same call twenty times must give the same bits. Sized
/// so that every kernel family runs many K/V tiles per CTA and many CTAs per SM (a
/// missing barrier between tile loads and their readers shows here even where
/// racecheck cannot see it, as for the Hopper kernel's async-proxy reads).
#[test]
#[ignore = "needs a CUDA device"]
fn results_are_bitwise_repeatable() {
    let gpu = gpu();
    let mut rng = SplitMix64(0x5eed_0b17);
    for (dtype, e, causal, backend) in [
        (DType::BF16, 128, Causal::None, Backend::Flash),
        (DType::F16, 64, Causal::TopLeft, Backend::Flash),
        (DType::F16, 96, Causal::BottomRight, Backend::Efficient),
        (DType::F32, 64, Causal::None, Backend::Efficient),
    ] {
        let shape = [4, 8, 1000, e];
        let q = gpu::random_device(gpu, &mut rng, shape, dtype).unwrap();
        let k = gpu::random_device(gpu, &mut rng, shape, dtype).unwrap();
        let v = gpu::random_device(gpu, &mut rng, shape, dtype).unwrap();
        let options = SdpaOptions {
            causal,
            ..Default::default()
        };
        let run = || {
            let r = gpu
                .sdpa(&q, &k, &v, None, &options, BackendSet::only(backend))
                .unwrap();
            assert_eq!(r.backend, backend);
            with_dtype!(dtype, T => {
                let out = r.out.download::<T>(gpu).unwrap();
                out.iter().map(|x| x.wide().to_bits()).collect::<Vec<u64>>()
            })
        };
        let first = run();
        for i in 1..20 {
            assert!(
                run() == first,
                "{dtype} E={e} {causal:?} {backend}: run {i} differs from run 0"
            );
        }
    }
}
