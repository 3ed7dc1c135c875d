//! The backward goldens of `golden/backward/` (libtorch 2.11's CPU autograd through
//! `scaled_dot_product_attention`, tools/sdpa-golden) through the CPU reference backward,
//! judged by DESIGN.md's tolerance policy: each of `dq`, `dk`, `dv` (and `dmask` for an
//! additive mask) within `2 * max|libtorch - truth| + floor * max(1, max|truth|)` of its
//! f64 truth (the floor at the gradient's own magnitude, as FlashAttention 3's tests
//! size it: gradients reach several units, outputs do not), where
//! libtorch's same-dtype gradient is finite, else within the dtype's preset; never
//! non-finite where the truth is finite.
//!
//! The backward takes our own forward's `out` and `lse`, as PyTorch's backward takes its
//! forward's. The f64 truth is also held against our reference backward run in f64 on
//! the same inputs (two f64 computations of one gradient agree to rounding), so a wrong
//! truth cannot hide behind the peer rule. Manifest and files must agree one to one.

use ndarray::{ArrayD, ArrayView3, ArrayView4, Ix3, Ix4};
use sdpa_core::DType;
use sdpa_harness::case::Case;
use sdpa_harness::elem::Elem;
use sdpa_harness::golden::{checked_case_files, golden_dir};
use sdpa_harness::{compare, judge, run, Tensor};
use sdpa_ref::Mask;

/// The committed folder holds at least this many cases.
const MIN_CASES: usize = 50;

fn typed<T: Elem>(t: &Tensor) -> ArrayD<T> {
    // Exact: the stored values are values of T.
    t.to_f64().mapv(T::narrow)
}

fn four<T>(a: &ArrayD<T>) -> ArrayView4<'_, T> {
    a.view().into_dimensionality::<Ix4>().expect("4-d")
}

/// Our gradients of `case` in `T` as harness tensors: dq, dk, dv, dmask.
fn gradients<T: Elem + sdpa::Elem>(
    case: &Case,
    wrap: fn(ArrayD<T>) -> Tensor,
) -> Vec<(&'static str, Tensor)> {
    let fwd = run::run_reference(case).expect("the forward runs");
    let (q, k, v) = (
        typed::<T>(&case.q),
        typed::<T>(&case.k),
        typed::<T>(&case.v),
    );
    let out = typed::<T>(&fwd.out);
    let lse = fwd.lse.clone();
    let dout = typed::<T>(case.result("dout").expect("a backward case holds dout"));
    let bool_mask = case
        .attn_mask
        .as_ref()
        .filter(|m| m.dtype().is_none())
        .map(|m| {
            let Tensor::Bool(b) = m else { unreachable!() };
            b.clone()
        });
    let additive = case
        .attn_mask
        .as_ref()
        .filter(|m| m.dtype().is_some())
        .map(typed::<T>);
    let mask = match (&bool_mask, &additive) {
        (Some(b), _) => Some(Mask::Bool(b.view())),
        (_, Some(a)) => Some(Mask::Additive(a.view())),
        _ => None,
    };
    let lse3: ArrayView3<'_, f32> = lse.view().into_dimensionality::<Ix3>().expect("3-d lse");
    let g = sdpa_ref::bwd::sdpa_backward(
        four(&q),
        four(&k),
        four(&v),
        four(&out),
        lse3,
        four(&dout),
        mask,
        &case.options,
    )
    .expect("the backward runs");
    let mut grads = vec![
        ("dq", wrap(g.dq.into_dyn())),
        ("dk", wrap(g.dk.into_dyn())),
        ("dv", wrap(g.dv.into_dyn())),
    ];
    if let Some(dm) = g.dmask {
        grads.push(("dmask", wrap(dm)));
    }
    grads
}

fn gradients_of(case: &Case, dtype: DType) -> Vec<(&'static str, Tensor)> {
    match dtype {
        DType::F64 => gradients::<f64>(case, Tensor::F64),
        DType::F32 => gradients::<f32>(case, Tensor::F32),
        DType::F16 => gradients::<half::f16>(case, Tensor::F16),
        DType::BF16 => gradients::<half::bf16>(case, Tensor::BF16),
    }
}

#[test]
fn backward_goldens_pass_on_the_cpu_reference() {
    let dir = golden_dir().join("backward");
    let mut problems = Vec::new();
    let files = checked_case_files(&dir, "", &mut problems);
    assert!(
        files.len() >= MIN_CASES,
        "{}: {} cases, expected at least {MIN_CASES}",
        dir.display(),
        files.len()
    );
    let mut closest = (0.0f64, String::new());
    for file in &files {
        let case = match Case::read(dir.join(file)) {
            Ok(c) => c,
            Err(e) => {
                problems.push(format!("{file}: {e}"));
                continue;
            }
        };
        let dtype = case.q.dtype().expect("floating-point q");
        let has_dmask = case.attn_mask.as_ref().is_some_and(|m| m.dtype().is_some());
        let ours = gradients_of(&case, dtype);
        if has_dmask != ours.iter().any(|(n, _)| *n == "dmask") {
            problems.push(format!("{file}: dmask expected = {has_dmask}"));
        }
        // The truth against our own f64 backward on the same (widened) inputs.
        let wide = run::widened(&case);
        let wide = Case {
            results: case
                .results
                .iter()
                .map(|(n, t)| (n.clone(), Tensor::F64(t.to_f64())))
                .collect(),
            ..wide
        };
        let ours_f64 = gradients_of(&wide, DType::F64);
        for ((what, got), (_, got64)) in ours.iter().zip(&ours_f64) {
            match judge::judge_result(&case, dtype, what, got, judge::Floor::Magnitude) {
                Ok(v) => {
                    if !v.passed {
                        problems.push(format!("{file} {what}: {v}"));
                    } else if let Some(b) = v.bound {
                        let used = v.ours.max_abs / b;
                        if used > closest.0 {
                            closest = (used, format!("{file} {what}"));
                        }
                    }
                }
                Err(e) => problems.push(format!("{file} {what}: {e}")),
            }
            let truth = case
                .result(&format!("{what}_f64"))
                .expect("judged above")
                .to_f64();
            let r = compare::compare(got64.to_f64().view(), truth.view());
            let scale = truth.iter().fold(1.0f64, |m, x| m.max(x.abs()));
            if r.max_abs.is_nan() || r.max_abs > 1e-10 * scale {
                problems.push(format!(
                    "{file} {what}: the f64 truth and our f64 backward differ by {:.3e} (scale {scale:.3e})",
                    r.max_abs
                ));
            }
        }
    }
    println!(
        "backward goldens: {} cases; closest to the peer bound: {} at {:.2}",
        files.len(),
        closest.1,
        closest.0
    );
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}
