//! Properties of the reference, each a proptest over random consistent problems
//! (odd lengths, L != S, masks of every broadcast shape, GQA, dropout, scale).
//! `PROPTEST_CASES` scales every suite; failures are kept in proptest-regressions/.

use half::{bf16, f16};
use ndarray::{s, Array4, ArrayD, Axis, IxDyn};
use proptest::prelude::*;
use sdpa_core::{Causal, DType, Dropout, SdpaOptions};
use sdpa_harness::compare::{compare, compare_with};
use sdpa_harness::strategies::{
    problem_spec, proptest_config, Inputs, Limits, ProblemSpec, SplitMix64,
};
use sdpa_harness::{run, tolerance};
use sdpa_ref::{sdpa, Mask, Output};

fn mask_of<'a>(x: &'a Inputs) -> Option<Mask<'a, f64>> {
    match (&x.bool_mask, &x.additive_mask) {
        (Some(b), _) => Some(Mask::Bool(b.view())),
        (_, Some(a)) => Some(Mask::Additive(a.view())),
        _ => None,
    }
}

fn run_f64(x: &Inputs, options: &SdpaOptions) -> Output<f64> {
    sdpa(x.q.view(), x.k.view(), x.v.view(), mask_of(x), options).expect("valid problem")
}

fn assert_bitwise_eq(a: &Array4<f64>, b: &Array4<f64>) -> Result<(), TestCaseError> {
    prop_assert_eq!(a.shape(), b.shape());
    for (i, (x, y)) in a.iter().zip(b.iter()).enumerate() {
        prop_assert!(
            x.to_bits() == y.to_bits(),
            "element {} differs: {:?} vs {:?}",
            i,
            x,
            y
        );
    }
    Ok(())
}

