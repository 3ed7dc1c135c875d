//! The module's backward (`CausalSelfAttention::backward`) against central finite
//! differences of its f64 forward: every element of `x`, of both weights and both biases,
//! in training mode (causal, attention and residual dropout replayed from the seed) and
//! in eval mode; the f32 / bf16 backward against the f64 one; bad input refused.

use ndarray::{Array1, Array2, Array3};
use sdpa_nn::{CausalSelfAttention, Linear, NnError};

const E: usize = 8;
const HEADS: usize = 2;

/// Deterministic values in about [-1, 1).
fn values(n: usize, salt: u64) -> Vec<f64> {
    (0..n as u64)
        .map(|i| {
            let mut z = (i + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15)
                ^ salt.wrapping_mul(0xD1B5_4A32_D192_ED03);
            z ^= z >> 31;
            z = z.wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z ^= z >> 29;
            (z >> 11) as f64 / (1u64 << 52) as f64 - 1.0
        })
        .collect()
}

fn module(dropout: f64, causal: bool) -> CausalSelfAttention<f64> {
    let w = |rows: usize, salt| {
        Array2::from_shape_vec((rows, E), values(rows * E, salt)).unwrap() * 0.6
    };
    let b = |len: usize, salt| Array1::from_vec(values(len, salt)) * 0.2;
    let c_attn = Linear::new(w(3 * E, 1), Some(b(3 * E, 2))).unwrap();
    let c_proj = Linear::new(w(E, 3), Some(b(E, 4))).unwrap();
    CausalSelfAttention::new(c_attn, c_proj, HEADS, dropout, causal).unwrap()
}

/// `sum(forward(x) * g)` with the dropout stream restarted at the same seed, so every
/// call draws the same keep bits.
fn loss(m: &mut CausalSelfAttention<f64>, x: &Array3<f64>, g: &Array3<f64>) -> f64 {
    m.seed(11);
    let y = m.forward(x.view()).unwrap();
    (&y * g).sum()
}

/// Central differences of `loss` with respect to each element that `get`/`set` reach.
fn check_param(name: &str, analytic: &[f64], len: usize, mut at: impl FnMut(usize, f64) -> f64) {
    assert_eq!(analytic.len(), len, "{name}: gradient length");
    let h = 1e-5;
    let mut worst = 0.0f64;
    for (i, &backward) in analytic.iter().enumerate() {
        let fd = (at(i, h) - at(i, -h)) / (2.0 * h);
        let err = (fd - backward).abs() / (1.0 + fd.abs());
        worst = worst.max(err);
        assert!(
            err < 1e-8,
            "{name}[{i}]: finite difference {fd}, backward {backward}"
        );
    }
    eprintln!("{name}: {len} elements, worst relative error {worst:.2e}");
}

fn gradient_check(dropout: f64, causal: bool, training: bool) {
    let (b, t) = (2, 5);
    let x = Array3::from_shape_vec((b, t, E), values(b * t * E, 5)).unwrap();
    let g = Array3::from_shape_vec((b, t, E), values(b * t * E, 6)).unwrap();
    let mut m = module(dropout, causal);
    if !training {
        m.eval();
    }
    m.seed(11);
    let (y, saved) = m.forward_train(x.view()).unwrap();
    // forward_train computes what forward does.
    m.seed(11);
    assert_eq!(y, m.forward(x.view()).unwrap());
    let grads = m.backward(&saved, g.view()).unwrap();

    check_param("dx", grads.dx.as_slice().unwrap(), x.len(), |i, h| {
        let mut xp = x.clone();
        xp.as_slice_mut().unwrap()[i] += h;
        loss(&mut m.clone(), &xp, &g)
    });
    for layer in 0..2 {
        let (dw, db) = if layer == 0 {
            &grads.c_attn
        } else {
            &grads.c_proj
        };
        let name = if layer == 0 { "c_attn" } else { "c_proj" };
        let base = m.clone();
        let lin = |m: &CausalSelfAttention<f64>| {
            if layer == 0 {
                m.c_attn().clone()
            } else {
                m.c_proj().clone()
            }
        };
        let weight = lin(&base).weight().clone();
        let bias = lin(&base).bias().cloned().unwrap();
        let perturb = |w: Array2<f64>, bb: Array1<f64>| {
            let mut m = base.clone();
            let (a, p) = m.layers_mut();
            let target = if layer == 0 { a } else { p };
            target.set_parameters(w, Some(bb)).unwrap();
            m
        };
        check_param(
            &format!("{name}.weight"),
            dw.as_slice().unwrap(),
            weight.len(),
            |i, h| {
                let mut w = weight.clone();
                w.as_slice_mut().unwrap()[i] += h;
                loss(&mut perturb(w, bias.clone()), &x, &g)
            },
        );
        let db = db.as_ref().expect("the layer has a bias");
        check_param(
            &format!("{name}.bias"),
            db.as_slice().unwrap(),
            bias.len(),
            |i, h| {
                let mut bb = bias.clone();
                bb[i] += h;
                loss(&mut perturb(weight.clone(), bb), &x, &g)
            },
        );
    }
}

#[test]
fn gradients_match_finite_differences_in_training_causal() {
    gradient_check(0.0, true, true);
}

#[test]
fn gradients_match_finite_differences_with_attention_and_residual_dropout() {
    gradient_check(0.25, true, true);
}

#[test]
fn gradients_match_finite_differences_without_causal_mask() {
    gradient_check(0.1, false, true);
}

#[test]
fn gradients_match_finite_differences_in_eval_mode() {
    // Eval: no dropout and, as in the tutorial's module, no causal mask.
    gradient_check(0.25, true, false);
}

