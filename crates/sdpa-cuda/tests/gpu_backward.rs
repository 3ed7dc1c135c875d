//! GPU tests of the CUDA backwards (`GpuContext::sdpa_backward`), math in f64/f32/f16/bf16
//! and the efficient backend's fused kernels in f32/f16/bf16: dq, dk, dv and an
//! additive mask's dmask against the reference backward, over
//! causal (both alignments, L != S), bool and additive masks (broadcast), GQA, dropout
//! and fully masked rows. Outputs are poisoned with NaN before the launch, so an element
//! left unwritten fails as non-finite.
//!
//! # The reference
//! `sdpa_ref::bwd::sdpa_backward`: intermediates in f64 for f64 and f32 otherwise, each
//! gradient rounded once (itself checked against libtorch's autograd goldens and finite
//! differences on the CPU).
//!
//! # Tolerance
//! Truth is the reference in f64 on the same (already rounded) inputs, with the same
//! forward `out` and `lse` fed to every backward, so only the backward's arithmetic and
//! roundings are judged. `peer` is the reference in T (f32 intermediates for
//! f16/bf16/f32). A gradient passes when `max|gpu - truth| <= 2 * max|peer - truth| +
//! floor`, FlashAttention's rule, with `floor = peer_floor(T) * max(1, max|truth|)`:
//! the harness's floor is two roundings at magnitude 1, and gradients (sums over up to
//! G*L rows) are not of magnitude 1, so it scales with the largest one. For f64 the peer
//! *is* the truth (error ~0), so the bound is `1e-10 * max(1, max|truth|)`: the sums
//! here have under 10^3 terms of relative error 2^-53 (~1e-13 worst), four orders of
//! margin, while one f32 intermediate anywhere (~6e-8 relative) fails it.
//!
//! Ignored by default (they need a CUDA device): run with `--ignored`. On failure every
//! case's line is printed (`ok`/`FAIL`, the gradient, the errors and the bound, the worst
//! element with its index and values).

use half::{bf16, f16};
use ndarray::{Array3, Array4, ArrayD, ArrayView3, ArrayView4, IxDyn};
use sdpa_core::{Backend, BackendSet, Causal, DType, Dropout, SdpaOptions};
use sdpa_cuda::HostMask;
use sdpa_harness::compare::compare;
use sdpa_harness::gpu::{gpu, random, GpuElem};
use sdpa_harness::strategies::SplitMix64;
use sdpa_harness::tolerance::{peer_floor, PEER_FACTOR};
use sdpa_ref::bwd::Gradients;

/// The reference backward (`sdpa_ref::bwd`, with ALiBi `alibi` when given), its error as
/// text.
#[allow(clippy::too_many_arguments)]
fn reference_backward<T: GpuElem>(
    q: ArrayView4<'_, T>,
    k: ArrayView4<'_, T>,
    v: ArrayView4<'_, T>,
    out: ArrayView4<'_, T>,
    lse: ArrayView3<'_, f32>,
    dout: ArrayView4<'_, T>,
    mask: Option<sdpa_ref::Mask<'_, T>>,
    alibi: Option<ndarray::ArrayViewD<'_, f32>>,
    options: &SdpaOptions,
) -> Result<Gradients<T>, String> {
    match alibi {
        None => sdpa_ref::bwd::sdpa_backward(q, k, v, out, lse, dout, mask, options),
        Some(a) => {
            sdpa_ref::bwd::sdpa_backward_with_alibi(q, k, v, out, lse, dout, mask, a, options)
        }
    }
    .map_err(|e| e.to_string())
}

#[derive(Debug, Clone)]
enum TestMask {
    None,
    /// Bool of this shape, 75% kept.
    Bool(Vec<usize>),
    /// Additive of this shape, values in [-1, 1), 15% -inf.
    Additive(Vec<usize>),
}

#[derive(Debug, Clone)]
struct Case {
    name: &'static str,
    batch: usize,
    heads_kv: usize,
    group: usize,
    len_q: usize,
    len_kv: usize,
    head_dim: usize,
    head_dim_v: usize,
    mask: TestMask,
    /// A query row whose every key is masked out (the mask must have the L axis).
    fully_masked_row: Option<usize>,
    options: SdpaOptions,
    /// ALiBi slopes [Hq] ([`slopes`]) added after the softcap.
    alibi: bool,
}

/// ALiBi's geometric slopes for `heads` query heads (2^(-8 (h + 1) / heads)).
fn slopes(heads: usize) -> ndarray::Array1<f32> {
    ndarray::Array1::from_vec(sdpa_core::geometric_alibi_slopes(heads))
}