proptest! {
    #![proptest_config(proptest_config())]

    /// f32, f16 and bf16 results are within their presets of the f64 result on the
    /// same (rounded) inputs, and never NaN where f64 is finite.
    #[test]
    fn lower_precisions_agree_with_f64(spec in problem_spec(Limits::default())) {
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            let case = spec.to_case(dtype);
            let got = run::run_reference(&case).unwrap();
            let truth = run::run_reference_f64(&case).unwrap();
            let tol = tolerance::for_dtype(dtype);
            let report = compare_with(got.out.to_f64().view(), truth.out.to_f64().view(), Some(&tol));
            prop_assert!(report.passes(), "{}: {}", dtype, report);
        }
    }

    /// Permuting the keys, with their values and mask columns, leaves the output unchanged.
    #[test]
    fn key_permutation_invariance(
        spec in problem_spec(Limits { dropout: false, ..Limits::default() }),
        perm_seed in any::<u64>(),
    ) {
        let spec = ProblemSpec { options: SdpaOptions { causal: Causal::None, ..spec.options }, ..spec };
        let x = spec.inputs();
        let s_len = spec.len_kv;
        let mut perm: Vec<usize> = (0..s_len).collect();
        let mut rng = SplitMix64(perm_seed);
        for i in (1..s_len).rev() {
            perm.swap(i, (rng.next_u64() % (i as u64 + 1)) as usize);
        }
        let permute_last = |a: &ArrayD<f64>| -> ArrayD<f64> {
            let last = a.ndim().saturating_sub(1);
            if a.ndim() == 0 || a.shape()[last] == 1 { a.clone() } else { a.select(Axis(last), &perm) }
        };
        let permuted = Inputs {
            q: x.q.clone(),
            k: x.k.select(Axis(2), &perm),
            v: x.v.select(Axis(2), &perm),
            bool_mask: x.bool_mask.as_ref().map(|m| {
                let last = m.ndim().saturating_sub(1);
                if m.ndim() == 0 || m.shape()[last] == 1 { m.clone() } else { m.select(Axis(last), &perm) }
            }),
            additive_mask: x.additive_mask.as_ref().map(permute_last),
        };
        let a = run_f64(&x, &spec.options);
        let b = run_f64(&permuted, &spec.options);
        let r = compare_with(b.out.view().into_dyn(), a.out.view().into_dyn(), Some(&tolerance::F64));
        prop_assert!(r.passes(), "{}", r);
    }

    /// TopLeft equals an explicit tril bool mask; BottomRight equals tril(diagonal = S - L).
    #[test]
    fn causal_equals_explicit_tril(spec in problem_spec(Limits { masks: false, ..Limits::default() })) {
        let x = spec.inputs();
        let (l, s_len) = (spec.len_q, spec.len_kv);
        for (causal, diagonal) in [(Causal::TopLeft, 0i64), (Causal::BottomRight, s_len as i64 - l as i64)] {
            let tril = ArrayD::from_shape_fn(IxDyn(&[l, s_len]), |ix| ix[1] as i64 <= ix[0] as i64 + diagonal);
            let implicit = run_f64(&x, &SdpaOptions { causal, ..spec.options });
            let explicit = sdpa(
                x.q.view(), x.k.view(), x.v.view(),
                Some(Mask::Bool(tril.view())),
                &SdpaOptions { causal: Causal::None, ..spec.options },
            ).unwrap();
            assert_bitwise_eq(&implicit.out, &explicit.out)?;
            prop_assert_eq!(implicit.lse, explicit.lse);
        }
    }

    /// A bool mask equals the additive mask that is 0 where true and -inf where false.
    #[test]
    fn bool_mask_equals_additive_zero_neg_inf(spec in problem_spec(Limits::default())) {
        let x = spec.inputs();
        let bool_mask = match &x.bool_mask {
            Some(m) => m.clone(),
            None => ArrayD::from_shape_fn(IxDyn(&[spec.len_q, spec.len_kv]), |ix| (ix[0] * 7 + ix[1] * 3) % 5 != 0),
        };
        let additive = bool_mask.mapv(|keep| if keep { 0.0 } else { f64::NEG_INFINITY });
        let a = sdpa(x.q.view(), x.k.view(), x.v.view(), Some(Mask::Bool(bool_mask.view())), &spec.options).unwrap();
        let b = sdpa(x.q.view(), x.k.view(), x.v.view(), Some(Mask::Additive(additive.view())), &spec.options).unwrap();
        assert_bitwise_eq(&a.out, &b.out)?;
        prop_assert_eq!(a.lse, b.lse);
    }

    /// GQA equals plain attention on kv heads repeated `Hq / Hkv` times.
    #[test]
    fn gqa_equals_repeated_kv_heads(spec in problem_spec(Limits::default())) {
        let x = spec.inputs();
        let group = spec.group;
        let repeat: Vec<usize> = (0..spec.heads_q()).map(|h| h / group).collect();
        let repeated = Inputs {
            k: x.k.select(Axis(1), &repeat),
            v: x.v.select(Axis(1), &repeat),
            ..x.clone()
        };
        let a = run_f64(&x, &SdpaOptions { enable_gqa: true, ..spec.options });
        let b = run_f64(&repeated, &SdpaOptions { enable_gqa: false, ..spec.options });
        assert_bitwise_eq(&a.out, &b.out)?;
    }

    /// p = 0 equals no dropout, whatever the seed and offset.
    #[test]
    fn dropout_zero_equals_none(spec in problem_spec(Limits::default()), seed in any::<u64>(), offset in any::<u64>()) {
        let x = spec.inputs();
        let a = run_f64(&x, &SdpaOptions { dropout: Dropout::new(0.0, seed, offset), ..spec.options });
        let b = run_f64(&x, &SdpaOptions { dropout: Dropout::NONE, ..spec.options });
        assert_bitwise_eq(&a.out, &b.out)?;
    }

    /// A strided view (a `[B, L, H, E]` buffer seen as `[B, H, L, E]`) gives the result of
    /// a contiguous copy.
    #[test]
    fn strided_views_equal_contiguous_copies(spec in problem_spec(Limits::default())) {
        let x = spec.inputs();
        let blhe = |a: &Array4<f64>| a.view().permuted_axes([0, 2, 1, 3]).as_standard_layout().into_owned();
        let (qb, kb, vb) = (blhe(&x.q), blhe(&x.k), blhe(&x.v));
        let strided = sdpa(
            qb.view().permuted_axes([0, 2, 1, 3]),
            kb.view().permuted_axes([0, 2, 1, 3]),
            vb.view().permuted_axes([0, 2, 1, 3]),
            mask_of(&x), &spec.options,
        ).unwrap();
        let contiguous = run_f64(&x, &spec.options);
        assert_bitwise_eq(&strided.out, &contiguous.out)?;
        prop_assert_eq!(strided.lse, contiguous.lse);
    }

    /// Scaling q by c with scale 1 equals scale c applied to the original q.
    #[test]
    fn scale_on_q_equals_scale_option(spec in problem_spec(Limits::default()), c in -3.0f64..3.0) {
        let x = spec.inputs();
        let scaled = Inputs { q: x.q.mapv(|v| v * c), ..x.clone() };
        let a = run_f64(&scaled, &SdpaOptions { scale: Some(1.0), ..spec.options });
        let b = run_f64(&x, &SdpaOptions { scale: Some(c), ..spec.options });
        let r = compare_with(a.out.view().into_dyn(), b.out.view().into_dyn(), Some(&tolerance::F64));
        prop_assert!(r.passes(), "{}", r);
    }

    /// Rows with every key masked out are exactly 0 (never NaN) in every dtype, with
    /// lse -inf; other rows are unaffected.
    #[test]
    fn fully_masked_rows_are_exactly_zero(spec in problem_spec(Limits { masks: false, ..Limits::default() }), row_seed in any::<u64>()) {
        let spec = ProblemSpec { options: SdpaOptions { causal: Causal::None, ..spec.options }, ..spec };
        let mut rng = SplitMix64(row_seed);
        let dead: Vec<bool> = (0..spec.len_q).map(|_| rng.unit() < 0.3).collect();
        let bool_mask = ArrayD::from_shape_fn(IxDyn(&[spec.len_q, spec.len_kv]), |ix| !dead[ix[0]]);
        let additive = bool_mask.mapv(|keep| if keep { 0.5 } else { f64::NEG_INFINITY });
        let x = spec.inputs();
        for mask in [Mask::Bool(bool_mask.view()), Mask::Additive(additive.view())] {
            let r = sdpa(x.q.view(), x.k.view(), x.v.view(), Some(mask), &spec.options).unwrap();
            for (i, &is_dead) in dead.iter().enumerate() {
                let row = r.out.slice(s![.., .., i, ..]);
                if is_dead {
                    prop_assert!(row.iter().all(|v| v.to_bits() == 0), "row {} not exactly 0", i);
                    prop_assert!(r.lse.slice(s![.., .., i]).iter().all(|v| *v == f32::NEG_INFINITY));
                } else {
                    prop_assert!(row.iter().all(|v| v.is_finite()));
                }
            }
        }
        let q16 = x.q.mapv(f16::from_f64);
        let k16 = x.k.mapv(f16::from_f64);
        let v16 = x.v.mapv(f16::from_f64);
        let r = sdpa(q16.view(), k16.view(), v16.view(), Some(Mask::Bool(bool_mask.view())), &spec.options).unwrap();
        for (i, &is_dead) in dead.iter().enumerate() {
            if is_dead {
                prop_assert!(r.out.slice(s![.., .., i, ..]).iter().all(|v| v.to_bits() == 0));
            }
        }
        let qb = x.q.mapv(bf16::from_f64);
        let r = sdpa(qb.view(), x.k.mapv(bf16::from_f64).view(), x.v.mapv(bf16::from_f64).view(),
            Some(Mask::Bool(bool_mask.view())), &spec.options).unwrap();
        for (i, &is_dead) in dead.iter().enumerate() {
            if is_dead {
                prop_assert!(r.out.slice(s![.., .., i, ..]).iter().all(|v| v.to_bits() == 0));
            }
        }
    }

    /// Case files round-trip: writing and reading gives the same case, byte-stable.
    #[test]
    fn case_files_round_trip(spec in problem_spec(Limits { max_len: 20, max_head_dim: 8, ..Limits::default() })) {
        for dtype in DType::ALL {
            let case = spec.to_case(dtype);
            let bytes = case.to_bytes().unwrap();
            let back = sdpa_harness::case::Case::from_bytes(&bytes).unwrap();
            prop_assert_eq!(&back, &case);
            prop_assert_eq!(back.to_bytes().unwrap(), bytes);
        }
    }
}

