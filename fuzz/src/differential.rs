//! `differential`: small consistent problems (the proptest strategies' ranges, lengths
//! and head dims up to 16), each run through the reference in f32, f16 or bf16 and
//! compared with the f64 reference on the same rounded inputs, within the dtype's
//! tolerance preset (`sdpa_harness::tolerance`); the lse within `judge::LSE`. Then the
//! backward with a random `dout`: dq, dk, dv (and dmask) of the reference in the dtype
//! against the f64 reference's, within [`grad_bound`] of the gradients' magnitude.
//!
//! Where a CUDA device answers (`sdpa_cuda::driver_available` and `GpuContext::new(0)`,
//! checked once per process), every CUDA backend whose support check passes runs the
//! same case (forced with `BackendSet::only`) and is held to the same preset and lse
//! tolerance against the same f64 truth. Without a device that half is skipped, so the
//! target builds and runs on machines with no CUDA.

use arbitrary::{Arbitrary, Unstructured};
use sdpa_core::{check_support, Backend, BackendSet, Causal, DType, Device, Dropout, SdpaOptions};
use sdpa_cuda::GpuContext;
use sdpa_harness::case::Case;
use sdpa_harness::compare::compare_with;
use sdpa_harness::run::RunOutput;
use sdpa_harness::strategies::{MaskSpec, ProblemSpec};
use sdpa_harness::{judge, run, tolerance};
use std::sync::OnceLock;

#[derive(Debug, Clone, Arbitrary)]
struct Input {
    /// f32, f16 or bf16.
    dtype: u8,
    /// `B` (1-2), `Hkv` (1-2), group (1-3), `L`, `S`, `E`, `Ev` (1-16).
    dims: [u8; 7],
    /// 0 none, 1 bool, 2 additive.
    mask_kind: u8,
    /// Axes of the mask at full extent (others 1), and how many leading 1s to drop.
    mask_full: u8,
    mask_rank: u8,
    /// Bool: probability (/256) of `true`, from 0.3; additive: of `-inf`, below 0.5.
    mask_probability: u8,
    causal: u8,
    /// `p = x / 65536 * 0.9`, seed, offset.
    dropout: Option<(u16, u64, u64)>,
    /// `x / 16384`, in `[-2, 2)`.
    scale: Option<i16>,
    data_seed: u64,
}

impl Input {
    fn spec(&self) -> ProblemSpec {
        let d = self.dims.map(|x| x as usize);
        let group = 1 + d[2] % 3;
        let spec_dims = [
            1 + d[0] % 2,
            (1 + d[1] % 2) * group,
            1 + d[3] % 16,
            1 + d[4] % 16,
        ];
        let prob = self.mask_probability as f64 / 256.0;
        let shape = || {
            // A shape that broadcasts to [B, Hq, L, S], as strategies::broadcast_shape.
            let full: Vec<usize> = (0..4)
                .map(|axis| {
                    if self.mask_full >> axis & 1 == 1 {
                        spec_dims[axis]
                    } else {
                        1
                    }
                })
                .collect();
            let mut drop = 4 - self.mask_rank as usize % 5;
            let mut start = 0;
            while drop > 0 && start < 4 && full[start] == 1 {
                start += 1;
                drop -= 1;
            }
            full[start..].to_vec()
        };
        let mask = match self.mask_kind % 3 {
            0 => MaskSpec::None,
            1 => MaskSpec::Bool {
                shape: shape(),
                keep: 0.3 + 0.7 * prob,
            },
            _ => MaskSpec::Additive {
                shape: shape(),
                neg_inf: 0.5 * prob,
            },
        };
        ProblemSpec {
            batch: spec_dims[0],
            heads_kv: 1 + d[1] % 2,
            group,
            len_q: spec_dims[2],
            len_kv: spec_dims[3],
            head_dim: 1 + d[5] % 16,
            head_dim_v: 1 + d[6] % 16,
            mask,
            options: SdpaOptions {
                causal: match self.causal % 3 {
                    0 => Causal::None,
                    1 => Causal::TopLeft,
                    _ => Causal::BottomRight,
                },
                dropout: self.dropout.map_or(Dropout::NONE, |(p, seed, offset)| {
                    // Offsets below 2^62: a generated problem must be valid, and an offset
                    // whose counters run past 2^64 is refused (the api target covers that).
                    Dropout::new(p as f64 / 65536.0 * 0.9, seed, offset >> 2)
                }),
                scale: self.scale.map(|s| s as f64 / 16384.0),
                enable_gqa: group > 1,
                ..Default::default()
            },
            data_seed: self.data_seed,
        }
    }
}

