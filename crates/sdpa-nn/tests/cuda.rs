//! GPU tests of the module on the device: `CudaCausalSelfAttention` equals the CPU
//! `CausalSelfAttention` (same weights, same mode, same dropout stream) within the
//! harness tolerance preset of the dtype, for dense and nested input, eval and training
//! (attention and residual dropout, causal on and off), with and without biases.
//!
//! Ignored by default (they need a CUDA device): the GPU bundle's `run.sh` runs them with
//! `--ignored`. `PROPTEST_CASES` scales them (default 24 each).

use half::f16;
use ndarray::{Array2, Array3};
use proptest::prelude::*;
use sdpa_core::DType;
use sdpa_cuda::DeviceElement;
use sdpa_harness::compare::compare_with;
use sdpa_harness::gpu::{self, gpu, random, random_device, uniform, GpuElem};
use sdpa_harness::strategies::SplitMix64;
use sdpa_harness::{tolerance, with_dtype};
use sdpa_nested::CuSeqlens;
use sdpa_nn::cuda::{profile_forward, CudaCausalSelfAttention};
use sdpa_nn::profile::Profiler;
use sdpa_nn::{CausalSelfAttention, Linear};

/// Default number of cases of the property (`PROPTEST_CASES` overrides it).
const CASES: u32 = 24;

#[derive(Debug, Clone)]
struct Spec {
    dtype: DType,
    embed: usize,
    heads: usize,
    bias: bool,
    training: bool,
    is_causal: bool,
    dropout: f64,
    /// Dense `[B, T]` when `None` of lengths, else the nested lengths.
    batch: usize,
    len: usize,
    lengths: Option<Vec<usize>>,
    seed: u64,
}

fn spec() -> impl Strategy<Value = Spec> {
    (
        prop_oneof![Just(DType::F32), Just(DType::F16), Just(DType::BF16)],
        prop_oneof![
            Just((64usize, 2usize)),
            Just((64, 4)),
            Just((128, 4)),
            Just((96, 3))
        ],
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
        prop_oneof![Just(0.0), Just(0.1), 0.05f64..0.5],
        (1usize..=3, 1usize..=80),
        prop_oneof![
            Just(None),
            proptest::collection::vec(0usize..=90, 1..=5).prop_map(Some),
            (1usize..8).prop_map(|n| {
                let mut v = vec![1usize; n];
                v.push(150);
                Some(v)
            }),
        ],
        any::<u64>(),
    )
        .prop_map(
            |(
                dtype,
                (embed, heads),
                bias,
                training,
                is_causal,
                dropout,
                (batch, len),
                lengths,
                seed,
            )| {
                Spec {
                    dtype,
                    embed,
                    heads,
                    bias,
                    training,
                    is_causal,
                    dropout,
                    batch,
                    len,
                    lengths,
                    seed,
                }
            },
        )
}

fn module<T: GpuElem>(spec: &Spec, rng: &mut SplitMix64) -> CausalSelfAttention<T> {
    let e = spec.embed;
    let bound = 1.0 / (e as f64).sqrt();
    let mut linear = |rows: usize| {
        let w = uniform::<T, _>(rng, (rows, e), bound);
        let b = spec.bias.then(|| uniform::<T, _>(rng, rows, bound));
        Linear::new(w, b).unwrap()
    };
    let (c_attn, c_proj) = (linear(3 * e), linear(e));
    let mut m =
        CausalSelfAttention::new(c_attn, c_proj, spec.heads, spec.dropout, spec.is_causal).unwrap();
    if !spec.training {
        m.eval();
    }
    m.seed(spec.seed ^ 0x5eed);
    m
}