fn cases() -> Vec<Case> {
    let base = Case {
        name: "",
        batch: 2,
        heads_kv: 2,
        group: 1,
        len_q: 17,
        len_kv: 23,
        head_dim: 40,
        head_dim_v: 24,
        mask: TestMask::None,
        fully_masked_row: None,
        alibi: false,
        options: SdpaOptions::default(),
    };
    let causal = |c| SdpaOptions {
        causal: c,
        ..Default::default()
    };
    vec![
        Case {
            name: "plain L=17 S=23 E=40 Ev=24",
            ..base.clone()
        },
        Case {
            name: "causal top-left L=13 < S=29",
            len_q: 13,
            len_kv: 29,
            options: causal(Causal::TopLeft),
            ..base.clone()
        },
        Case {
            name: "causal top-left L=29 > S=13",
            len_q: 29,
            len_kv: 13,
            options: causal(Causal::TopLeft),
            ..base.clone()
        },
        Case {
            name: "causal bottom-right L=13 < S=29",
            len_q: 13,
            len_kv: 29,
            options: causal(Causal::BottomRight),
            ..base.clone()
        },
        Case {
            // Rows i < L - S see no key: fully masked rows from causal alone.
            name: "causal bottom-right L=29 > S=13 (fully masked rows)",
            len_q: 29,
            len_kv: 13,
            options: causal(Causal::BottomRight),
            ..base.clone()
        },
        Case {
            name: "bool mask [L, S] broadcast over B, H + a fully masked row",
            mask: TestMask::Bool(vec![17, 23]),
            fully_masked_row: Some(5),
            ..base.clone()
        },
        Case {
            name: "bool key-padding mask [B, 1, 1, S] + causal",
            mask: TestMask::Bool(vec![2, 1, 1, 23]),
            options: causal(Causal::TopLeft),
            ..base.clone()
        },
        Case {
            name: "additive mask [B, Hq, L, S] (no broadcast)",
            mask: TestMask::Additive(vec![2, 2, 17, 23]),
            ..base.clone()
        },
        Case {
            name: "additive mask [L, S] (dmask summed over B, Hq) + a fully masked row",
            mask: TestMask::Additive(vec![17, 23]),
            fully_masked_row: Some(3),
            ..base.clone()
        },
        Case {
            name: "additive mask [1, Hq, 1, S] (dmask summed over B, L), GQA 2x3",
            group: 3,
            mask: TestMask::Additive(vec![1, 6, 1, 23]),
            options: SdpaOptions {
                enable_gqa: true,
                ..Default::default()
            },
            ..base.clone()
        },
        Case {
            name: "GQA 2x3 causal bottom-right, E=64 Ev=64",
            group: 3,
            head_dim: 64,
            head_dim_v: 64,
            options: SdpaOptions {
                enable_gqa: true,
                causal: Causal::BottomRight,
                ..Default::default()
            },
            ..base.clone()
        },
        Case {
            name: "MQA 1x4 + dropout p=0.3 + additive [B, 1, L, S]",
            heads_kv: 1,
            group: 4,
            mask: TestMask::Additive(vec![2, 1, 17, 23]),
            options: SdpaOptions {
                enable_gqa: true,
                dropout: Dropout::new(0.3, 0x5eed_1234_abcd, 4096),
                ..Default::default()
            },
            ..base.clone()
        },
        Case {
            name: "dropout p=0.5 + causal top-left, scale -0.7",
            options: SdpaOptions {
                causal: Causal::TopLeft,
                dropout: Dropout::new(0.5, 42, 7),
                scale: Some(-0.7),
                ..Default::default()
            },
            ..base.clone()
        },
        Case {
            name: "dropout p=1 (everything dropped: zero gradients)",
            options: SdpaOptions {
                dropout: Dropout::new(1.0, 1, 0),
                ..Default::default()
            },
            ..base
        },
    ]
}

struct Inputs<T> {
    q: Array4<T>,
    k: Array4<T>,
    v: Array4<T>,
    dout: Array4<T>,
    bool_mask: Option<ArrayD<bool>>,
    additive_mask: Option<ArrayD<T>>,
}

fn inputs<T: GpuElem>(case: &Case, seed: u64) -> Inputs<T> {
    let mut rng = SplitMix64(seed);
    let hq = case.heads_kv * case.group;
    let q = random::<T, _>(&mut rng, [case.batch, hq, case.len_q, case.head_dim]);
    let k = random::<T, _>(
        &mut rng,
        [case.batch, case.heads_kv, case.len_kv, case.head_dim],
    );
    let v = random::<T, _>(
        &mut rng,
        [case.batch, case.heads_kv, case.len_kv, case.head_dim_v],
    );
    let dout = random::<T, _>(&mut rng, [case.batch, hq, case.len_q, case.head_dim_v]);
    let row_axis = |shape: &[usize]| shape.len() - 2;
    let (mut bool_mask, mut additive_mask) = (None, None);
    match &case.mask {
        TestMask::None => {}
        TestMask::Bool(shape) => {
            let mut m = ArrayD::from_shape_simple_fn(IxDyn(shape), || rng.symmetric() > -0.5);
            if let Some(row) = case.fully_masked_row {
                m.index_axis_mut(ndarray::Axis(row_axis(shape)), row)
                    .fill(false);
            }
            bool_mask = Some(m);
        }
        TestMask::Additive(shape) => {
            let mut m = ArrayD::from_shape_simple_fn(IxDyn(shape), || {
                let x = rng.symmetric();
                T::narrow(if x < -0.7 { f64::NEG_INFINITY } else { x })
            });
            if let Some(row) = case.fully_masked_row {
                m.index_axis_mut(ndarray::Axis(row_axis(shape)), row)
                    .fill(T::narrow(f64::NEG_INFINITY));
            }
            additive_mask = Some(m);
        }
    }
    Inputs {
        q,
        k,
        v,
        dout,
        bool_mask,
        additive_mask,
    }
}

/// One gradient's verdict: `Err` with the line to print on failure.
fn judge(
    what: &str,
    dtype: DType,
    got: ArrayD<f64>,
    peer: ArrayD<f64>,
    truth: ArrayD<f64>,
) -> Result<String, String> {
    let largest = truth
        .iter()
        .filter(|x| x.is_finite())
        .fold(1.0f64, |m, x| m.max(x.abs()));
    let peer_report = compare(peer.view(), truth.view());
    let report = compare(got.view(), truth.view());
    let bound = if dtype == DType::F64 {
        1e-10 * largest
    } else {
        PEER_FACTOR * peer_report.max_abs + peer_floor(dtype) * largest
    };
    let line = format!(
        "{what}: max|gpu - truth| = {:.3e} (worst at {:?}: gpu {} truth {}; {} non-finite), \
         max|ref_{dtype} - truth| = {:.3e}, bound {:.3e}, max|truth| = {:.3e}",
        report.max_abs,
        report.max_abs_index,
        report.worst.0,
        report.worst.1,
        report.non_finite,
        peer_report.max_abs,
        bound,
        largest
    );
    if report.non_finite == 0 && report.max_abs <= bound && got.shape() == truth.shape() {
        Ok(line)
    } else {
        Err(format!(
            "{line} shape gpu {:?} truth {:?}",
            got.shape(),
            truth.shape()
        ))
    }
}

