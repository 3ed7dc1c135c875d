//! GPU tests of nested batches on the device: `sdpa_nested_cuda` (varlen flash and
//! efficient) equals the padded dense CUDA call with a key-padding mask, row for row,
//! and both equal the f64 CPU reference on the same rounded inputs, dropout included.
//!
//! Ignored by default (they need a CUDA device): the GPU bundle's `run.sh` runs them with
//! `--ignored`. `PROPTEST_CASES` scales them (default 48 each). Outputs are poisoned with
//! NaN before every launch.

use half::f16;
use ndarray::{s, Array4, ArrayD};
use proptest::prelude::*;
use sdpa_core::{Backend, BackendSet, Causal, DType, Dropout, SdpaOptions};
use sdpa_cuda::{DeviceElement, HostMask};
use sdpa_harness::compare::compare_with;
use sdpa_harness::gpu::{self, gpu, random, GpuElem};
use sdpa_harness::strategies::SplitMix64;
use sdpa_harness::{tolerance, with_dtype};
use sdpa_nested::cuda::{sdpa_nested_cuda, DeviceNested};
use sdpa_nested::{key_padding_mask, sdpa_nested, CuSeqlens, Nested};

/// Default number of cases of each property (`PROPTEST_CASES` overrides it).
const CASES: u32 = 48;

/// Length lists: random (0 included), all length 1, and one long among many short.
fn lengths(max_batch: usize, max_len: usize) -> impl Strategy<Value = Vec<usize>> {
    prop_oneof![
        proptest::collection::vec(0..=max_len, 1..=max_batch),
        proptest::collection::vec(1usize..=1, 1..=max_batch),
        (1..max_batch * 2, 1..=4usize).prop_map(move |(n, short)| {
            let mut v = vec![short; n];
            v.insert(n / 2, max_len);
            v
        }),
    ]
}

#[derive(Debug, Clone)]
struct Spec {
    dtype: DType,
    backend: Backend,
    q_lengths: Vec<usize>,
    kv_lengths: Vec<usize>,
    heads_kv: usize,
    group: usize,
    head_dim: usize,
    head_dim_v: usize,
    causal: Causal,
    dropout: Dropout,
    seed: u64,
}

fn spec(cross: bool) -> impl Strategy<Value = Spec> {
    (
        lengths(6, 300),
        prop_oneof![Just(DType::F16), Just(DType::BF16), Just(DType::F32)],
        any::<bool>(),
    )
        .prop_flat_map(move |(q_lengths, dtype, flash)| {
            let batch = q_lengths.len();
            let kv = if cross {
                proptest::collection::vec(0..=300usize, batch).boxed()
            } else {
                Just(q_lengths.clone()).boxed()
            };
            // Flash takes f16/bf16 with Ev == E; efficient everything else.
            let backend = if flash && dtype != DType::F32 {
                Backend::Flash
            } else {
                Backend::Efficient
            };
            let dims = proptest::sample::select(vec![16usize, 32, 40, 64, 80, 128]);
            let dim_v = if backend == Backend::Flash {
                Just(None).boxed()
            } else {
                prop_oneof![Just(None), dims.clone().prop_map(Some)].boxed()
            };
            // Bottom-right differs from top-left only where L_b != S_b, which the padded
            // call cannot express per sequence: self-attention only.
            let causal = if cross {
                prop_oneof![Just(Causal::None), Just(Causal::TopLeft)].boxed()
            } else {
                prop_oneof![
                    Just(Causal::None),
                    Just(Causal::TopLeft),
                    Just(Causal::BottomRight)
                ]
                .boxed()
            };
            (
                Just((q_lengths, dtype, backend)),
                kv,
                1..=2usize,
                1..=2usize,
                dims,
                dim_v,
                causal,
                prop_oneof![
                    Just(Dropout::NONE),
                    (0.05f64..0.7, any::<u64>(), 0u64..1 << 40)
                        .prop_map(|(p, s, o)| Dropout::new(p, s, o))
                ],
                any::<u64>(),
            )
        })
        .prop_map(
            |(
                (q_lengths, dtype, backend),
                kv_lengths,
                heads_kv,
                group,
                e,
                ev,
                causal,
                dropout,
                seed,
            )| Spec {
                dtype,
                backend,
                q_lengths,
                kv_lengths,
                heads_kv,
                group,
                head_dim: e,
                head_dim_v: ev.unwrap_or(e),
                causal,
                dropout,
                seed,
            },
        )
}

fn packed<T: GpuElem>(
    rng: &mut SplitMix64,
    lengths: &[usize],
    heads: usize,
    dim: usize,
) -> Nested<T> {
    let total = lengths.iter().sum();
    let values = random::<T, _>(rng, (total, heads, dim));
    Nested::new(values, CuSeqlens::from_lengths(lengths)).unwrap()
}

fn wide3<T: GpuElem>(n: &Nested<T>) -> Nested<f64> {
    Nested::new(n.values().mapv(T::wide), n.cu_seqlens().clone()).unwrap()
}

/// `[B, Lmax, H, E]` -> `[B, H, Lmax, E]`, contiguous.
fn bhle<T: Clone>(padded: Array4<T>) -> Array4<T> {
    padded
        .permuted_axes([0, 2, 1, 3])
        .as_standard_layout()
        .into_owned()
}