fn check<T: GpuElem>(spec: &Spec) -> Result<(), TestCaseError> {
    let gpu = gpu();
    let mut rng = SplitMix64(spec.seed);
    let mut cpu = module::<T>(spec, &mut rng);
    let mut cuda = CudaCausalSelfAttention::upload(gpu, &cpu).unwrap();
    prop_assert_eq!(cuda.generator(), cpu.generator());
    prop_assert_eq!(cuda.is_training(), cpu.is_training());
    let tol = tolerance::for_dtype(<T as DeviceElement>::DTYPE);
    let e = spec.embed;
    // Two calls: the second draws from the advanced stream on both sides.
    for call in 0..2 {
        let (got, want) = match &spec.lengths {
            None => {
                let x: Array3<T> = random(&mut rng, (spec.batch, spec.len, e));
                let want = cpu.forward(x.view()).unwrap();
                let got = cuda
                    .forward_host(gpu, x.view())
                    .map_err(|err| TestCaseError::fail(format!("CUDA forward: {err}")))?;
                (got.mapv(T::wide).into_dyn(), want.mapv(T::wide).into_dyn())
            }
            Some(lengths) => {
                let cu = CuSeqlens::from_lengths(lengths);
                let x: Array2<T> = random(&mut rng, (cu.total(), e));
                let want = cpu.forward_nested(x.view(), &cu).unwrap();
                let got = cuda
                    .forward_nested_host(gpu, x.view(), &cu)
                    .map_err(|err| TestCaseError::fail(format!("CUDA forward_nested: {err}")))?;
                (got.mapv(T::wide).into_dyn(), want.mapv(T::wide).into_dyn())
            }
        };
        let r = compare_with(got.view(), want.view(), Some(&tol));
        prop_assert!(
            r.passes(),
            "call {}: CUDA module vs CPU module: {}",
            call,
            r
        );
        prop_assert_eq!(cuda.generator(), cpu.generator(), "call {}", call);
    }
    Ok(())
}

#[test]
#[ignore = "needs a CUDA device"]
fn module_on_cuda_equals_module_on_cpu() {
    gpu::property(
        CASES,
        &spec(),
        |s| with_dtype!(s.dtype, T => check::<T>(&s)),
    );
}

/// The tutorial's setup scaled down, in f16 training with dropout 0.1: the residual
/// dropout kernel and the attention dropout both follow the CPU stream.
#[test]
#[ignore = "needs a CUDA device"]
fn tutorial_module_training_matches_cpu() {
    let spec = Spec {
        dtype: DType::F16,
        embed: 512,
        heads: 8,
        bias: false,
        training: true,
        is_causal: true,
        dropout: 0.1,
        batch: 2,
        len: 64,
        lengths: None,
        seed: 42,
    };
    check::<f16>(&spec).unwrap();
    let nested = Spec {
        lengths: Some(vec![64, 1, 17, 40]),
        ..spec
    };
    check::<f16>(&nested).unwrap();
}

#[test]
#[ignore = "needs a CUDA device"]
fn profile_records_every_op_as_a_cuda_event() {
    let gpu = gpu();
    let spec = Spec {
        dtype: DType::F16,
        embed: 128,
        heads: 4,
        bias: true,
        training: false,
        is_causal: true,
        dropout: 0.1,
        batch: 2,
        len: 32,
        lengths: None,
        seed: 3,
    };
    let mut rng = SplitMix64(9);
    let cpu = module::<f16>(&spec, &mut rng);
    let mut cuda = CudaCausalSelfAttention::upload(gpu, &cpu).unwrap();
    let dx = random_device(gpu, &mut rng, [1, 2, 32, 128], DType::F16).unwrap();
    let mut profiler = Profiler::enabled();
    profile_forward(gpu, &mut cuda, &dx, 3, &mut profiler).unwrap();
    let events = profiler.events();
    // Per forward: c_attn, sdpa, c_proj (eval: no residual dropout), and the forward.
    assert_eq!(events.len(), 3 * 4);
    assert!(events.iter().all(|e| e.device == "cuda" && e.dur_us > 0.0));
    let names: Vec<&str> = events.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(
        &names[..4],
        &[
            "c_attn (cublas gemm)",
            "sdpa (flash varlen kernel)",
            "c_proj (cublas gemm)",
            "CausalSelfAttention.forward"
        ]
    );
    let summary = profiler.summary();
    assert_eq!(summary[0].name, "CausalSelfAttention.forward");
    assert!((summary[0].share - 1.0).abs() < 1e-9);
    assert!(profiler.chrome_trace().contains("\"cat\":\"cuda\""));
}