fn run_case<T: GpuElem>(case: &Case, seed: u64, backend: Backend) -> Vec<Result<String, String>> {
    let dtype = <T as sdpa_cuda::DeviceElement>::DTYPE;
    let x = inputs::<T>(case, seed);
    let wide = |a: &Array4<T>| a.mapv(T::wide);
    let (q64, k64, v64, dout64) = (wide(&x.q), wide(&x.k), wide(&x.v), wide(&x.dout));
    let add64 = x.additive_mask.as_ref().map(|m| m.mapv(T::wide));
    let mask64 = || match (&x.bool_mask, &add64) {
        (Some(m), _) => Some(sdpa_ref::Mask::Bool(m.view())),
        (_, Some(m)) => Some(sdpa_ref::Mask::Additive(m.view())),
        _ => None,
    };
    let mask_t = || match (&x.bool_mask, &x.additive_mask) {
        (Some(m), _) => Some(sdpa_ref::Mask::Bool(m.view())),
        (_, Some(m)) => Some(sdpa_ref::Mask::Additive(m.view())),
        _ => None,
    };
    let options = &case.options;
    let alibi = case
        .alibi
        .then(|| slopes(case.heads_kv * case.group).into_dyn());
    let alibi_view = || alibi.as_ref().map(|a| a.view());
    // The forward every backward below reads: the f64 reference's, out rounded to T.
    let fwd = match alibi_view() {
        None => sdpa_ref::sdpa::<f64>(q64.view(), k64.view(), v64.view(), mask64(), options),
        Some(a) => sdpa_ref::sdpa_with_alibi::<f64>(
            q64.view(),
            k64.view(),
            v64.view(),
            mask64(),
            a,
            options,
        ),
    };
    let fwd = match fwd {
        Ok(f) => f,
        Err(e) => return vec![Err(format!("reference forward failed: {e}"))],
    };
    let out_t: Array4<T> = fwd.out.mapv(T::narrow);
    let out64 = out_t.mapv(T::wide);
    let lse: Array3<f32> = fwd.lse;
    let truth = reference_backward::<f64>(
        q64.view(),
        k64.view(),
        v64.view(),
        out64.view(),
        lse.view(),
        dout64.view(),
        mask64(),
        alibi_view(),
        options,
    );
    let peer = reference_backward::<T>(
        x.q.view(),
        x.k.view(),
        x.v.view(),
        out_t.view(),
        lse.view(),
        x.dout.view(),
        mask_t(),
        alibi_view(),
        options,
    );
    let (truth, peer) = match (truth, peer) {
        (Ok(t), Ok(p)) => (t, p),
        (t, p) => return vec![Err(format!("reference backward failed: {t:?} {p:?}"))],
    };
    let host_mask = match (&x.bool_mask, &x.additive_mask) {
        (Some(m), _) => Some(HostMask::Bool(m.view())),
        (_, Some(m)) => Some(HostMask::Additive(m.view())),
        _ => None,
    };
    let got = match gpu().sdpa_backward_host_with_alibi(
        x.q.view(),
        x.k.view(),
        x.v.view(),
        out_t.view(),
        lse.view(),
        x.dout.view(),
        host_mask.as_ref(),
        alibi_view(),
        options,
        BackendSet::only(backend),
    ) {
        Ok(g) => g,
        Err(e) => return vec![Err(format!("GPU backward failed: {e}"))],
    };
    if got.backend != backend {
        return vec![Err(format!("asked for {backend}, {} ran", got.backend))];
    }
    let w4 = |a: &Array4<T>| a.mapv(T::wide).into_dyn();
    // Truth is the f64 gradient itself, not rounded to T: the GPU's one rounding counts.
    let mut verdicts = Vec::new();
    let t64 = |a: &Array4<f64>| a.clone().into_dyn();
    verdicts.push(judge(
        "dq",
        dtype,
        w4(&got.dq),
        w4(&peer.dq),
        t64(&truth.dq),
    ));
    verdicts.push(judge(
        "dk",
        dtype,
        w4(&got.dk),
        w4(&peer.dk),
        t64(&truth.dk),
    ));
    verdicts.push(judge(
        "dv",
        dtype,
        w4(&got.dv),
        w4(&peer.dv),
        t64(&truth.dv),
    ));
    match (&got.dmask, &peer.dmask, &truth.dmask) {
        (Some(g), Some(p), Some(t)) => verdicts.push(judge(
            "dmask",
            dtype,
            g.mapv(T::wide),
            p.mapv(T::wide),
            t.clone(),
        )),
        (None, None, None) => {}
        (g, _, t) => verdicts.push(Err(format!(
            "dmask: GPU gave {}, the reference {}",
            if g.is_some() { "one" } else { "none" },
            if t.is_some() { "one" } else { "none" }
        ))),
    }
    verdicts
}