/// The mean of the dropout output over many seeds tends to the no-dropout output:
/// each element's deviation stays within 6 standard errors, computed exactly from the
/// weights (Var = p/(1-p) * sum_j (w_ij v_jy)^2 per seed).
#[test]
fn dropout_mean_over_seeds_tends_to_no_dropout() {
    let spec = ProblemSpec {
        mask: sdpa_harness::strategies::MaskSpec::None,
        options: SdpaOptions::default(),
        ..ProblemSpec::small_example()
    };
    let x = spec.inputs();
    let p = 0.3;
    let seeds = 400;
    let base_options = SdpaOptions {
        enable_gqa: true,
        ..spec.options
    };
    let mask = mask_of(&x);
    let plain = sdpa(
        x.q.view(),
        x.k.view(),
        x.v.view(),
        mask.clone(),
        &base_options,
    )
    .unwrap();
    let weights = sdpa_ref::attention_weights(
        x.q.view(),
        x.k.view(),
        x.v.view(),
        mask.clone(),
        &base_options,
    )
    .unwrap();
    let mut sum = Array4::<f64>::zeros(plain.out.raw_dim());
    for seed in 0..seeds {
        let options = SdpaOptions {
            dropout: Dropout::new(p, seed, 0),
            ..base_options
        };
        sum += &sdpa(x.q.view(), x.k.view(), x.v.view(), mask.clone(), &options)
            .unwrap()
            .out;
    }
    let mean = sum / seeds as f64;
    let (b_n, hq, l, ev) = plain.out.dim();
    let mut worst = 0.0f64;
    for b in 0..b_n {
        for h in 0..hq {
            for i in 0..l {
                for y in 0..ev {
                    let var: f64 = (0..spec.len_kv)
                        .map(|j| (weights[[b, h, i, j]] * x.v[[b, h / spec.group, j, y]]).powi(2))
                        .sum::<f64>()
                        * p
                        / (1.0 - p);
                    let stderr = (var / seeds as f64).sqrt();
                    let z =
                        (mean[[b, h, i, y]] - plain.out[[b, h, i, y]]).abs() / stderr.max(1e-300);
                    worst = worst.max(z);
                }
            }
        }
    }
    assert!(
        worst < 6.0,
        "mean over seeds is {worst} standard errors from the no-dropout output"
    );
    // And it did move: a single seed is far from the mean.
    let one = sdpa(
        x.q.view(),
        x.k.view(),
        x.v.view(),
        mask,
        &SdpaOptions {
            dropout: Dropout::new(p, 1, 0),
            ..base_options
        },
    )
    .unwrap();
    assert!(compare(one.out.view().into_dyn(), plain.out.view().into_dyn()).max_abs > 1e-3);
}

