//! The reference against a scalar, loop-by-loop transcription of the definition, in f64.

use half::{bf16, f16};
use ndarray::{Array, Array4, ArrayD, IxDyn};
use sdpa_core::{Causal, Dropout, SdpaOptions, Window};
use sdpa_ref::{sdpa, sdpa_in_space, sdpa_with_alibi, DropoutSpace, Mask};

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn uniform(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn array(&mut self, shape: [usize; 4]) -> Array4<f64> {
        Array4::from_shape_simple_fn(shape, || self.uniform())
    }
}

enum NaiveMask<'a> {
    None,
    Bool(&'a ArrayD<bool>),
    Add(&'a ArrayD<f64>),
}

/// out[b,h,i,:] = sum_j softmax_j(scale * q.k_j + mask) * keep_j / (1-p) * v_j, loop by loop.
#[allow(clippy::too_many_arguments)]
fn naive(
    q: &Array4<f64>,
    k: &Array4<f64>,
    v: &Array4<f64>,
    mask: NaiveMask<'_>,
    causal: Causal,
    scale: f64,
    dropout: Dropout,
    (window, softcap, alibi): (Window, Option<f64>, Option<&ndarray::Array2<f64>>),
) -> (Array4<f64>, Vec<f64>) {
    let (b_n, hq, l, e) = q.dim();
    let (_, hkv, s, _) = k.dim();
    let ev = v.dim().3;
    let group = hq / hkv;
    let mut out = Array4::zeros((b_n, hq, l, ev));
    let mut lses = Vec::new();
    for b in 0..b_n {
        for h in 0..hq {
            for i in 0..l {
                let mut scores = vec![f64::NEG_INFINITY; s];
                for (j, score) in scores.iter_mut().enumerate() {
                    // The window, from DESIGN.md's inequality: i + S - L - left <= j <= i +
                    // S - L + right, -1 unbounded.
                    let diag = i as i64 + s as i64 - l as i64;
                    let jj = j as i64;
                    let in_window = (window.left < 0 || jj >= diag - window.left)
                        && (window.right < 0 || jj <= diag + window.right);
                    let allowed = causal.allows(i, j, l, s) && in_window;
                    let mut dot = 0.0;
                    for x in 0..e {
                        dot += q[[b, h, i, x]] * k[[b, h / group, j, x]];
                    }
                    let mut value = dot * scale;
                    if let Some(c) = softcap {
                        value = c * (value / c).tanh();
                    }
                    if let Some(slopes) = alibi {
                        value -= slopes[[b, h]] * (diag - jj).abs() as f64;
                    }
                    match &mask {
                        NaiveMask::None => {}
                        NaiveMask::Bool(m) => {
                            let m4 = m.broadcast(IxDyn(&[b_n, hq, l, s])).unwrap();
                            if !m4[[b, h, i, j]] {
                                value = f64::NEG_INFINITY;
                            }
                        }
                        NaiveMask::Add(m) => {
                            let m4 = m.broadcast(IxDyn(&[b_n, hq, l, s])).unwrap();
                            value += m4[[b, h, i, j]];
                        }
                    }
                    if allowed {
                        *score = value;
                    }
                }
                let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                if max == f64::NEG_INFINITY {
                    lses.push(f64::NEG_INFINITY);
                    continue;
                }
                let sum: f64 = scores.iter().map(|x| (x - max).exp()).sum();
                lses.push(max + sum.ln());
                for j in 0..s {
                    let mut w = (scores[j] - max).exp() / sum;
                    let n = (((b * hq + h) * l + i) * s + j) as u64;
                    if dropout.p > 0.0 {
                        w = if dropout.keeps(n) {
                            w / (1.0 - dropout.p)
                        } else {
                            0.0
                        };
                    }
                    for y in 0..ev {
                        out[[b, h, i, y]] += w * v[[b, h / group, j, y]];
                    }
                }
            }
        }
    }
    (out, lses)
}

fn max_abs_diff(a: &Array4<f64>, b: &Array4<f64>) -> f64 {
    a.iter()
        .zip(b.iter())
        .map(|(x, y)| {
            if x.is_nan() || y.is_nan() {
                f64::INFINITY
            } else {
                (x - y).abs()
            }
        })
        .fold(0.0, f64::max)
}

#[test]
fn f64_reference_equals_the_naive_definition() {
    let mut rng = Rng(0x9E3779B97F4A7C15);
    for case in 0..120 {
        let b = 1 + rng.below(2);
        let hkv = 1 + rng.below(3);
        let group = 1 + rng.below(3);
        let hq = hkv * group;
        let l = 1 + rng.below(150);
        let s = 1 + rng.below(150);
        let e = 1 + rng.below(40);
        let ev = 1 + rng.below(40);
        let q = rng.array([b, hq, l, e]);
        let k = rng.array([b, hkv, s, e]);
        let v = rng.array([b, hkv, s, ev]);
        let causal = [Causal::None, Causal::TopLeft, Causal::BottomRight][rng.below(3)];
        let scale = if rng.below(2) == 0 {
            None
        } else {
            Some(rng.uniform() * 2.0)
        };
        let dropout = if rng.below(3) == 0 {
            Dropout::new(rng.uniform().abs() * 0.9, rng.next(), rng.next() >> 8)
        } else {
            Dropout::NONE
        };
        let side = |rng: &mut Rng| {
            if rng.below(3) == 0 {
                -1
            } else {
                rng.below(12) as i64
            }
        };
        let window = if rng.below(3) == 0 {
            Window {
                left: side(&mut rng),
                right: side(&mut rng),
            }
        } else {
            Window::NONE
        };
        let softcap = (rng.below(3) == 0).then(|| 0.3 + rng.uniform().abs() * 5.0);
        // ALiBi slopes [Hq] or [B, Hq] (f32), a third of the cases.
        let alibi_shape = if rng.below(2) == 0 {
            vec![hq]
        } else {
            vec![b, hq]
        };
        let slopes =
            ArrayD::from_shape_simple_fn(IxDyn(&alibi_shape), || rng.uniform().abs() as f32 * 0.5);
        let with_alibi = rng.below(3) == 0;
        let slopes_bh = slopes
            .broadcast(IxDyn(&[b, hq]))
            .unwrap()
            .mapv(f64::from)
            .into_dimensionality::<ndarray::Ix2>()
            .unwrap();
        let options = SdpaOptions {
            causal,
            dropout,
            scale,
            enable_gqa: group > 1,
            window,
            softcap,
        };
        let mask_kind = rng.below(3);
        let bool_mask = Array::from_shape_simple_fn(IxDyn(&[1, hq, l, s]), || rng.below(4) != 0);
        let add_mask = Array::from_shape_simple_fn(IxDyn(&[l, s]), || {
            if rng.below(5) == 0 {
                f64::NEG_INFINITY
            } else {
                rng.uniform()
            }
        });
        let (mask, naive_mask) = match mask_kind {
            0 => (None, NaiveMask::None),
            1 => (
                Some(Mask::Bool(bool_mask.view())),
                NaiveMask::Bool(&bool_mask),
            ),
            _ => (
                Some(Mask::Additive(add_mask.view())),
                NaiveMask::Add(&add_mask),
            ),
        };
        let got = if with_alibi {
            sdpa_with_alibi(q.view(), k.view(), v.view(), mask, slopes.view(), &options).unwrap()
        } else {
            sdpa(q.view(), k.view(), v.view(), mask, &options).unwrap()
        };
        let resolved_scale = scale.unwrap_or(1.0 / (e as f64).sqrt());
        let (want, want_lse) = naive(
            &q,
            &k,
            &v,
            naive_mask,
            causal,
            resolved_scale,
            dropout,
            (window, softcap, with_alibi.then_some(&slopes_bh)),
        );
        let err = max_abs_diff(&got.out, &want);
        assert!(err < 1e-12, "case {case}: max abs diff {err}");
        for (g, w) in got.lse.iter().zip(&want_lse) {
            assert!(
                (*g as f64 == *w) || ((*g as f64) - w).abs() <= 1e-6 * w.abs().max(1.0),
                "case {case}: lse {g} vs {w}"
            );
        }
    }
}

#[test]
fn half_types_round_the_f32_result_once() {
    let mut rng = Rng(7);
    let q = rng.array([1, 2, 33, 16]);
    let k = rng.array([1, 2, 45, 16]);
    let v = rng.array([1, 2, 45, 8]);
    let options = SdpaOptions::default();
    let q16 = q.mapv(f16::from_f64);
    let k16 = k.mapv(f16::from_f64);
    let v16 = v.mapv(f16::from_f64);
    let got = sdpa(q16.view(), k16.view(), v16.view(), None, &options).unwrap();
    let q32 = q16.mapv(f32::from);
    let k32 = k16.mapv(f32::from);
    let v32 = v16.mapv(f32::from);
    let want = sdpa(q32.view(), k32.view(), v32.view(), None, &options).unwrap();
    assert_eq!(got.out, want.out.mapv(f16::from_f32));
    assert_eq!(got.lse, want.lse);
    let qb = q.mapv(bf16::from_f64);
    let kb = k.mapv(bf16::from_f64);
    let vb = v.mapv(bf16::from_f64);
    let got = sdpa(qb.view(), kb.view(), vb.view(), None, &options).unwrap();
    let want = sdpa(
        qb.mapv(f32::from).view(),
        kb.mapv(f32::from).view(),
        vb.mapv(f32::from).view(),
        None,
        &options,
    )
    .unwrap();
    assert_eq!(got.out, want.out.mapv(bf16::from_f32));
}

#[test]
fn empty_dimensions_follow_the_math_backend() {
    let options = SdpaOptions::default();
    // S = 0: every row has no key; output 0, lse -inf.
    let q = Array4::<f32>::ones((1, 2, 3, 4));
    let kv = Array4::<f32>::ones((1, 2, 0, 4));
    let r = sdpa(q.view(), kv.view(), kv.view(), None, &options).unwrap();
    assert_eq!(r.out, Array4::zeros((1, 2, 3, 4)));
    assert!(r.lse.iter().all(|x| *x == f32::NEG_INFINITY));
    // L = 0: empty output.
    let q = Array4::<f32>::ones((1, 2, 0, 4));
    let kv = Array4::<f32>::ones((1, 2, 5, 4));
    let r = sdpa(q.view(), kv.view(), kv.view(), None, &options).unwrap();
    assert_eq!(r.out.shape(), &[1, 2, 0, 4]);
    // E = 0: the scores are 0 (not 0 * inf), so the output is the mean of v.
    let q = Array4::<f64>::zeros((1, 1, 2, 0));
    let k = Array4::<f64>::zeros((1, 1, 4, 0));
    let v = Array4::from_shape_fn((1, 1, 4, 2), |(_, _, j, y)| (j * 2 + y) as f64);
    let r = sdpa(q.view(), k.view(), v.view(), None, &options).unwrap();
    assert_eq!(
        r.out,
        Array4::from_shape_vec((1, 1, 2, 2), vec![3.0, 4.0, 3.0, 4.0]).unwrap()
    );
    // Ev = 0: empty output, lse still computed.
    let q = Array4::<f64>::zeros((1, 1, 2, 3));
    let v = Array4::<f64>::zeros((1, 1, 4, 0));
    let r = sdpa(q.view(), q.view(), v.view(), None, &options);
    assert!(r.is_err(), "k and v lengths differ: 2 vs 4");
    let k = Array4::<f64>::zeros((1, 1, 4, 3));
    let r = sdpa(q.view(), k.view(), v.view(), None, &options).unwrap();
    assert_eq!(r.out.shape(), &[1, 1, 2, 0]);
    assert!((r.lse[[0, 0, 0]] - 4f32.ln()).abs() < 1e-6);
}

#[test]
fn fully_masked_rows_are_zero_and_dropout_one_drops_all() {
    let mut rng = Rng(99);
    let q = rng.array([1, 1, 4, 8]);
    let mask = Array::from_shape_fn(IxDyn(&[4, 6]), |idx| idx[0] != 2);
    let r = sdpa(
        q.view(),
        rng.array([1, 1, 6, 8]).view(),
        rng.array([1, 1, 6, 5]).view(),
        Some(Mask::Bool(mask.view())),
        &SdpaOptions::default(),
    )
    .unwrap();
    assert!(r
        .out
        .slice(ndarray::s![0, 0, 2, ..])
        .iter()
        .all(|x| *x == 0.0));
    assert!(r
        .out
        .slice(ndarray::s![0, 0, 1, ..])
        .iter()
        .all(|x| *x != 0.0));
    assert_eq!(r.lse[[0, 0, 2]], f32::NEG_INFINITY);
    let all_neg_inf = Array::from_elem(IxDyn(&[6]), f64::NEG_INFINITY);
    let r = sdpa(
        q.view(),
        rng.array([1, 1, 6, 8]).view(),
        rng.array([1, 1, 6, 5]).view(),
        Some(Mask::Additive(all_neg_inf.view())),
        &SdpaOptions::default(),
    )
    .unwrap();
    assert!(r.out.iter().all(|x| *x == 0.0));
    let options = SdpaOptions {
        dropout: Dropout::new(1.0, 1, 2),
        ..Default::default()
    };
    let r = sdpa(q.view(), q.view(), q.view(), None, &options).unwrap();
    assert!(r.out.iter().all(|x| *x == 0.0));
    assert!(r.lse.iter().all(|x| x.is_finite()));
}

#[test]
fn f32_reference_matches_the_naive_definition_with_its_scale_and_lse() {
    // The f32 path has its own exp, scale conversion and lse rounding; the naive f64
    // definition on the same (f32-exact) inputs bounds its error. Scores reach |30| so
    // that a wrong max shift shows in the lse.
    let mut rng = Rng(0xD1B54A32D192ED03);
    for case in 0..60 {
        let b = 1 + rng.below(2);
        let hkv = 1 + rng.below(2);
        let group = 1 + rng.below(3);
        let hq = hkv * group;
        let l = 1 + rng.below(90);
        let s = 1 + rng.below(90);
        let e = 1 + rng.below(24);
        let ev = 1 + rng.below(24);
        let round = |a: Array4<f64>| a.mapv(|x| x as f32 as f64);
        let q = round(rng.array([b, hq, l, e]).mapv(|x| 3.0 * x));
        let k = round(rng.array([b, hkv, s, e]).mapv(|x| 3.0 * x));
        let v = round(rng.array([b, hkv, s, ev]));
        let causal = [Causal::None, Causal::TopLeft, Causal::BottomRight][rng.below(3)];
        let scale = (rng.uniform() * 2.0) as f32 as f64;
        let dropout = if rng.below(3) == 0 {
            Dropout::new(0.5, rng.next(), rng.next() >> 8)
        } else {
            Dropout::NONE
        };
        let options = SdpaOptions {
            causal,
            dropout,
            scale: Some(scale),
            enable_gqa: group > 1,
            ..Default::default()
        };
        let to32 = |a: &Array4<f64>| a.mapv(|x| x as f32);
        let got = sdpa(
            to32(&q).view(),
            to32(&k).view(),
            to32(&v).view(),
            None,
            &options,
        )
        .unwrap();
        let (want, want_lse) = naive(
            &q,
            &k,
            &v,
            NaiveMask::None,
            causal,
            scale,
            dropout,
            (Window::NONE, None, None),
        );
        let err = max_abs_diff(&got.out.mapv(|x| x as f64), &want);
        assert!(err < 2e-5, "case {case}: max abs diff {err}");
        for (g, w) in got.lse.iter().zip(&want_lse) {
            assert!(
                (*g as f64 == *w) || ((*g as f64) - w).abs() <= 2e-6 * w.abs().max(1.0),
                "case {case}: lse {g} vs {w}"
            );
        }
    }
}

#[test]
fn dropout_space_must_cover_the_problem() {
    let mut rng = Rng(7);
    let q = rng.array([1, 2, 3, 4]);
    let kv = rng.array([1, 2, 5, 4]);
    let options = SdpaOptions {
        dropout: Dropout::new(0.5, 11, 0),
        ..Default::default()
    };
    let space = |heads_q, len_q, len_kv| DropoutSpace {
        batch_offset: 0,
        heads_q,
        len_q,
        len_kv,
    };
    let run = |sp| sdpa_in_space(q.view(), kv.view(), kv.view(), None, &options, Some(sp));
    // Exactly the problem's space is the default one; a larger space is accepted.
    let default = sdpa(q.view(), kv.view(), kv.view(), None, &options).unwrap();
    assert_eq!(run(space(2, 3, 5)).unwrap().out, default.out);
    assert!(run(space(2, 4, 5)).is_ok());
    assert!(run(space(2, 3, 6)).is_ok());
    // A larger space moves the stream: the keep decisions of row i come from i * S'.
    assert_ne!(run(space(2, 3, 9)).unwrap().out, default.out);
    for (bad, what) in [
        (space(1, 3, 5), "fewer heads"),
        (space(3, 3, 5), "more heads"),
        (space(2, 2, 5), "fewer queries"),
        (space(2, 3, 4), "fewer keys"),
    ] {
        let err = run(bad).expect_err(what).to_string();
        assert!(err.contains("dropout space"), "{what}: {err}");
    }
}

#[test]
fn alibi_slopes_of_a_wrong_shape_or_not_finite_are_named() {
    let q = Array4::<f64>::zeros((2, 3, 4, 8));
    let options = SdpaOptions::default();
    for (shape, value) in [
        (vec![2], 0.5f32),
        (vec![3, 2], 0.5),
        (vec![1, 1, 3], 0.5),
        (vec![3], f32::NAN),
    ] {
        let slopes = ArrayD::from_elem(IxDyn(&shape), value);
        let e = sdpa_with_alibi(q.view(), q.view(), q.view(), None, slopes.view(), &options)
            .unwrap_err();
        assert!(e.to_string().contains("alibi_slopes"), "{shape:?}: {e}");
    }
}