/// Every case in each dtype through `backend`; prints every verdict, fails on any.
fn backend_matches_the_reference(backend: Backend, dtypes: &[DType], cases: &[Case]) {
    let mut lines = Vec::new();
    let mut failures = 0;
    for (n, case) in cases.iter().enumerate() {
        for &dtype in dtypes {
            let seed = 1000 + n as u64;
            let verdicts = match dtype {
                DType::F64 => run_case::<f64>(case, seed, backend),
                DType::F32 => run_case::<f32>(case, seed, backend),
                DType::F16 => run_case::<f16>(case, seed, backend),
                DType::BF16 => run_case::<bf16>(case, seed, backend),
            };
            for v in verdicts {
                match v {
                    Ok(line) => lines.push(format!("ok   {backend} {dtype} {}: {line}", case.name)),
                    Err(line) => {
                        failures += 1;
                        lines.push(format!("FAIL {backend} {dtype} {}: {line}", case.name));
                    }
                }
            }
        }
    }
    for line in &lines {
        println!("{line}");
    }
    assert_eq!(
        failures,
        0,
        "{failures} gradients out of bounds (every line above; failing ones):\n{}",
        lines
            .iter()
            .filter(|l| l.starts_with("FAIL"))
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// Longer sequences and wider heads than `cases()`: several key and query tiles of the
/// fused kernels (tiles of 32, or 16 past head dim 128), causal tiles skipped, each
/// head-dim bucket (64, 128, 256).
fn long_cases() -> Vec<Case> {
    let base = Case {
        name: "",
        batch: 1,
        heads_kv: 2,
        group: 2,
        len_q: 77,
        len_kv: 101,
        head_dim: 64,
        head_dim_v: 64,
        mask: TestMask::None,
        fully_masked_row: None,
        alibi: false,
        options: SdpaOptions {
            enable_gqa: true,
            ..Default::default()
        },
    };
    vec![
        Case {
            name: "GQA 2x2 L=77 S=101 E=Ev=64",
            ..base.clone()
        },
        Case {
            name: "GQA 2x2 causal top-left L=101 S=77 E=128 Ev=96",
            len_q: 101,
            len_kv: 77,
            head_dim: 128,
            head_dim_v: 96,
            options: SdpaOptions {
                enable_gqa: true,
                causal: Causal::TopLeft,
                ..Default::default()
            },
            ..base.clone()
        },
        Case {
            name: "causal bottom-right L=70 S=130 E=200 Ev=256 + dropout 0.2",
            group: 1,
            len_q: 70,
            len_kv: 130,
            head_dim: 200,
            head_dim_v: 256,
            options: SdpaOptions {
                causal: Causal::BottomRight,
                dropout: Dropout::new(0.2, 99, 12),
                ..Default::default()
            },
            ..base.clone()
        },
        Case {
            name: "additive [B, 1, L, S] + bool-free key padding via -inf, L=S=96",
            group: 1,
            len_q: 96,
            len_kv: 96,
            mask: TestMask::Additive(vec![1, 1, 96, 96]),
            options: SdpaOptions::default(),
            ..base.clone()
        },
        Case {
            name: "bool [L, S] + a fully masked row, L=40 S=150, E=16 Ev=8",
            group: 1,
            len_q: 40,
            len_kv: 150,
            head_dim: 16,
            head_dim_v: 8,
            mask: TestMask::Bool(vec![40, 150]),
            fully_masked_row: Some(33),
            options: SdpaOptions::default(),
            ..base
        },
    ]
}

/// Sliding window, softcap and ALiBi (DESIGN.md "Inference"), alone and with causal,
/// masks and dropout: key blocks outside a window skipped at both ends, rows with no
/// key, dS times 1 - tanh^2, dmask without that factor.
fn mods_cases() -> Vec<Case> {
    let window = |left, right| sdpa_core::Window { left, right };
    let base = Case {
        name: "",
        batch: 2,
        heads_kv: 2,
        group: 2,
        len_q: 200,
        len_kv: 260,
        head_dim: 64,
        head_dim_v: 64,
        mask: TestMask::None,
        fully_masked_row: None,
        options: SdpaOptions {
            enable_gqa: true,
            ..Default::default()
        },
        alibi: false,
    };
    vec![
        Case {
            name: "window (20, 5) L=200 S=260 GQA 2",
            options: SdpaOptions {
                window: window(20, 5),
                ..base.options
            },
            ..base.clone()
        },
        Case {
            name: "softcap 5 + ALiBi + causal bottom-right L=150 S=300 E=128",
            len_q: 150,
            len_kv: 300,
            head_dim: 128,
            head_dim_v: 128,
            options: SdpaOptions {
                softcap: Some(5.0),
                causal: Causal::BottomRight,
                ..base.options
            },
            alibi: true,
            ..base.clone()
        },
        Case {
            name: "window (0, 0) + causal top-left + softcap 1, L=S=130, MQA 1x4",
            heads_kv: 1,
            group: 4,
            len_q: 130,
            len_kv: 130,
            options: SdpaOptions {
                window: window(0, 0),
                causal: Causal::TopLeft,
                softcap: Some(1.0),
                ..base.options
            },
            ..base.clone()
        },
        Case {
            name: "window (-1, 3) L=300 S=100 (rows with no key) E=32",
            group: 1,
            len_q: 300,
            len_kv: 100,
            head_dim: 32,
            head_dim_v: 32,
            options: SdpaOptions {
                window: window(-1, 3),
                ..Default::default()
            },
            ..base.clone()
        },
        Case {
            name: "softcap 2 + ALiBi + additive [L, S] + window (40, -1) + dropout 0.2, E=40 Ev=24",
            len_q: 70,
            len_kv: 90,
            head_dim: 40,
            head_dim_v: 24,
            mask: TestMask::Additive(vec![70, 90]),
            options: SdpaOptions {
                softcap: Some(2.0),
                window: window(40, -1),
                dropout: Dropout::new(0.2, 99, 3),
                ..base.options
            },
            alibi: true,
            ..base.clone()
        },
        Case {
            name: "ALiBi + bool key padding [B, 1, 1, S] + window (16, 16), E=48",
            len_q: 90,
            len_kv: 110,
            head_dim: 48,
            head_dim_v: 48,
            mask: TestMask::Bool(vec![2, 1, 1, 110]),
            options: SdpaOptions {
                window: window(16, 16),
                ..base.options
            },
            alibi: true,
            ..base
        },
    ]
}

#[test]
#[ignore = "needs a CUDA device"]
fn math_backward_matches_the_reference_in_every_dtype() {
    let mut all = cases();
    all.extend(long_cases());
    all.extend(mods_cases());
    backend_matches_the_reference(
        Backend::Math,
        &[DType::F64, DType::F32, DType::F16, DType::BF16],
        &all,
    );
}

#[test]
#[ignore = "needs a CUDA device"]
fn efficient_backward_matches_the_reference_in_every_dtype() {
    let mut all = cases();
    all.extend(long_cases());
    all.extend(mods_cases());
    backend_matches_the_reference(
        Backend::Efficient,
        &[DType::F32, DType::F16, DType::BF16],
        &all,
    );
}

/// The cases flash takes (no mask, E == Ev, head dims up to the tensor-core backward's).
fn flash_cases(all: Vec<Case>) -> Vec<Case> {
    all.into_iter()
        .filter(|c| {
            matches!(c.mask, TestMask::None) && c.head_dim == c.head_dim_v && c.head_dim <= 128
        })
        .collect()
}

#[test]
#[ignore = "needs a CUDA device"]
fn flash_backward_matches_the_reference() {
    let mut all = cases();
    all.extend(long_cases());
    all.extend(mods_cases());
    let flash = flash_cases(all);
    assert!(flash.len() >= 2, "{} flash cases", flash.len());
    // And flash's own: dropout, GQA, L != S both ways, head dims 32, 96, 128.
    let extra = |name, len_q, len_kv, head_dim, group, causal, p: f64| Case {
        name,
        batch: 2,
        heads_kv: 2,
        group,
        len_q,
        len_kv,
        head_dim,
        head_dim_v: head_dim,
        mask: TestMask::None,
        fully_masked_row: None,
        alibi: false,
        options: SdpaOptions {
            enable_gqa: group > 1,
            causal,
            dropout: if p > 0.0 {
                Dropout::new(p, 77, 4)
            } else {
                Dropout::NONE
            },
            ..Default::default()
        },
    };
    let mut flash = flash;
    flash.extend([
        extra(
            "flash E=32 L=200 S=130 top-left",
            200,
            130,
            32,
            1,
            Causal::TopLeft,
            0.0,
        ),
        extra(
            "flash E=96 L=77 S=260 GQA 3 bottom-right dropout 0.15",
            77,
            260,
            96,
            3,
            Causal::BottomRight,
            0.15,
        ),
        extra(
            "flash E=128 L=260 S=260 dropout 0.1 (S % 4 == 0)",
            260,
            260,
            128,
            1,
            Causal::None,
            0.1,
        ),
        // Mask- and dropout-free: the Hopper kernel on sm_90 (query blocks of 128 rows at
        // E = 64, 64 at E = 128; 128 keys a CTA), several key and query blocks, partial
        // blocks at both ends, padded head dims.
        extra(
            "flash E=64 L=300 S=517 GQA 2 top-left",
            300,
            517,
            64,
            2,
            Causal::TopLeft,
            0.0,
        ),
        extra(
            "flash E=128 L=190 S=333 bottom-right",
            190,
            333,
            128,
            1,
            Causal::BottomRight,
            0.0,
        ),
        extra(
            "flash E=80 L=257 S=129 GQA 3",
            257,
            129,
            80,
            3,
            Causal::None,
            0.0,
        ),
        extra(
            "flash E=48 L=333 S=190 bottom-right (fully masked rows)",
            333,
            190,
            48,
            1,
            Causal::BottomRight,
            0.0,
        ),
        extra("flash E=128 L=1 S=700", 1, 700, 128, 1, Causal::None, 0.0),
        extra(
            "flash E=64 L=700 S=1 top-left",
            700,
            1,
            64,
            1,
            Causal::TopLeft,
            0.0,
        ),
        extra(
            "flash E=64 L=130 S=131 GQA 2 dropout 0.3 (S % 4 != 0)",
            130,
            131,
            64,
            2,
            Causal::None,
            0.3,
        ),
    ]);
    backend_matches_the_reference(Backend::Flash, &[DType::F16, DType::BF16], &flash);
}

/// The backward of mask-free `case` with the inputs of `seed`, through `backend` on
/// `ctx`, from the f64 reference's forward (its out rounded to `T`).
fn maskless_backward<T: GpuElem>(
    ctx: &sdpa_cuda::GpuContext,
    case: &Case,
    seed: u64,
    backend: Backend,
) -> sdpa_cuda::HostGradients<T> {
    let x = inputs::<T>(case, seed);
    let wide = |a: &Array4<T>| a.mapv(T::wide);
    let fwd = sdpa_ref::sdpa::<f64>(
        wide(&x.q).view(),
        wide(&x.k).view(),
        wide(&x.v).view(),
        None,
        &case.options,
    )
    .unwrap();
    let out: Array4<T> = fwd.out.mapv(T::narrow);
    ctx.sdpa_backward_host(
        x.q.view(),
        x.k.view(),
        x.v.view(),
        out.view(),
        fwd.lse.view(),
        x.dout.view(),
        None,
        &case.options,
        BackendSet::only(backend),
    )
    .unwrap()
}

#[test]
#[ignore = "needs a CUDA device"]
fn flash_backward_is_bitwise_repeatable_in_deterministic_mode() {
    // Its own context: the switch is context-wide and the shared one runs other tests.
    let det = sdpa_cuda::GpuContext::new(0).unwrap();
    det.set_deterministic_backward(true);
    let case = Case {
        name: "deterministic: L=300 S=520 E=64 GQA 2 causal bottom-right",
        batch: 2,
        heads_kv: 1,
        group: 2,
        len_q: 300,
        len_kv: 520,
        head_dim: 64,
        head_dim_v: 64,
        mask: TestMask::None,
        fully_masked_row: None,
        alibi: false,
        options: SdpaOptions {
            enable_gqa: true,
            causal: Causal::BottomRight,
            ..Default::default()
        },
    };
    let run = |ctx| maskless_backward::<f16>(ctx, &case, 9, Backend::Flash);
    let (a, b, free) = (run(&det), run(&det), run(gpu()));
    let bits = |x: &Array4<f16>| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&a.dq), bits(&b.dq));
    assert_eq!(bits(&a.dk), bits(&b.dk));
    assert_eq!(bits(&a.dv), bits(&b.dv));
    // The same sums in another order: equal to the atomic mode's up to f32 rounding
    // (then one f16 rounding).
    let worst =
        a.dq.iter()
            .zip(free.dq.iter())
            .map(|(p, q)| (p.to_f64() - q.to_f64()).abs())
            .fold(0.0, f64::max);
    let scale = free.dq.iter().map(|v| v.to_f64().abs()).fold(0.0, f64::max);
    assert!(
        worst <= 2e-3 * scale.max(1e-3),
        "dq differs by {worst} (magnitude {scale})"
    );
    assert_eq!(bits(&a.dk), bits(&free.dk));
}