/// The problem a fuzz input decodes to (dtype and spec), for triaging a crash file:
/// `cargo run --example describe -- FILE...`. `None` where the bytes are too
/// short to decode (the target skips those).
pub fn describe(data: &[u8]) -> Option<String> {
    let (dtype, spec) = decode(data)?;
    Some(format!("{dtype} {spec:?}"))
}

/// The dtype and problem a fuzz input decodes to (`None`: too short, skipped).
pub fn decode(data: &[u8]) -> Option<(DType, ProblemSpec)> {
    let input = Input::arbitrary_take_rest(Unstructured::new(data)).ok()?;
    let dtype = [DType::F32, DType::F16, DType::BF16][input.dtype as usize % 3];
    Some((dtype, input.spec()))
}

/// One fuzz input; panics on a violated property.
pub fn run(data: &[u8]) {
    let Some((dtype, spec)) = decode(data) else {
        return;
    };
    let case = spec.to_case(dtype);
    let got = run::run_reference(&case).expect("generated problems are valid");
    let truth = run::run_reference_f64(&case).expect("generated problems are valid");
    let tol = tolerance::for_dtype(dtype);
    let out = compare_with(
        got.out.to_f64().view(),
        truth.out.to_f64().view(),
        Some(&tol),
    );
    assert!(out.passes(), "{dtype} out vs f64: {out}\n{spec:?}");
    let lse = compare_with(
        got.lse.mapv(f64::from).view(),
        truth.lse.mapv(f64::from).view(),
        Some(&judge::LSE),
    );
    assert!(lse.passes(), "{dtype} lse vs f64: {lse}\n{spec:?}");
    cuda_backends_agree(&case, &truth, dtype);
    backward_agrees(&case, dtype, spec.data_seed);
}

/// A gradient's bound, of the largest gradient's magnitude (at least 1): one rounding of
/// the dtype and f32 intermediates over at most 16 x 3 terms, with margin. A gross error
/// (D left out, a dropout factor missing, a wrong GQA or broadcast sum) is O(1) of it;
/// the tight judging is golden_backward's (libtorch) and the GPU tests' (peer rule).
fn grad_bound(dtype: DType) -> f64 {
    match dtype {
        DType::F64 => 1e-10,
        DType::F32 => 1e-4,
        DType::F16 => 2e-3,
        DType::BF16 => 1e-2,
    }
}

fn gradients_close(
    what: &str,
    got: &run::BackwardOutput,
    truth: &run::BackwardOutput,
    dtype: DType,
    case: &Case,
) {
    let pairs = [
        ("dq", Some(&got.dq), Some(&truth.dq)),
        ("dk", Some(&got.dk), Some(&truth.dk)),
        ("dv", Some(&got.dv), Some(&truth.dv)),
        ("dmask", got.dmask.as_ref(), truth.dmask.as_ref()),
    ];
    for (name, g, t) in pairs {
        let (g, t) = match (g, t) {
            (Some(g), Some(t)) => (g.to_f64(), t.to_f64()),
            (None, None) => continue,
            _ => panic!(
                "{what} {dtype} {name}: present on one side only\n{:?}",
                case.options
            ),
        };
        assert_eq!(g.shape(), t.shape(), "{what} {dtype} {name} shape");
        let magnitude = t
            .iter()
            .filter(|x| x.is_finite())
            .fold(1.0f64, |m, x| m.max(x.abs()));
        // Non-finite values must agree exactly (the same infinity, or NaN on both sides).
        let worst = g.iter().zip(t.iter()).fold(0.0f64, |m, (a, b)| {
            if a.is_finite() && b.is_finite() {
                m.max((a - b).abs())
            } else if a == b || (a.is_nan() && b.is_nan()) {
                m
            } else {
                f64::INFINITY
            }
        });
        assert!(
            worst <= grad_bound(dtype) * magnitude,
            "{what} {dtype} {name}: max error {worst:e} at magnitude {magnitude:e} (bound {:e} of it)\n{:?}",
            grad_bound(dtype),
            case.options
        );
    }
}