#[test]
#[ignore = "needs a CUDA device"]
fn wrong_input_is_an_error() {
    let gpu = gpu();
    let spec = Spec {
        dtype: DType::F16,
        embed: 64,
        heads: 2,
        bias: false,
        training: false,
        is_causal: false,
        dropout: 0.0,
        batch: 1,
        len: 4,
        lengths: None,
        seed: 1,
    };
    let cpu = module::<f16>(&spec, &mut SplitMix64(2));
    let mut cuda = CudaCausalSelfAttention::upload(gpu, &cpu).unwrap();
    let x = Array3::<f32>::zeros((1, 4, 64));
    let err = cuda.forward_host(gpu, x.view()).unwrap_err();
    assert!(err.to_string().contains("input"), "{err}");
    let x = Array3::<f16>::zeros((1, 4, 32));
    let err = cuda.forward_host(gpu, x.view()).unwrap_err();
    assert!(err.to_string().contains("E = 64"), "{err}");
}

/// The module's backward with the attention on CUDA (the fused efficient backward for
/// f32) equals the one on the CPU: every gradient within 1e-4 of its largest magnitude
/// (f32 sums in another order), dropout of the forward replayed on both.
#[test]
#[ignore = "needs a CUDA device"]
fn module_backward_on_cuda_matches_the_cpu() {
    let e = 64;
    let mut rng = SplitMix64(21);
    let w = |rows: usize, rng: &mut SplitMix64| {
        Array2::from_shape_simple_fn((rows, e), || (rng.symmetric() * 0.2) as f32)
    };
    let c_attn = Linear::new(w(3 * e, &mut rng), None).unwrap();
    let c_proj = Linear::new(w(e, &mut rng), None).unwrap();
    let mut cpu = CausalSelfAttention::new(c_attn, c_proj, 4, 0.1, true).unwrap();
    let mut on_gpu = cpu.clone();
    let x = Array3::from_shape_simple_fn((2, 37, e), || rng.symmetric() as f32);
    let dout = Array3::from_shape_simple_fn((2, 37, e), || rng.symmetric() as f32);
    cpu.seed(9);
    on_gpu.seed(9);
    let exec = sdpa::Exec::cuda(gpu());
    let (y_cpu, saved_cpu) = cpu.forward_train(x.view()).unwrap();
    let (y_gpu, saved_gpu) = on_gpu.forward_train_on(x.view(), &exec).unwrap();
    let g_cpu = cpu.backward(&saved_cpu, dout.view()).unwrap();
    let g_gpu = on_gpu.backward_on(&saved_gpu, dout.view(), &exec).unwrap();
    let close = |name: &str, a: &[f32], b: &[f32]| {
        let scale = a.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-6);
        let worst = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        assert!(
            worst <= 1e-4 * scale.max(1.0),
            "{name}: worst {worst} at magnitude {scale}"
        );
    };
    close("y", y_cpu.as_slice().unwrap(), y_gpu.as_slice().unwrap());
    close(
        "dx",
        g_cpu.dx.as_slice().unwrap(),
        g_gpu.dx.as_slice().unwrap(),
    );
    close(
        "c_attn.weight",
        g_cpu.c_attn.0.as_slice().unwrap(),
        g_gpu.c_attn.0.as_slice().unwrap(),
    );
    close(
        "c_proj.weight",
        g_cpu.c_proj.0.as_slice().unwrap(),
        g_gpu.c_proj.0.as_slice().unwrap(),
    );
}