#[test]
#[ignore = "needs a CUDA device"]
fn efficient_backward_is_bitwise_repeatable() {
    // The f32 scalar kernel: no atomics on dq, dk, dv, each element one warp's
    // fixed-order sum. (The f16/bf16 tensor-core kernel adds dq with atomics.)
    let case = &long_cases()[1];
    let run = || maskless_backward::<f32>(gpu(), case, 5, Backend::Efficient);
    let (a, b) = (run(), run());
    let bits = |x: &Array4<f32>| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&a.dq), bits(&b.dq));
    assert_eq!(bits(&a.dk), bits(&b.dk));
    assert_eq!(bits(&a.dv), bits(&b.dv));
}

#[test]
#[ignore = "needs a CUDA device"]
fn backward_dispatch_takes_tensor_cores_then_math_where_it_fits() {
    let mut rng = SplitMix64(3);
    let lse = Array3::<f32>::zeros((1, 1, 4));
    // q, k, v, out and dout all one array: only the dispatch is under test.
    fn run<T: GpuElem>(
        q: &Array4<T>,
        lse: &Array3<f32>,
        backends: BackendSet,
    ) -> Result<sdpa_cuda::HostGradients<T>, sdpa_cuda::CudaError> {
        let v = q.view();
        gpu().sdpa_backward_host(
            v,
            v,
            v,
            v,
            lse.view(),
            v,
            None,
            &SdpaOptions::default(),
            backends,
        )
    }
    let q64 = random::<f64, _>(&mut rng, [1, 1, 4, 8]);
    // f64 has no fused backward: math runs.
    assert_eq!(
        run(&q64, &lse, BackendSet::ALL).unwrap().backend,
        Backend::Math
    );
    let e = run(&q64, &lse, BackendSet::only(Backend::Efficient)).unwrap_err();
    assert!(e.to_string().contains("efficient"), "{e}");
    let q32 = random::<f32, _>(&mut rng, [1, 1, 4, 8]);
    // Math's scratch fits: math (the faster) runs; efficient only when asked for.
    assert_eq!(
        run(&q32, &lse, BackendSet::ALL).unwrap().backend,
        Backend::Math
    );
    assert_eq!(
        run(&q32, &lse, BackendSet::only(Backend::Efficient))
            .unwrap()
            .backend,
        Backend::Efficient
    );
    let e = run(&q32, &lse, BackendSet::only(Backend::Flash)).unwrap_err();
    assert!(e.to_string().contains("f16 or bf16"), "{e}");
    // f16: the tensor-core backward, as flash, else as efficient.
    let q16 = random::<f16, _>(&mut rng, [1, 1, 4, 8]);
    assert_eq!(
        run(&q16, &lse, BackendSet::ALL).unwrap().backend,
        Backend::Flash
    );
    assert_eq!(
        run(&q16, &lse, BackendSet::ALL.without(Backend::Flash))
            .unwrap()
            .backend,
        Backend::Efficient
    );
}