/// The backward of the same case with a random dout: the reference in the dtype against
/// the reference in f64 on the same rounded inputs, and each CUDA backward where a device
/// answers.
fn backward_agrees(case: &Case, dtype: DType, seed: u64) {
    let problem = run::problem(case).expect("generated problems are valid");
    let mut rng = sdpa_harness::strategies::SplitMix64(seed ^ 0xd007_d007_d007_d007);
    let dout = ndarray::ArrayD::from_shape_simple_fn(ndarray::IxDyn(&problem.out_shape()), || {
        rng.symmetric()
    });
    let dout = sdpa_harness::Tensor::from_f64(&dout, dtype);
    let mut with_dout = case.clone();
    with_dout.results.insert("dout".into(), dout.clone());
    let mut wide = run::widened(&with_dout);
    wide.results
        .insert("dout".into(), sdpa_harness::Tensor::F64(dout.to_f64()));
    let truth = run::run_backward(&wide, &sdpa::Exec::cpu()).expect("generated problems are valid");
    let got =
        run::run_backward(&with_dout, &sdpa::Exec::cpu()).expect("generated problems are valid");
    gradients_close("reference", &got, &truth, dtype, case);
    let Some(gpu) = gpu() else {
        return;
    };
    for backend in [Backend::Efficient, Backend::Math] {
        if sdpa_cuda::select_backward(&problem, BackendSet::only(backend), None).is_err() {
            continue;
        }
        let exec = sdpa::Exec::cuda(gpu).with_backends(BackendSet::only(backend));
        let got = run::run_backward(&with_dout, &exec)
            .unwrap_or_else(|e| panic!("cuda {backend} backward refused a supported problem: {e}"));
        gradients_close(&format!("cuda {backend}"), &got, &truth, dtype, case);
    }
}

/// The first CUDA device, if this machine has one that answers.
fn gpu() -> Option<&'static GpuContext> {
    static GPU: OnceLock<Option<GpuContext>> = OnceLock::new();
    GPU.get_or_init(|| {
        if !sdpa_cuda::driver_available() {
            return None;
        }
        sdpa_cuda::KernelConfig::from_env()
            .and_then(|config| GpuContext::with_config(0, config))
            .ok()
    })
    .as_ref()
}

fn cuda_backends_agree(case: &Case, truth: &RunOutput, dtype: DType) {
    let Some(gpu) = gpu() else {
        return;
    };
    let problem = sdpa_harness::run::problem(case).expect("generated problems are valid");
    for backend in Backend::PRIORITY {
        if check_support(backend, &problem, Device::Cuda).is_err() {
            continue;
        }
        let exec = sdpa::Exec::cuda(gpu).with_backends(BackendSet::only(backend));
        let got = sdpa_harness::run::run_case(case, &exec)
            .unwrap_or_else(|e| panic!("cuda {backend} refused a supported problem: {e}"));
        let out = compare_with(
            got.out.to_f64().view(),
            truth.out.to_f64().view(),
            Some(&cuda_tolerance(dtype, case)),
        );
        assert!(
            out.passes(),
            "cuda {backend} {dtype} out vs f64: {out}\n{:?}",
            case.options
        );
        let lse = compare_with(
            got.lse.mapv(f64::from).view(),
            truth.lse.mapv(f64::from).view(),
            Some(&judge::LSE),
        );
        assert!(lse.passes(), "cuda {backend} {dtype} lse vs f64: {lse}");
    }
}

/// The bound for a CUDA backend's output in `dtype`: the dtype's preset (made for the
/// reference, which keeps the softmax weights in f32 and rounds the output once), plus,
/// in f16/bf16, what every CUDA backend adds by rounding the weights to the input dtype
/// before P V: the math backend stores them in that dtype (as PyTorch's math path does)
/// and the flash and efficient kernels feed them to the 16-bit tensor-core GEMM. That
/// is up to `u * sum_j p_j |v_j| <= u * max|v| / (1-p)` absolutely (u = 2^-11 f16, 2^-8
/// bf16, the kept weights scaled by 1/(1-p)). Where the weighted sum cancels, it exceeds
/// the preset's absolute part as soon as max|v| / (1-p) > 1. Found on an H200,
/// 2026-11-28: first for math (regression `math_bf16_weights_rounded`, |v| > 1), then,
/// with eight fuzzing processes at once, for efficient at dropout p up to 0.9
/// (regressions `efficient_*_weights_rounded_*`).
pub fn cuda_tolerance(dtype: DType, case: &Case) -> tolerance::Tolerance {
    let preset = tolerance::for_dtype(dtype);
    if !matches!(dtype, DType::F16 | DType::BF16) {
        return preset;
    }
    let v_max = case.v.to_f64().iter().fold(0.0f64, |m, x| m.max(x.abs()));
    let unit_roundoff = tolerance::peer_floor(dtype) / 2.0;
    tolerance::Tolerance {
        atol: preset.atol + unit_roundoff * v_max * case.options.dropout.keep_scale(),
        rtol: preset.rtol,
        reason: "CUDA backends: softmax weights rounded to the input dtype before P V",
    }
}