#[test]
fn dropout_changes_the_gradient() {
    // The keep bits reach the backward: with dropout the gradient differs from without.
    let (b, t) = (1, 4);
    let x = Array3::from_shape_vec((b, t, E), values(b * t * E, 8)).unwrap();
    let g = Array3::from_elem((b, t, E), 1.0);
    let run = |p| {
        let mut m = module(p, true);
        m.seed(3);
        let (_, saved) = m.forward_train(x.view()).unwrap();
        m.backward(&saved, g.view()).unwrap()
    };
    assert_ne!(run(0.0).dx, run(0.5).dx);
}

fn cast<T: sdpa_ref::Element>(m: &CausalSelfAttention<f64>) -> CausalSelfAttention<T> {
    let conv = |l: &Linear<f64>| {
        Linear::new(
            l.weight()
                .mapv(|w| T::from_acc(num_traits::cast(w).unwrap())),
            l.bias()
                .map(|b| b.mapv(|w| T::from_acc(num_traits::cast(w).unwrap()))),
        )
        .unwrap()
    };
    CausalSelfAttention::new(
        conv(m.c_attn()),
        conv(m.c_proj()),
        m.heads(),
        m.dropout(),
        m.is_causal(),
    )
    .unwrap()
}

fn low_precision_matches_f64<T: sdpa_ref::Element>(tol: f64) {
    let (b, t) = (2, 7);
    let x = Array3::from_shape_vec((b, t, E), values(b * t * E, 9)).unwrap();
    let g = Array3::from_shape_vec((b, t, E), values(b * t * E, 10)).unwrap();
    let mut m64 = module(0.2, true);
    let mut mt = cast::<T>(&m64);
    let to_t = |a: &Array3<f64>| a.mapv(|v| T::from_acc(num_traits::cast(v).unwrap()));
    let back = |a: &Array3<f64>| {
        a.mapv(|v| {
            let t = T::from_acc(num_traits::cast(v).unwrap());
            num_traits::cast::<_, f64>(t.to_acc()).unwrap()
        })
    };
    // The f64 module sees the inputs as rounded to T, so only the computation differs.
    m64.seed(4);
    mt.seed(4);
    let (_, s64) = m64.forward_train(back(&x).view()).unwrap();
    let (_, st) = mt.forward_train(to_t(&x).view()).unwrap();
    let g64 = m64.backward(&s64, back(&g).view()).unwrap();
    let gt = mt.backward(&st, to_t(&g).view()).unwrap();
    let compare = |name: &str, want: &[f64], got: Vec<f64>| {
        let scale = want.iter().fold(0.0f64, |a, &b| a.max(b.abs()));
        let worst = want
            .iter()
            .zip(&got)
            .fold(0.0f64, |a, (w, g)| a.max((w - g).abs()));
        assert!(
            worst <= tol * scale,
            "{name}: worst error {worst} at magnitude {scale} (tolerance {tol} of it)"
        );
    };
    let wide = |a: &[T]| {
        a.iter()
            .map(|v| num_traits::cast::<_, f64>(v.to_acc()).unwrap())
            .collect::<Vec<_>>()
    };
    compare(
        "dx",
        g64.dx.as_slice().unwrap(),
        wide(gt.dx.as_slice().unwrap()),
    );
    compare(
        "c_attn.weight",
        g64.c_attn.0.as_slice().unwrap(),
        wide(gt.c_attn.0.as_slice().unwrap()),
    );
    compare(
        "c_proj.weight",
        g64.c_proj.0.as_slice().unwrap(),
        wide(gt.c_proj.0.as_slice().unwrap()),
    );
    compare(
        "c_attn.bias",
        g64.c_attn.1.as_ref().unwrap().as_slice().unwrap(),
        wide(gt.c_attn.1.as_ref().unwrap().as_slice().unwrap()),
    );
}

#[test]
fn f32_backward_matches_f64() {
    low_precision_matches_f64::<f32>(1e-5);
}

#[test]
fn bf16_backward_matches_f64() {
    // bf16 keeps 8 bits: each op rounds once at 2^-9 relative, a few ops deep.
    low_precision_matches_f64::<half::bf16>(4e-2);
}

#[test]
fn backward_refuses_a_gradient_of_another_shape() {
    let x = Array3::<f64>::zeros((1, 3, E));
    let mut m = module(0.0, true);
    let (_, saved) = m.forward_train(x.view()).unwrap();
    let err = m
        .backward(&saved, Array3::<f64>::zeros((1, 4, E)).view())
        .unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("grad_out") && text.contains("[1, 3, 8]") && text.contains("[1, 4, 8]"),
        "{text}"
    );
}

#[test]
fn set_parameters_keeps_the_layer_shape() {
    let mut lin = Linear::new(Array2::<f64>::zeros((3, 2)), Some(Array1::zeros(3))).unwrap();
    let err = lin
        .set_parameters(Array2::zeros((2, 3)), Some(Array1::zeros(3)))
        .unwrap_err();
    assert!(
        matches!(&err, NnError::Weight { name, .. } if name == "weight"),
        "{err}"
    );
    let err = lin.set_parameters(Array2::zeros((3, 2)), None).unwrap_err();
    assert!(
        matches!(&err, NnError::Weight { name, .. } if name == "bias"),
        "{err}"
    );
    let err = lin
        .set_parameters(Array2::zeros((3, 2)), Some(Array1::zeros(2)))
        .unwrap_err();
    assert!(
        matches!(&err, NnError::Weight { name, .. } if name == "bias"),
        "{err}"
    );
    lin.set_parameters(Array2::ones((3, 2)), Some(Array1::ones(3)))
        .unwrap();
    assert_eq!(lin.weight(), &Array2::<f64>::ones((3, 2)));
}
