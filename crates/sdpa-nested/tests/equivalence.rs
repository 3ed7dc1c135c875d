//! Nested SDPA equals the padded dense call with a key-padding mask, row for row, and
//! the nested containers validate and round-trip.

use half::f16;
use ndarray::{s, Array3, Array4};
use proptest::prelude::*;
use sdpa_core::{Causal, Dropout, SdpaOptions};
use sdpa_harness::compare::compare_with;
use sdpa_harness::strategies::{proptest_config, SplitMix64};
use sdpa_harness::tolerance;
use sdpa_nested::{key_padding_mask, sdpa_nested, CuSeqlens, Nested};
use sdpa_ref::Mask;

fn packed(rng: &mut SplitMix64, lengths: &[usize], heads: usize, dim: usize) -> Nested<f64> {
    let total = lengths.iter().sum();
    let values = Array3::from_shape_simple_fn((total, heads, dim), || rng.symmetric());
    Nested::new(values, CuSeqlens::from_lengths(lengths)).unwrap()
}

/// `[B, Lmax, H, E]` -> `[B, H, Lmax, E]`.
fn bhle(padded: Array4<f64>) -> Array4<f64> {
    padded
        .permuted_axes([0, 2, 1, 3])
        .as_standard_layout()
        .into_owned()
}

/// Length lists: random, with length-1 and empty sequences, and the "one long and many
/// short" shape of real batches.
fn lengths(max_batch: usize, max_len: usize) -> impl Strategy<Value = Vec<usize>> {
    prop_oneof![
        proptest::collection::vec(0..=max_len, 1..=max_batch),
        proptest::collection::vec(1usize..=1, 1..=max_batch),
        (1..max_batch, 1..=4usize).prop_map(move |(n, short)| {
            let mut v = vec![short; n];
            v.insert(n / 2, max_len);
            v
        }),
    ]
}

#[derive(Debug, Clone)]
struct NestedSpec {
    q_lengths: Vec<usize>,
    kv_lengths: Vec<usize>,
    heads_kv: usize,
    group: usize,
    head_dim: usize,
    head_dim_v: usize,
    causal: Causal,
    dropout: Dropout,
    scale: Option<f64>,
    seed: u64,
}

fn nested_spec(cross: bool) -> impl Strategy<Value = NestedSpec> {
    lengths(8, 70).prop_flat_map(move |q_lengths| {
        let batch = q_lengths.len();
        let kv = if cross {
            proptest::collection::vec(0..=70usize, batch).boxed()
        } else {
            Just(q_lengths.clone()).boxed()
        };
        (
            Just(q_lengths),
            kv,
            1..=2usize,
            prop_oneof![Just(1usize), 2..=3usize],
            1..=24usize,
            1..=24usize,
            prop_oneof![Just(Causal::None), Just(Causal::TopLeft)],
            prop_oneof![
                Just(Dropout::NONE),
                (0.0f64..0.8, any::<u64>(), any::<u64>())
                    .prop_map(|(p, s, o)| Dropout::new(p, s, o))
            ],
            prop_oneof![Just(None), (-1.5f64..1.5).prop_map(Some)],
            any::<u64>(),
        )
            .prop_map(
                |(
                    q_lengths,
                    kv_lengths,
                    heads_kv,
                    group,
                    head_dim,
                    head_dim_v,
                    causal,
                    dropout,
                    scale,
                    seed,
                )| {
                    NestedSpec {
                        q_lengths,
                        kv_lengths,
                        heads_kv,
                        group,
                        head_dim,
                        head_dim_v,
                        causal,
                        dropout,
                        scale,
                        seed,
                    }
                },
            )
    })
}