proptest! {
    // A statistical test: each case fails with probability about 6e-5 by chance (a
    // 4-sigma excursion of the kept count), so with random draws every run CI would
    // fail about once in 60 runs (it did, 2026-12-03: 4.007 sigma). Its draws are a
    // fixed sequence instead, the same every run; the bound is unchanged.
    #![proptest_config(ProptestConfig {
        rng_seed: proptest::test_runner::RngSeed::Fixed(0x5d9a_0f11),
        ..proptest_config()
    })]

    /// The kept fraction of attention weights is within 4 sigma of 1 - p.
    #[test]
    fn kept_fraction_matches_p(
        p in 0.05f64..0.95, seed in any::<u64>(), offset in any::<u64>(),
        l in 16usize..80, s_len in 16usize..80, heads in 1usize..4,
    ) {
        // q = 0 makes every weight 1/S before dropout, so a weight is 0 iff dropped.
        let q = Array4::<f64>::zeros((2, heads, l, 8));
        let kv = Array4::<f64>::ones((2, heads, s_len, 8));
        let options = SdpaOptions { dropout: Dropout::new(p, seed, offset), ..Default::default() };
        let w = sdpa_ref::attention_weights(q.view(), kv.view(), kv.view(), None, &options).unwrap();
        let n = w.len() as f64;
        let kept = w.iter().filter(|x| **x != 0.0).count() as f64;
        let sigma = (p * (1.0 - p) / n).sqrt();
        prop_assert!(((kept / n) - (1.0 - p)).abs() <= 4.0 * sigma,
            "kept {} of {} (p = {}), {} sigma off", kept, n, p, ((kept / n) - (1.0 - p)).abs() / sigma);
        let expected = 1.0 / s_len as f64 / (1.0 - p);
        prop_assert!(w.iter().all(|x| *x == 0.0 || (x - expected).abs() <= 1e-15));
    }
}
