//! Runs a [`Case`] through the facade (the CPU reference or a CUDA device), whatever its
//! dtype: the forward, and the backward of cases that hold `dout`.

use crate::case::Case;
use crate::error::{HarnessError, Result};
use crate::tensor::Tensor;
use ndarray::{ArrayD, ArrayView4, ArrayViewD, Ix4};
use sdpa::Exec;
use sdpa_core::{DType, Layout, MaskDesc, MaskKind, Problem, TensorDesc};

/// Output and log-sum-exp of one run.
#[derive(Debug, Clone, PartialEq)]
pub struct RunOutput {
    /// `[B, Hq, L, Ev]` in the case dtype.
    pub out: Tensor,
    /// `[B, Hq, L]`.
    pub lse: ArrayD<f32>,
}

fn four_d<'a, T>(name: &str, a: ArrayViewD<'a, T>) -> Result<ArrayView4<'a, T>> {
    let dims = a.ndim();
    a.into_dimensionality::<Ix4>()
        .map_err(|_| HarnessError::case(format!("tensor {name}"), "4 dims", format!("{dims} dims")))
}

fn desc(name: &str, t: &Tensor) -> Result<TensorDesc> {
    let shape = t.shape();
    let dtype = t.dtype().ok_or_else(|| {
        HarnessError::case(
            format!("tensor {name}"),
            "a floating-point dtype",
            t.dtype_name(),
        )
    })?;
    if shape.len() != 4 {
        return Err(HarnessError::case(
            format!("tensor {name}"),
            "4 dims",
            format!("{} dims", shape.len()),
        ));
    }
    Ok(TensorDesc {
        dtype,
        layout: Layout::contiguous([shape[0], shape[1], shape[2], shape[3]]),
    })
}

/// Validates the case against the specification (dtypes, shapes, mask, options).
pub fn problem(case: &Case) -> Result<Problem> {
    let mask = case.attn_mask.as_ref().map(|m| {
        let kind = match m.dtype() {
            None => MaskKind::Bool,
            Some(dt) => MaskKind::Additive(dt),
        };
        MaskDesc::contiguous(kind, m.shape())
    });
    Ok(Problem::new(
        &desc("q", &case.q)?,
        &desc("k", &case.k)?,
        &desc("v", &case.v)?,
        mask.as_ref(),
        &case.options,
    )?)
}

fn typed<T: sdpa::Elem>(
    [q, k, v]: [&ArrayD<T>; 3],
    mask: Option<sdpa::Mask<'_, T>>,
    case: &Case,
    exec: &Exec<'_>,
    wrap: fn(ArrayD<T>) -> Tensor,
) -> Result<RunOutput> {
    let r = sdpa::attention_with_alibi(
        sdpa::Tensor::Host(four_d("q", q.view())?),
        sdpa::Tensor::Host(four_d("k", k.view())?),
        sdpa::Tensor::Host(four_d("v", v.view())?),
        mask,
        case.alibi_slopes()?.map(sdpa::Alibi::Host),
        &case.options,
        exec,
    )?;
    let (Some(out), Some(lse)) = (r.out.into_host(), r.lse.into_host()) else {
        unreachable!("host arrays in, host arrays out")
    };
    Ok(RunOutput {
        out: wrap(out.into_dyn()),
        lse: lse.into_dyn(),
    })
}

/// Runs the case in its own dtype on `exec` (the CPU reference, or a CUDA device with
/// the backends it enables): the one per-dtype dispatch of the workspace's case runners.
///
/// # Errors
/// Everything the specification rejects (mismatched dtypes, shapes, masks, options), no
/// enabled backend for the case on that device, CUDA failures.
pub fn run_case(case: &Case, exec: &Exec<'_>) -> Result<RunOutput> {
    problem(case)?;
    macro_rules! dispatch {
        ($variant:ident) => {{
            let (Tensor::$variant(q), Tensor::$variant(k), Tensor::$variant(v)) =
                (&case.q, &case.k, &case.v)
            else {
                unreachable!("problem() checked that q, k, v share a dtype")
            };
            let mask = match &case.attn_mask {
                Some(Tensor::$variant(m)) => Some(sdpa::Mask::Additive(m.view())),
                Some(Tensor::Bool(b)) => Some(sdpa::Mask::Bool(b.view())),
                None => None,
                Some(_) => unreachable!("problem() checked the mask dtype"),
            };
            typed([q, k, v], mask, case, exec, Tensor::$variant)
        }};
    }
    match case.q.dtype() {
        Some(DType::F64) => dispatch!(F64),
        Some(DType::F32) => dispatch!(F32),
        Some(DType::F16) => dispatch!(F16),
        Some(DType::BF16) => dispatch!(BF16),
        None => unreachable!("problem() checked that q is floating point"),
    }
}

/// Runs the case through the CPU reference in its own dtype.
///
/// # Errors
/// Everything the specification rejects (mismatched dtypes, shapes, masks, options).
pub fn run_reference(case: &Case) -> Result<RunOutput> {
    run_case(case, &Exec::cpu())
}