fn check_equivalence(spec: &NestedSpec) -> Result<(), TestCaseError> {
    let mut rng = SplitMix64(spec.seed);
    let heads_q = spec.heads_kv * spec.group;
    let q = packed(&mut rng, &spec.q_lengths, heads_q, spec.head_dim);
    let k = packed(&mut rng, &spec.kv_lengths, spec.heads_kv, spec.head_dim);
    let v = packed(&mut rng, &spec.kv_lengths, spec.heads_kv, spec.head_dim_v);
    let options = SdpaOptions {
        causal: spec.causal,
        dropout: spec.dropout,
        scale: spec.scale,
        enable_gqa: spec.group > 1,
        ..Default::default()
    };
    let nested = sdpa_nested(&q, &k, &v, &options).unwrap();

    let (pq, pk, pv) = (
        bhle(q.to_padded(0.0)),
        bhle(k.to_padded(0.0)),
        bhle(v.to_padded(0.0)),
    );
    let mask = key_padding_mask(k.cu_seqlens());
    let dense = sdpa_ref::sdpa(
        pq.view(),
        pk.view(),
        pv.view(),
        Some(Mask::Bool(mask.view())),
        &options,
    )
    .unwrap();
    for (b, &len) in spec.q_lengths.iter().enumerate() {
        let got = nested
            .out
            .seq(b)
            .permuted_axes([1, 0, 2])
            .to_owned()
            .into_dyn();
        let want = dense.out.slice(s![b, .., ..len, ..]).to_owned().into_dyn();
        let r = compare_with(got.view(), want.view(), Some(&tolerance::F64));
        prop_assert!(r.passes(), "sequence {}: {}", b, r);
        let o = q.cu_seqlens().offsets();
        let got_lse = nested.lse.slice(s![o[b]..o[b + 1], ..]).t().to_owned();
        let want_lse = dense.lse.slice(s![b, .., ..len]).to_owned();
        prop_assert_eq!(got_lse, want_lse);
    }
    Ok(())
}

proptest! {
    #![proptest_config(proptest_config())]

    /// Self-attention: nested == padded dense + key-padding mask (top-left causal and
    /// dropout included: both are defined on the padded index space).
    #[test]
    fn nested_equals_padded_with_key_padding_mask(spec in nested_spec(false)) {
        check_equivalence(&spec)?;
    }

    /// Cross-attention with separate query and key lengths, zero-length keys included.
    #[test]
    fn cross_attention_nested_equals_padded(spec in nested_spec(true)) {
        check_equivalence(&spec)?;
    }

    /// Bottom-right causal aligns per sequence (S_b - L_b), which padding cannot express:
    /// each sequence equals its own dense call.
    #[test]
    fn bottom_right_causal_aligns_per_sequence(spec in nested_spec(true)) {
        let mut rng = SplitMix64(spec.seed);
        let heads_q = spec.heads_kv * spec.group;
        let q = packed(&mut rng, &spec.q_lengths, heads_q, spec.head_dim);
        let k = packed(&mut rng, &spec.kv_lengths, spec.heads_kv, spec.head_dim);
        let v = packed(&mut rng, &spec.kv_lengths, spec.heads_kv, spec.head_dim_v);
        let options = SdpaOptions { causal: Causal::BottomRight, enable_gqa: spec.group > 1, ..Default::default() };
        let nested = sdpa_nested(&q, &k, &v, &options).unwrap();
        for b in 0..spec.q_lengths.len() {
            let as4 = |x: ndarray::ArrayView3<'_, f64>| x.insert_axis(ndarray::Axis(0)).permuted_axes([0, 2, 1, 3]).to_owned();
            let dense = sdpa_ref::sdpa(as4(q.seq(b)).view(), as4(k.seq(b)).view(), as4(v.seq(b)).view(), None, &options).unwrap();
            let got = nested.out.seq(b).permuted_axes([1, 0, 2]).to_owned();
            prop_assert_eq!(got, dense.out.index_axis(ndarray::Axis(0), 0).to_owned());
        }
    }

    /// Unpad(pad(x)) == x, and pad keeps every row in place.
    #[test]
    fn pad_unpad_round_trip(lens in lengths(6, 20), heads in 1..3usize, dim in 1..5usize, seed in any::<u64>()) {
        let x = packed(&mut SplitMix64(seed), &lens, heads, dim);
        let padded = x.to_padded(f64::NAN);
        prop_assert_eq!(padded.shape(), &[lens.len(), x.cu_seqlens().max_len(), heads, dim]);
        let back = Nested::from_padded(padded.view(), &lens).unwrap();
        prop_assert_eq!(&back, &x);
        for (b, &len) in lens.iter().enumerate() {
            prop_assert!(padded.slice(s![b, len.., .., ..]).iter().all(|v| v.is_nan()));
        }
    }
}

