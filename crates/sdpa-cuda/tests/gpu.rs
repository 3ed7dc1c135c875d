//! GPU tests: each CUDA backend against the f64 reference (`sdpa-ref`) over random
//! shapes, masks, seeds and dtypes; dropout keep decisions bit for bit; varlen against
//! the padded dense reference; strided views; errors before launch. Outputs are
//! poisoned with NaN before every launch and must come back fully written.
//!
//! Ignored by default (they need a CUDA device): the GPU bundle's `run.sh` runs them
//! with `--ignored`. `PROPTEST_CASES` scales the property tests (default 48 each).
//! Tests named `sanitize_*` are the small set compute-sanitizer runs.

use half::{bf16, f16};
use ndarray::{Array, Array4, ArrayD, Axis, IxDyn};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use sdpa_core::{Backend, BackendSet, Causal, DType, Dropout, SdpaOptions};
use sdpa_cuda::{
    CudaError, DeviceElement, DeviceSeqlens, DeviceTensor, GpuContext, HostMask, Varlen,
};
use sdpa_harness::compare::compare_with;
use sdpa_harness::strategies::{proptest_cases, SplitMix64};
use sdpa_harness::tolerance::{self, Tolerance};

fn gpu() -> &'static GpuContext {
    GpuContext::poisoned_for_tests().expect("a CUDA device with driver and NVRTC")
}

fn cases() -> u32 {
    proptest_cases(48)
}

/// Element types of these tests: the reference's, with a device twin.
trait TestElem: sdpa_harness::elem::Elem + DeviceElement {}
impl<T: sdpa_harness::elem::Elem + DeviceElement> TestElem for T {}

/// A random problem, in f64 before rounding to the case dtype.
#[derive(Debug, Clone)]
struct Case {
    dtype: DType,
    batch: usize,
    heads_kv: usize,
    group: usize,
    len_q: usize,
    len_kv: usize,
    head_dim: usize,
    head_dim_v: usize,
    /// 0 none, 1 bool, 2 additive.
    mask_kind: u8,
    /// Which axes of [B, Hq, L, S] the mask has (others broadcast).
    mask_axes: [bool; 4],
    options: SdpaOptions,
    seed: u64,
    /// A common offset added to every score before scaling (q[.., 0] = sqrt|shift|,
    /// k[.., 0] = +-sqrt|shift|): the softmax is unchanged, but exp of the raw scores
    /// overflows (or underflows) unless the kernel subtracts the row max.
    logit_shift: f64,
}

const HEAD_DIMS: [usize; 14] = [8, 16, 32, 40, 59, 64, 80, 96, 111, 128, 160, 192, 200, 256];
const LENGTHS: [usize; 10] = [1, 2, 17, 63, 64, 65, 97, 113, 127, 200];

fn case_strategy(dtypes: Vec<DType>, masks: bool, same_dims: bool) -> impl Strategy<Value = Case> {
    let len = prop_oneof![proptest::sample::select(LENGTHS.to_vec()), 1usize..260];
    (
        proptest::sample::select(dtypes),
        (1usize..=2, 1usize..=2, 1usize..=3),
        len.clone(),
        len,
        proptest::sample::select(HEAD_DIMS.to_vec()),
        proptest::sample::select(HEAD_DIMS.to_vec()),
        if masks { 0u8..=2 } else { 0u8..=0 },
        any::<[bool; 4]>(),
        (
            0u8..3,
            prop_oneof![Just(0.0), 0.05f64..0.7, Just(1.0)],
            any::<u64>(),
            0u64..1 << 40,
        ),
        prop_oneof![Just(None), (-1.5f64..1.5).prop_map(Some)],
        any::<u64>(),
    )
        .prop_map(
            move |(
                dtype,
                (batch, heads_kv, group),
                len_q,
                len_kv,
                e,
                ev,
                mask_kind,
                mask_axes,
                drop,
                scale,
                seed,
            )| {
                let (causal, p, dseed, offset) = drop;
                Case {
                    dtype,
                    batch,
                    heads_kv,
                    group,
                    len_q,
                    len_kv,
                    head_dim: e,
                    head_dim_v: if same_dims { e } else { ev },
                    mask_kind,
                    mask_axes,
                    options: SdpaOptions {
                        causal: [Causal::None, Causal::TopLeft, Causal::BottomRight]
                            [causal as usize],
                        dropout: Dropout::new(p, dseed, offset),
                        scale,
                        enable_gqa: group > 1,
                    },
                    seed,
                    logit_shift: 0.0,
                }
            },
        )
}