fn check<T: GpuElem>(spec: &Spec) -> Result<(), TestCaseError> {
    let gpu = gpu();
    let mut rng = SplitMix64(spec.seed);
    let heads_q = spec.heads_kv * spec.group;
    let q = packed::<T>(&mut rng, &spec.q_lengths, heads_q, spec.head_dim);
    let k = packed::<T>(&mut rng, &spec.kv_lengths, spec.heads_kv, spec.head_dim);
    let v = packed::<T>(&mut rng, &spec.kv_lengths, spec.heads_kv, spec.head_dim_v);
    let options = SdpaOptions {
        causal: spec.causal,
        dropout: spec.dropout,
        scale: None,
        enable_gqa: spec.group > 1,
        ..Default::default()
    };
    let tol = tolerance::for_dtype(<T as DeviceElement>::DTYPE);

    // f64 truth on the rounded inputs.
    let truth = sdpa_nested(&wide3(&q), &wide3(&k), &wide3(&v), &options).unwrap();

    // Nested on the device.
    let (dq, dk, dv) = (
        DeviceNested::upload(gpu, &q).unwrap(),
        DeviceNested::upload(gpu, &k).unwrap(),
        DeviceNested::upload(gpu, &v).unwrap(),
    );
    let result = sdpa_nested_cuda(gpu, &dq, &dk, &dv, &options, BackendSet::only(spec.backend))
        .map_err(|e| TestCaseError::fail(format!("nested on CUDA: {e}")))?;
    prop_assert_eq!(result.backend, spec.backend);
    let nested: Nested<T> = result.out.download(gpu).unwrap();
    prop_assert_eq!(nested.cu_seqlens(), q.cu_seqlens());

    if q.cu_seqlens().total() == 0 {
        // No query rows: nothing to compare with a padded call of length 0.
        prop_assert_eq!(nested.values().len(), 0);
        return Ok(());
    }
    // Padded dense on the device with the key-padding mask (efficient takes masks).
    let pad = T::narrow(0.0);
    let (pq, pk, pv) = (
        bhle(q.to_padded(pad)),
        bhle(k.to_padded(pad)),
        bhle(v.to_padded(pad)),
    );
    let mask: ArrayD<bool> = key_padding_mask(k.cu_seqlens());
    let dense = gpu
        .sdpa_host(
            pq.view(),
            pk.view(),
            pv.view(),
            Some(&HostMask::Bool(mask.view())),
            &options,
            BackendSet::only(Backend::Efficient),
        )
        .map_err(|e| TestCaseError::fail(format!("padded dense on CUDA: {e}")))?;

    for (b, &len) in spec.q_lengths.iter().enumerate() {
        let want = truth
            .out
            .seq(b)
            .permuted_axes([1, 0, 2])
            .to_owned()
            .into_dyn();
        let got = nested
            .seq(b)
            .permuted_axes([1, 0, 2])
            .mapv(T::wide)
            .into_dyn();
        let padded_rows = dense
            .out
            .slice(s![b, .., ..len, ..])
            .mapv(T::wide)
            .into_dyn();
        let r = compare_with(got.view(), want.view(), Some(&tol));
        prop_assert!(r.passes(), "nested vs f64 truth, sequence {}: {}", b, r);
        let r = compare_with(padded_rows.view(), want.view(), Some(&tol));
        prop_assert!(r.passes(), "padded vs f64 truth, sequence {}: {}", b, r);
        let r = compare_with(got.view(), padded_rows.view(), Some(&tol));
        prop_assert!(
            r.passes(),
            "nested vs padded + key-padding mask, sequence {}: {}",
            b,
            r
        );
    }
    Ok(())
}

fn property(cross: bool) {
    gpu::property(
        CASES,
        &spec(cross),
        |s| with_dtype!(s.dtype, T => check::<T>(&s)),
    );
}

#[test]
#[ignore = "needs a CUDA device"]
fn nested_equals_padded_with_key_padding_mask_on_cuda() {
    property(false);
}

#[test]
#[ignore = "needs a CUDA device"]
fn cross_attention_nested_equals_padded_on_cuda() {
    property(true);
}

/// The batch shape that motivates nesting: one long sequence among many of length 1,
/// f16 flash with dropout, as the module runs it.
#[test]
#[ignore = "needs a CUDA device"]
fn one_long_many_short_f16_flash_with_dropout() {
    let mut lengths = vec![1usize; 31];
    lengths.insert(7, 512);
    let spec = Spec {
        dtype: DType::F16,
        backend: Backend::Flash,
        q_lengths: lengths.clone(),
        kv_lengths: lengths,
        heads_kv: 8,
        group: 1,
        head_dim: 64,
        head_dim_v: 64,
        causal: Causal::TopLeft,
        dropout: Dropout::new(0.1, 7, 1 << 33),
        seed: 5,
    };
    check::<f16>(&spec).unwrap();
}

#[test]
#[ignore = "needs a CUDA device"]
fn mismatched_batches_are_errors() {
    let gpu = gpu();
    let mut rng = SplitMix64(1);
    let q = DeviceNested::upload(gpu, &packed::<f16>(&mut rng, &[3, 4], 2, 16)).unwrap();
    let k = DeviceNested::upload(gpu, &packed::<f16>(&mut rng, &[3, 4, 5], 2, 16)).unwrap();
    let v2 = DeviceNested::upload(gpu, &packed::<f16>(&mut rng, &[3, 5], 2, 16)).unwrap();
    let err = sdpa_nested_cuda(gpu, &q, &k, &k, &Default::default(), BackendSet::ALL).unwrap_err();
    assert!(err.to_string().contains("key"), "{err}");
    let err = sdpa_nested_cuda(gpu, &q, &q, &v2, &Default::default(), BackendSet::ALL).unwrap_err();
    assert!(err.to_string().contains("value"), "{err}");
    let err = sdpa_nested_cuda(
        gpu,
        &q,
        &q,
        &q,
        &Default::default(),
        BackendSet::only(Backend::Math),
    )
    .unwrap_err();
    assert!(err.to_string().contains("cu_seqlens"), "{err}");
}