/// The device module's own backward (cuBLAS layers, the attention's varlen backward)
/// against the CPU module's, same weights (with biases), same dropout streams (train,
/// dropout 0.1 in attention and residual): y, dx and every weight and bias gradient
/// within `bound` of the CPU's largest magnitude.
fn device_backward_matches_the_cpu<T: GpuElem + sdpa_ref::Element + DeviceElement>(bound: f64) {
    let (e, heads, batch, len) = (64, 4, 2, 45);
    let mut rng = SplitMix64(77);
    let mut draw =
        |n: usize, s: f64| -> Vec<T> { (0..n).map(|_| T::narrow(rng.symmetric() * s)).collect() };
    let w = |rows: usize, v: Vec<T>| Array2::from_shape_vec((rows, e), v).unwrap();
    let c_attn = Linear::new(
        w(3 * e, draw(3 * e * e, 0.2)),
        Some(ndarray::Array1::from_vec(draw(3 * e, 0.1))),
    )
    .unwrap();
    let c_proj = Linear::new(
        w(e, draw(e * e, 0.2)),
        Some(ndarray::Array1::from_vec(draw(e, 0.1))),
    )
    .unwrap();
    let mut cpu = CausalSelfAttention::new(c_attn, c_proj, heads, 0.1, true).unwrap();
    cpu.train();
    cpu.seed(5);
    let mut dev = CudaCausalSelfAttention::upload(gpu(), &cpu).unwrap();
    let x = Array3::from_shape_vec((batch, len, e), draw(batch * len * e, 1.0)).unwrap();
    let dout = Array3::from_shape_vec((batch, len, e), draw(batch * len * e, 1.0)).unwrap();
    let (y_cpu, saved) = cpu.forward_train(x.view()).unwrap();
    let g_cpu = cpu.backward(&saved, dout.view()).unwrap();
    let up = |a: &Array3<T>| {
        sdpa_cuda::DeviceTensor::upload(gpu(), a.view().insert_axis(ndarray::Axis(0))).unwrap()
    };
    let (y_dev, saved_dev) = dev.forward_train(gpu(), &up(&x)).unwrap();
    let g = dev.backward(gpu(), &saved_dev, &up(&dout)).unwrap();
    let flat = |t: &sdpa_cuda::DeviceTensor| -> Vec<f64> {
        t.download::<T>(gpu())
            .unwrap()
            .iter()
            .map(|v| v.wide())
            .collect()
    };
    let close = |name: &str, want: Vec<f64>, got: Vec<f64>| {
        assert_eq!(want.len(), got.len(), "{name}: sizes");
        let scale = want.iter().fold(0f64, |m, x| m.max(x.abs())).max(1e-6);
        let worst = want
            .iter()
            .zip(&got)
            .map(|(x, y)| {
                if (x - y).is_nan() {
                    f64::INFINITY
                } else {
                    (x - y).abs()
                }
            })
            .fold(0f64, f64::max);
        assert!(
            worst <= bound * scale,
            "{} {name}: worst {worst} at magnitude {scale}",
            T::DTYPE
        );
        println!(
            "ok {} {name}: worst {worst:.3e} of magnitude {scale:.3e}",
            T::DTYPE
        );
    };
    let host = |a: &[T]| a.iter().map(|v| v.wide()).collect::<Vec<f64>>();
    close("y", host(y_cpu.as_slice().unwrap()), flat(&y_dev));
    close("dx", host(g_cpu.dx.as_slice().unwrap()), flat(&g.dx));
    close(
        "c_attn.weight",
        host(g_cpu.c_attn.0.as_slice().unwrap()),
        flat(&g.c_attn.0),
    );
    close(
        "c_attn.bias",
        host(g_cpu.c_attn.1.as_ref().unwrap().as_slice().unwrap()),
        flat(g.c_attn.1.as_ref().unwrap()),
    );
    close(
        "c_proj.weight",
        host(g_cpu.c_proj.0.as_slice().unwrap()),
        flat(&g.c_proj.0),
    );
    close(
        "c_proj.bias",
        host(g_cpu.c_proj.1.as_ref().unwrap().as_slice().unwrap()),
        flat(g.c_proj.1.as_ref().unwrap()),
    );
}

#[test]
#[ignore = "needs a CUDA device"]
fn device_module_backward_matches_the_cpu_module() {
    // f32: math or the scalar kernel; f16: the tensor-core backward (P and dS rounded to
    // f16 in its products, the CPU's f32 intermediates: a looser bound).
    device_backward_matches_the_cpu::<f32>(1e-4);
    device_backward_matches_the_cpu::<f16>(2e-2);
}