#[test]
fn f16_nested_equals_f16_padded() {
    let lens = [5usize, 1, 0, 33, 2];
    let mut rng = SplitMix64(3);
    let q64 = packed(&mut rng, &lens, 4, 16);
    let to16 = |x: &Nested<f64>| {
        Nested::new(x.values().mapv(f16::from_f64), x.cu_seqlens().clone()).unwrap()
    };
    let q = to16(&q64);
    let options = SdpaOptions {
        causal: Causal::TopLeft,
        dropout: Dropout::new(0.2, 9, 4),
        ..Default::default()
    };
    let nested = sdpa_nested(&q, &q, &q, &options).unwrap();
    let p = q
        .to_padded(f16::ZERO)
        .permuted_axes([0, 2, 1, 3])
        .as_standard_layout()
        .into_owned();
    let mask = key_padding_mask(q.cu_seqlens());
    let dense = sdpa_ref::sdpa(
        p.view(),
        p.view(),
        p.view(),
        Some(Mask::Bool(mask.view())),
        &options,
    )
    .unwrap();
    for (b, &len) in lens.iter().enumerate() {
        assert_eq!(
            nested.out.seq(b).permuted_axes([1, 0, 2]),
            dense.out.slice(s![b, .., ..len, ..])
        );
    }
}

#[test]
fn bad_nested_inputs_are_errors_that_name_the_argument() {
    let err = |r: sdpa_core::Result<CuSeqlens>| r.unwrap_err().to_string();
    assert_eq!(
        err(CuSeqlens::from_u32(&[])),
        "cu_seqlens: expected B + 1 offsets starting at 0, got an empty list"
    );
    assert_eq!(
        err(CuSeqlens::from_u32(&[1, 3])),
        "cu_seqlens: expected a first offset of 0, got 1"
    );
    assert_eq!(
        err(CuSeqlens::from_u32(&[0, 4, 3])),
        "cu_seqlens: expected non-decreasing offsets (entry 1 is 4), got 3 at entry 2"
    );
    assert_eq!(
        err(CuSeqlens::from_i32(&[0, -2])),
        "cu_seqlens: expected non-negative offsets (entry 1), got -2"
    );
    let values = Array3::<f32>::zeros((5, 2, 3));
    let e = Nested::new(values.clone(), CuSeqlens::from_lengths(&[2, 2])).unwrap_err();
    assert_eq!(
        e.to_string(),
        "cu_seqlens: expected a last offset equal to the packed rows, 5, got 4"
    );
    let q = Nested::new(values.clone(), CuSeqlens::from_lengths(&[2, 3])).unwrap();
    let k = Nested::new(values.clone(), CuSeqlens::from_lengths(&[1, 1, 3])).unwrap();
    let e = sdpa_nested(&q, &k, &k, &SdpaOptions::default()).unwrap_err();
    assert_eq!(
        e.to_string(),
        "key: expected 2 sequences (the query's), got 3"
    );
    let v = Nested::new(values.clone(), CuSeqlens::from_lengths(&[3, 2])).unwrap();
    let e = sdpa_nested(&q, &q, &v, &SdpaOptions::default()).unwrap_err();
    assert!(
        e.to_string()
            .starts_with("value: expected the key's cu_seqlens [0, 2, 5]"),
        "{e}"
    );
    let k4 = Nested::new(
        Array3::<f32>::zeros((5, 2, 4)),
        CuSeqlens::from_lengths(&[2, 3]),
    )
    .unwrap();
    let e = sdpa_nested(&q, &k4, &k4, &SdpaOptions::default()).unwrap_err();
    assert_eq!(
        e.to_string(),
        "key: expected head dim 3 (the head dim of query), got 4"
    );
    let padded = Array4::<f32>::zeros((2, 4, 1, 1));
    assert!(Nested::from_padded(padded.view(), &[1])
        .unwrap_err()
        .to_string()
        .starts_with("lengths: expected 2 lengths"));
    assert!(Nested::from_padded(padded.view(), &[1, 5])
        .unwrap_err()
        .to_string()
        .starts_with("lengths: expected lengths of at most 4"));
    let a = Array3::<f32>::zeros((2, 2, 3));
    let b = Array3::<f32>::zeros((2, 3, 3));
    assert!(Nested::from_sequences(&[a.view(), b.view()]).is_err());
    // A batch of empty sequences is valid and gives empty output.
    let empty = Nested::new(
        Array3::<f32>::zeros((0, 2, 3)),
        CuSeqlens::from_lengths(&[0, 0]),
    )
    .unwrap();
    let r = sdpa_nested(&empty, &empty, &empty, &SdpaOptions::default()).unwrap();
    assert_eq!(r.out.values().shape(), &[0, 2, 3]);
}
