//! Runs a [`Case`] through the CPU reference, whatever its dtype.

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
        HarnessError::case(format!("tensor {name}"), "a floating-point dtype", "bool")
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
    let r = sdpa::attention(
        sdpa::Tensor::Host(four_d("q", q.view())?),
        sdpa::Tensor::Host(four_d("k", k.view())?),
        sdpa::Tensor::Host(four_d("v", v.view())?),
        mask,
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

/// The case with q, k, v and an additive mask widened (exactly) to f64.
pub fn widened(case: &Case) -> Case {
    let widen = |t: &Tensor| match t {
        Tensor::Bool(_) => t.clone(),
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