/// Gradients of one backward run, in the case dtype.
#[derive(Debug, Clone, PartialEq)]
pub struct BackwardOutput {
    /// The forward's output and lse, which the backward took.
    pub forward: RunOutput,
    /// `[B, Hq, L, E]`.
    pub dq: Tensor,
    /// `[B, Hkv, S, E]`.
    pub dk: Tensor,
    /// `[B, Hkv, S, Ev]`.
    pub dv: Tensor,
    /// In the additive mask's own shape; `None` for a bool mask or none.
    pub dmask: Option<Tensor>,
}

fn typed_backward<T: sdpa::Elem>(
    [q, k, v]: [&ArrayD<T>; 3],
    mask: Option<sdpa::Mask<'_, T>>,
    dout: &ArrayD<T>,
    case: &Case,
    exec: &Exec<'_>,
    wrap: fn(ArrayD<T>) -> Tensor,
    unwrap: fn(&Tensor) -> Option<&ArrayD<T>>,
) -> Result<BackwardOutput> {
    let forward = run_case(case, exec)?;
    let out = unwrap(&forward.out).expect("the forward's output has the case dtype");
    let lse = forward
        .lse
        .view()
        .into_dimensionality::<ndarray::Ix3>()
        .map_err(|_| HarnessError::case("lse", "3 dims", forward.lse.ndim()))?;
    let g = sdpa::attention_backward_with_alibi(
        four_d("q", q.view())?,
        four_d("k", k.view())?,
        four_d("v", v.view())?,
        four_d("out", out.view())?,
        lse,
        four_d("dout", dout.view())?,
        mask,
        case.alibi_slopes()?,
        &case.options,
        exec,
    )?;
    Ok(BackwardOutput {
        dq: wrap(g.dq.into_dyn()),
        dk: wrap(g.dk.into_dyn()),
        dv: wrap(g.dv.into_dyn()),
        dmask: g.dmask.map(wrap),
        forward,
    })
}

/// Runs the forward of `case` and then its backward with the case's `dout` (shape and
/// dtype of `out`), on `exec`, in the case dtype.
///
/// # Errors
/// A case without `dout`, or with one of another shape or dtype; everything
/// [`run_case`] and the backward reject.
pub fn run_backward(case: &Case, exec: &Exec<'_>) -> Result<BackwardOutput> {
    let problem = problem(case)?;
    let dout = case.result("dout").ok_or_else(|| {
        HarnessError::case(
            "tensor dout",
            format!(
                "the incoming gradient, {} {:?}",
                problem.dtype,
                problem.out_shape()
            ),
            "none",
        )
    })?;
    if dout.shape() != problem.out_shape() || dout.dtype() != Some(problem.dtype) {
        return Err(HarnessError::case(
            "tensor dout",
            format!(
                "{} {:?} (dtype and shape of out)",
                problem.dtype,
                problem.out_shape()
            ),
            format!("{} {:?}", dout.dtype_name(), dout.shape()),
        ));
    }
    macro_rules! dispatch {
        ($variant:ident) => {{
            let (
                Tensor::$variant(q),
                Tensor::$variant(k),
                Tensor::$variant(v),
                Tensor::$variant(d),
            ) = (&case.q, &case.k, &case.v, dout)
            else {
                unreachable!("problem() and the check above fixed every dtype")
            };
            let mask = match &case.attn_mask {
                Some(Tensor::$variant(m)) => Some(sdpa::Mask::Additive(m.view())),
                Some(Tensor::Bool(b)) => Some(sdpa::Mask::Bool(b.view())),
                None => None,
                Some(_) => unreachable!("problem() checked the mask dtype"),
            };
            let unwrap: fn(&Tensor) -> Option<&ArrayD<_>> = |t| match t {
                Tensor::$variant(a) => Some(a),
                _ => None,
            };
            typed_backward([q, k, v], mask, d, case, exec, Tensor::$variant, unwrap)
        }};
    }
    match problem.dtype {
        DType::F64 => dispatch!(F64),
        DType::F32 => dispatch!(F32),
        DType::F16 => dispatch!(F16),
        DType::BF16 => dispatch!(BF16),
    }
}

/// The case with q, k, v and an additive mask widened (exactly) to f64.
pub fn widened(case: &Case) -> Case {
    let widen = |t: &Tensor| match t {
        Tensor::Bool(_) | Tensor::I32(_) => t.clone(),
        other => Tensor::F64(other.to_f64()),
    };
    Case {
        q: widen(&case.q),
        k: widen(&case.k),
        v: widen(&case.v),
        attn_mask: case.attn_mask.as_ref().map(widen),
        ..case.clone()
    }
}

/// Runs the case through the reference with every input widened to f64: our truth.
pub fn run_reference_f64(case: &Case) -> Result<RunOutput> {
    problem(case)?;
    run_reference(&widened(case))
}