fn random_array(rng: &mut SplitMix64, shape: [usize; 4]) -> Array4<f64> {
    Array4::from_shape_simple_fn((shape[0], shape[1], shape[2], shape[3]), || rng.symmetric())
}

fn round<T: TestElem>(a: &Array4<f64>) -> Array4<T> {
    a.mapv(T::narrow)
}

fn widen<T: TestElem>(a: &Array4<T>) -> Array4<f64> {
    a.mapv(T::wide)
}

/// Runs one case on `backends` (`expect` must be the one dispatch picks) and compares
/// out and lse with the f64 reference on the same rounded inputs.
fn check_case<T: TestElem>(
    case: &Case,
    backends: BackendSet,
    expect: Backend,
) -> Result<(), String> {
    let gpu = gpu();
    let mut rng = SplitMix64(case.seed);
    let hq = case.heads_kv * case.group;
    let mut q64 = random_array(&mut rng, [case.batch, hq, case.len_q, case.head_dim]);
    let mut k64 = random_array(
        &mut rng,
        [case.batch, case.heads_kv, case.len_kv, case.head_dim],
    );
    if case.logit_shift != 0.0 {
        let c = case.logit_shift.abs().sqrt();
        q64.index_axis_mut(Axis(3), 0).fill(c);
        k64.index_axis_mut(Axis(3), 0)
            .fill(c * case.logit_shift.signum());
    }
    let q = round::<T>(&q64);
    let k = round::<T>(&k64);
    let v = round::<T>(&random_array(
        &mut rng,
        [case.batch, case.heads_kv, case.len_kv, case.head_dim_v],
    ));
    let full = [case.batch, hq, case.len_q, case.len_kv];
    let mask_shape: Vec<usize> = (0..4)
        .map(|a| if case.mask_axes[a] { full[a] } else { 1 })
        .collect();
    let bool_mask: ArrayD<bool> =
        Array::from_shape_simple_fn(IxDyn(&mask_shape), || rng.unit() < 0.75);
    let add_mask: ArrayD<T> = Array::from_shape_simple_fn(IxDyn(&mask_shape), || {
        let u = rng.unit();
        T::narrow(if u < 0.15 {
            f64::NEG_INFINITY
        } else {
            4.0 * u - 2.0
        })
    });
    let host_mask = match case.mask_kind {
        1 => Some(HostMask::Bool(bool_mask.view())),
        2 => Some(HostMask::Additive(add_mask.view())),
        _ => None,
    };
    let got = gpu
        .sdpa_host(
            q.view(),
            k.view(),
            v.view(),
            host_mask.as_ref(),
            &case.options,
            backends,
        )
        .map_err(|e| format!("GPU call failed: {e}"))?;
    if got.backend != expect {
        return Err(format!(
            "dispatch chose {} instead of {expect}",
            got.backend
        ));
    }
    let (q64, k64, v64) = (widen(&q), widen(&k), widen(&v));
    let add64 = add_mask.mapv(|x| x.wide());
    let ref_mask = match case.mask_kind {
        1 => Some(sdpa_ref::Mask::Bool(bool_mask.view())),
        2 => Some(sdpa_ref::Mask::Additive(add64.view())),
        _ => None,
    };
    let truth = sdpa_ref::sdpa::<f64>(q64.view(), k64.view(), v64.view(), ref_mask, &case.options)
        .map_err(|e| format!("reference failed: {e}"))?;
    let out = widen(&got.out);
    let dtype = <T as DeviceElement>::DTYPE;
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

fn check_any(case: &Case, backends: BackendSet, expect: Backend) -> Result<(), String> {
    match case.dtype {
        DType::F64 => check_case::<f64>(case, backends, expect),
        DType::F32 => check_case::<f32>(case, backends, expect),
        DType::F16 => check_case::<f16>(case, backends, expect),
        DType::BF16 => check_case::<bf16>(case, backends, expect),
    }
}

fn property(strategy: impl Strategy<Value = Case>, backends: BackendSet, expect: Backend) {
    let mut runner = TestRunner::new(Config {
        cases: cases(),
        failure_persistence: None,
        ..Config::default()
    });
    let result = runner.run(&strategy, |case| {
        check_any(&case, backends, expect)
            .map_err(|e| TestCaseError::fail(format!("{case:?}: {e}")))
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn flash_matches_reference() {
    property(
        case_strategy(vec![DType::F16, DType::BF16], false, true),
        BackendSet::only(Backend::Flash),
        Backend::Flash,
    );
}

#[test]
#[ignore = "needs a CUDA device"]
fn efficient_matches_reference() {
    property(
        case_strategy(vec![DType::F32, DType::F16, DType::BF16], true, false),
        BackendSet::only(Backend::Efficient),
        Backend::Efficient,
    );
}

#[test]
#[ignore = "needs a CUDA device"]
fn math_matches_reference() {
    property(
        case_strategy(
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
                    let case = Case {
                        dtype,
                        batch: 1,
                        heads_kv: 2,
                        group: 2,
                        len_q,
                        len_kv,
                        head_dim: e,
                        head_dim_v: e,
                        mask_kind: 0,
                        mask_axes: [false; 4],
                        options: SdpaOptions {
                            causal,
                            enable_gqa: true,
                            ..SdpaOptions::default()
                        },
                        seed: 17,
                        logit_shift,
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
    let base = Case {
        dtype: DType::F16,
        batch: 1,
        heads_kv: 2,
        group: 1,
        len_q: 33,
        len_kv: 47,
        head_dim: 64,
        head_dim_v: 64,
        mask_kind: 0,
        mask_axes: [false, false, true, true],
        options: SdpaOptions::default(),
        seed: 5,
        logit_shift: 0.0,
    };
    check_any(&base, BackendSet::ALL, Backend::Flash).unwrap();
    check_any(
        &Case {
            mask_kind: 1,
            ..base.clone()
        },
        BackendSet::ALL,
        Backend::Efficient,
    )
    .unwrap();
    check_any(
        &Case {
            dtype: DType::F32,
            ..base.clone()
        },
        BackendSet::ALL,
        Backend::Efficient,
    )
    .unwrap();
    check_any(
        &Case {
            dtype: DType::F64,
            ..base.clone()
        },
        BackendSet::ALL,
        Backend::Math,
    )
    .unwrap();
    check_any(
        &Case {
            head_dim: 300,
            head_dim_v: 300,
            ..base
        },
        BackendSet::ALL,
        Backend::Math,
    )
    .unwrap();
}

/// With v = identity (Ev = S), out[i][j] = softmax weight * keep / (1-p): zero exactly
/// where the element was dropped. The zero pattern must equal sdpa-core's stream.
fn keep_pattern(backend: Backend, dtype: DType, len_q: usize, len_kv: usize, dropout: Dropout) {
    let gpu = gpu();
    let (b, h) = (2, 3);
    let mut rng = SplitMix64(dropout.seed ^ 0x5eed);
    let q = random_array(&mut rng, [b, h, len_q, len_kv]);
    let k = random_array(&mut rng, [b, h, len_kv, len_kv]);
    let eye = Array4::from_shape_fn((b, h, len_kv, len_kv), |(_, _, i, j)| (i == j) as u8 as f64);
    let options = SdpaOptions {
        dropout,
        ..Default::default()
    };
    let got: Array4<f64> = match dtype {
        DType::F16 => {
            let r = gpu
                .sdpa_host(
                    round::<f16>(&q).view(),
                    round::<f16>(&k).view(),
                    round::<f16>(&eye).view(),
                    None,
                    &options,
                    BackendSet::only(backend),
                )
                .unwrap();
            widen(&r.out)
        }
        DType::F32 => {
            let r = gpu
                .sdpa_host(
                    round::<f32>(&q).view(),
                    round::<f32>(&k).view(),
                    round::<f32>(&eye).view(),
                    None,
                    &options,
                    BackendSet::only(backend),
                )
                .unwrap();
            widen(&r.out)
        }
        _ => unreachable!(),
    };
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
        let packed =
            Array::from_shape_simple_fn((b, l, 3, h, e), || f16::from_f64(rng.symmetric()));
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
            let out = widen(&r.out.download::<f16>(gpu).unwrap());
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
    let q = random_array(&mut rng, [batch, hq, max_q, e]).mapv(f16::from_f64);
    let k = random_array(&mut rng, [batch, hkv, max_k, e]).mapv(f16::from_f64);
    let v = random_array(&mut rng, [batch, hkv, max_k, e]).mapv(f16::from_f64);
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
    let case = |dtype, mask_kind, e, ev, causal, p| Case {
        dtype,
        batch: 1,
        heads_kv: 2,
        group: 2,
        len_q: 37,
        len_kv: 70,
        head_dim: e,
        head_dim_v: ev,
        mask_kind,
        mask_axes: [true, false, true, true],
        options: SdpaOptions {
            causal,
            dropout: Dropout::new(p, 9, 1),
            scale: None,
            enable_gqa: true,
        },
        seed: 11,
        logit_shift: 0.0,
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
}