#[test]
#[ignore = "needs a CUDA device"]
fn hopper_backward_takes_every_option_on_sm90() {
    use sdpa_core::{Problem, TensorDesc};
    use sdpa_cuda::spec::Kind;
    use sdpa_cuda::tc_backward_spec;
    let gpu = gpu();
    let problem = |dim: usize, options: &SdpaOptions| {
        let t = |len| TensorDesc::contiguous(DType::BF16, [2, 4, len, dim]);
        Problem::new(&t(300), &t(500), &t(500), None, options).unwrap()
    };
    let plain = SdpaOptions {
        causal: Causal::BottomRight,
        ..Default::default()
    };
    let dropout = SdpaOptions {
        dropout: Dropout::new(0.1, 1, 0),
        ..Default::default()
    };
    // The window runs on the plain variant; softcap and ALiBi take the extras one.
    let window = SdpaOptions {
        window: sdpa_core::Window { left: 64, right: 0 },
        ..Default::default()
    };
    let softcap = SdpaOptions {
        softcap: Some(30.0),
        ..Default::default()
    };
    let wgmma = gpu.arch() == 90;
    let kind = |dim, options: &SdpaOptions| tc_backward_spec(gpu, &problem(dim, options)).unwrap();
    for dim in [40, 64, 96, 128] {
        for (options, extras) in [
            (&plain, false),
            (&dropout, true),
            (&window, false),
            (&softcap, true),
        ] {
            let spec = kind(dim, options);
            assert_eq!(spec.kind == Kind::BwdWgmma, wgmma, "E={dim}: {spec:?}");
            assert_eq!(spec.head_dim, if dim <= 64 { 64 } else { 128 });
            assert_eq!(spec.extras, extras, "E={dim}: {spec:?}");
        }
        let alibi = sdpa_cuda::tc_backward_spec_with(gpu, &problem(dim, &plain), true).unwrap();
        assert!(alibi.extras, "E={dim}: {alibi:?}");
    }
    // Head dims the Hopper kernel has no class for stay on mma.sync.
    assert_eq!(kind(32, &plain).kind, Kind::BwdTc);
    assert_eq!(kind(32, &dropout).kind, Kind::BwdTc);
}

#[test]
#[ignore = "needs a CUDA device"]
fn backward_refuses_bad_arguments_by_name() {
    let gpu = gpu();
    let mut rng = SplitMix64(7);
    let q = random::<f32, _>(&mut rng, [1, 2, 5, 8]);
    let lse = Array3::<f32>::zeros((1, 2, 5));
    let wrong_dout = random::<f32, _>(&mut rng, [1, 2, 5, 7]);
    let e = gpu
        .sdpa_backward_host(
            q.view(),
            q.view(),
            q.view(),
            q.view(),
            lse.view(),
            wrong_dout.view(),
            None,
            &SdpaOptions::default(),
            BackendSet::ALL,
        )
        .unwrap_err();
    assert!(e.to_string().starts_with("dout:"), "{e}");
    let short_lse = Array3::<f32>::zeros((1, 2, 4));
    let e = gpu
        .sdpa_backward_host(
            q.view(),
            q.view(),
            q.view(),
            q.view(),
            short_lse.view(),
            q.view(),
            None,
            &SdpaOptions::default(),
            BackendSet::ALL,
        )
        .unwrap_err();
    assert!(e.to_string().starts_with("lse:"), "{e}");
}

#[test]
#[ignore = "needs a CUDA device"]
fn sanitize_backward_small() {
    // Small problems through both backwards, for compute-sanitizer (memcheck, racecheck):
    // several tiles of the fused kernels (tiles of 32, and of 16 past head dim 128),
    // causal skips, a mask with dmask, dropout. Each judged as in the full tests.
    let cases = vec![
        Case {
            name:
                "sanitize f16-sized: L=40 S=70 E=64 causal bottom-right + additive [L, S] + dropout",
            batch: 1,
            heads_kv: 1,
            group: 2,
            len_q: 40,
            len_kv: 70,
            head_dim: 64,
            head_dim_v: 48,
            mask: TestMask::Additive(vec![40, 70]),
            fully_masked_row: None,
            alibi: false,
            options: SdpaOptions {
                enable_gqa: true,
                causal: Causal::BottomRight,
                dropout: Dropout::new(0.2, 5, 0),
                ..Default::default()
            },
        },
        Case {
            name: "sanitize: L=20 S=36 E=200 Ev=136 bool [B, 1, 1, S]",
            batch: 2,
            heads_kv: 1,
            group: 1,
            len_q: 20,
            len_kv: 36,
            head_dim: 200,
            head_dim_v: 136,
            mask: TestMask::Bool(vec![2, 1, 1, 36]),
            fully_masked_row: None,
            alibi: false,
            options: SdpaOptions::default(),
        },
    ];
    backend_matches_the_reference(Backend::Efficient, &[DType::F16, DType::F32], &cases);
    backend_matches_the_reference(Backend::Math, &[DType::BF16], &cases);
    // The tensor-core backward's plain variant (flash: no mask; the Hopper kernel on
    // sm_90), several key and query blocks, GQA, causal skips, a partial last block.
    let flash = vec![Case {
        name: "sanitize flash: L=150 S=200 E=64 GQA 2 causal top-left",
        batch: 1,
        heads_kv: 1,
        group: 2,
        len_q: 150,
        len_kv: 200,
        head_dim: 64,
        head_dim_v: 64,
        mask: TestMask::None,
        fully_masked_row: None,
        alibi: false,
        options: SdpaOptions {
            enable_gqa: true,
            causal: Causal::TopLeft,
            ..Default::default()
        },
    }];
    let mut flash = flash;
    flash.push(Case {
        name: "sanitize flash: L=70 S=150 E=128 causal bottom-right",
        len_q: 70,
        len_kv: 150,
        head_dim: 128,
        head_dim_v: 128,
        group: 1,
        options: SdpaOptions {
            causal: Causal::BottomRight,
            ..Default::default()
        },
        ..flash[0].clone()
    });
    // Window both sides, softcap and ALiBi: the extras variant (Hopper on sm_90).
    flash.push(Case {
        name: "sanitize flash: L=150 S=200 E=64 GQA 2 window (30, 10) + softcap 4 + ALiBi",
        alibi: true,
        options: SdpaOptions {
            enable_gqa: true,
            window: sdpa_core::Window {
                left: 30,
                right: 10,
            },
            softcap: Some(4.0),
            ..Default::default()
        },
        ..flash[0].clone()
    });
    backend_matches_the_reference(Backend::Flash, &[DType::BF16], &flash);
    let mods = vec![Case {
        name: "sanitize: L=40 S=70 E=64 window (12, 3) + softcap 2 + ALiBi + additive [L, S]",
        alibi: true,
        options: SdpaOptions {
            enable_gqa: true,
            window: sdpa_core::Window { left: 12, right: 3 },
            softcap: Some(2.0),
            ..Default::default()
        },
        ..cases[0].clone()
    }];
    backend_matches_the_reference(Backend::Efficient, &[DType::F16], &mods);
    backend_matches_the_reference(Backend::Math, &[DType::F32], &mods);
}

/// A random problem: shapes, GQA, causal alignment, mask kind and broadcast, dropout,
/// scale; `n` picks the draw.
fn random_case(n: u64) -> Case {
    let mut rng = SplitMix64(0xbac4_0000 + n);
    let mut pick = |k: u64| (rng.next_u64() % k) as usize;
    let group = [1, 1, 2, 3][pick(4)];
    let heads_kv = 1 + pick(2);
    let len_q = 1 + pick(70);
    let len_kv = 1 + pick(70);
    let head_dim = [8, 16, 40, 64, 96, 128, 200][pick(7)];
    let head_dim_v = if pick(2) == 0 {
        head_dim
    } else {
        [8, 24, 64, 136][pick(4)]
    };
    let batch = 1 + pick(2);
    let causal = [Causal::None, Causal::TopLeft, Causal::BottomRight][pick(3)];
    let hq = heads_kv * group;
    let mask = match pick(4) {
        0 | 1 => TestMask::None,
        2 => TestMask::Bool(match pick(3) {
            0 => vec![len_q, len_kv],
            1 => vec![batch, 1, 1, len_kv],
            _ => vec![batch, hq, len_q, len_kv],
        }),
        _ => TestMask::Additive(match pick(3) {
            0 => vec![len_q, len_kv],
            1 => vec![1, hq, 1, len_kv],
            _ => vec![batch, 1, len_q, len_kv],
        }),
    };
    let dropout = match pick(3) {
        0 => Dropout::new(0.25, 0x1234 + n, 64 * n),
        _ => Dropout::NONE,
    };
    let scale = if pick(4) == 0 { Some(-0.4) } else { None };
    Case {
        // A test's one-off label: leaked for the &'static str the fixed cases use.
        name: Box::leak(format!("random draw {n}").into_boxed_str()),
        batch,
        heads_kv,
        group,
        len_q,
        len_kv,
        head_dim,
        head_dim_v,
        mask,
        fully_masked_row: None,
        alibi: false,
        options: SdpaOptions {
            causal,
            dropout,
            scale,
            enable_gqa: group > 1,
            ..Default::default()
        },
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn random_problems_match_the_reference_on_every_backend() {
    // PROPTEST_CASES random problems (default 24) through each backend, each dtype it
    // takes; a failing line names the draw and its case.
    let n: u64 = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(24);
    let cases: Vec<Case> = (0..n).map(random_case).collect();
    for c in &cases {
        println!("{c:?}");
    }
    backend_matches_the_reference(
        Backend::Efficient,
        &[DType::F32, DType::F16, DType::BF16],
        &cases,
    );
    backend_matches_the_reference(
        Backend::Math,
        &[DType::F64, DType::F32, DType::BF16],
        &cases,
    );
    backend_matches_the_reference(
        Backend::Flash,
        &[DType::F16, DType::BF16],
        &flash_cases(cases),
    );
}

/// `[B, H, max, D]` padded -> `[1, H, total, D]` packed (the rows of each sequence's
/// first `lens[b]` positions, in order).
fn pack<T: Copy>(a: &Array4<T>, lens: &[usize]) -> Array4<T> {
    let (heads, dim) = (a.shape()[1], a.shape()[3]);
    let total: usize = lens.iter().sum();
    let mut out = Vec::with_capacity(heads * total * dim);
    for h in 0..heads {
        for (b, &len) in lens.iter().enumerate() {
            for i in 0..len {
                out.extend(a.slice(ndarray::s![b, h, i, ..]).iter().copied());
            }
        }
    }
    Array4::from_shape_vec((1, heads, total, dim), out).unwrap()
}

fn cu_seqlens(lens: &[usize]) -> sdpa_cuda::DeviceSeqlens {
    let mut c = vec![0i32];
    for &l in lens {
        c.push(c.last().unwrap() + l as i32);
    }
    sdpa_cuda::DeviceSeqlens::upload_i32(gpu(), &c).unwrap()
}

/// The varlen backward equals the padded dense reference backward (a key-padding mask,
/// dout 0 on padded rows) on every packed row, judged by the peer rule.
fn varlen_backward_case<T: GpuElem>(
    lens_q: &[usize],
    lens_k: &[usize],
    options: &SdpaOptions,
) -> Vec<Result<String, String>> {
    let gpu = gpu();
    let (hq, hkv, e, ev) = (4, 2, 40, 24);
    let dtype = <T as sdpa_cuda::DeviceElement>::DTYPE;
    let batch = lens_q.len();
    let (max_q, max_k) = (*lens_q.iter().max().unwrap(), *lens_k.iter().max().unwrap());
    let mut rng = SplitMix64(lens_q.iter().sum::<usize>() as u64 * 131 + 7);
    let q = random::<T, _>(&mut rng, [batch, hq, max_q, e]);
    let k = random::<T, _>(&mut rng, [batch, hkv, max_k, e]);
    let v = random::<T, _>(&mut rng, [batch, hkv, max_k, ev]);
    let mut dout = random::<T, _>(&mut rng, [batch, hq, max_q, ev]);
    for (b, &len) in lens_q.iter().enumerate() {
        dout.slice_mut(ndarray::s![b, .., len.., ..])
            .fill(T::narrow(0.0));
    }
    let key_pad =
        ndarray::Array::from_shape_fn(IxDyn(&[batch, 1, 1, max_k]), |ix| ix[3] < lens_k[ix[0]]);
    let mask = || Some(sdpa_ref::Mask::Bool(key_pad.view()));
    let wide = |a: &Array4<T>| a.mapv(T::wide);
    let fwd = sdpa_ref::sdpa::<f64>(
        wide(&q).view(),
        wide(&k).view(),
        wide(&v).view(),
        mask(),
        options,
    )
    .unwrap();
    let out_t: Array4<T> = fwd.out.mapv(T::narrow);
    let truth = reference_backward::<f64>(
        wide(&q).view(),
        wide(&k).view(),
        wide(&v).view(),
        out_t.mapv(T::wide).view(),
        fwd.lse.view(),
        wide(&dout).view(),
        mask(),
        None,
        options,
    );
    let peer = reference_backward::<T>(
        q.view(),
        k.view(),
        v.view(),
        out_t.view(),
        fwd.lse.view(),
        dout.view(),
        Some(sdpa_ref::Mask::Bool(key_pad.view())),
        None,
        options,
    );
    let (truth, peer) = match (truth, peer) {
        (Ok(t), Ok(p)) => (t, p),
        (t, p) => return vec![Err(format!("reference backward failed: {t:?} {p:?}"))],
    };
    let up = |a: Array4<T>| sdpa_cuda::DeviceTensor::upload(gpu, a.view()).unwrap();
    let lse4 = fwd
        .lse
        .clone()
        .into_shape_with_order((batch, hq, max_q, 1))
        .unwrap();
    let (cq, ck) = (cu_seqlens(lens_q), cu_seqlens(lens_k));
    let got = gpu.sdpa_varlen_backward(
        &up(pack(&q, lens_q)),
        &up(pack(&k, lens_k)),
        &up(pack(&v, lens_k)),
        sdpa_cuda::Varlen {
            cu_seqlens_q: &cq,
            cu_seqlens_k: &ck,
        },
        &up(pack(&out_t, lens_q)),
        &sdpa_cuda::DeviceTensor::upload(gpu, pack(&lse4, lens_q).view()).unwrap(),
        &up(pack(&dout, lens_q)),
        options,
        BackendSet::ALL,
    );
    let got = match got {
        Ok(g) => g,
        Err(e) => return vec![Err(format!("GPU varlen backward failed: {e}"))],
    };
    let down = |t: &sdpa_cuda::DeviceTensor| t.download::<T>(gpu).unwrap().mapv(T::wide).into_dyn();
    let packed64 = |a: &Array4<f64>, lens: &[usize]| pack(a, lens).into_dyn();
    let packed_t = |a: &Array4<T>, lens: &[usize]| pack(&a.mapv(T::wide), lens).into_dyn();
    vec![
        judge(
            "dq",
            dtype,
            down(&got.dq),
            packed_t(&peer.dq, lens_q),
            packed64(&truth.dq, lens_q),
        ),
        judge(
            "dk",
            dtype,
            down(&got.dk),
            packed_t(&peer.dk, lens_k),
            packed64(&truth.dk, lens_k),
        ),
        judge(
            "dv",
            dtype,
            down(&got.dv),
            packed_t(&peer.dv, lens_k),
            packed64(&truth.dv, lens_k),
        ),
    ]
}

#[test]
#[ignore = "needs a CUDA device"]
fn varlen_backward_matches_the_padded_reference() {
    let lens_q = [1usize, 70, 7, 40, 0, 33];
    let lens_k = [5usize, 70, 1, 90, 9, 33];
    let mut lines = Vec::new();
    let mut failures = 0;
    for (name, options) in [
        (
            "plain",
            SdpaOptions {
                enable_gqa: true,
                ..Default::default()
            },
        ),
        (
            "causal top-left",
            SdpaOptions {
                enable_gqa: true,
                causal: Causal::TopLeft,
                ..Default::default()
            },
        ),
        (
            "dropout 0.25",
            SdpaOptions {
                enable_gqa: true,
                dropout: Dropout::new(0.25, 31, 8),
                ..Default::default()
            },
        ),
    ] {
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            let verdicts = match dtype {
                DType::F32 => varlen_backward_case::<f32>(&lens_q, &lens_k, &options),
                DType::F16 => varlen_backward_case::<f16>(&lens_q, &lens_k, &options),
                _ => varlen_backward_case::<bf16>(&lens_q, &lens_k, &options),
            };
            for v in verdicts {
                match v {
                    Ok(l) => lines.push(format!("ok   varlen {dtype} {name}: {l}")),
                    Err(l) => {
                        failures += 1;
                        lines.push(format!("FAIL varlen {dtype} {name}: {l}"));
                    }
                }
            }
        }
    }
    for l in &lines {
        println!("{l}");
    }
    assert_eq!(failures, 0, "{}", lines.join("\n"));
}
