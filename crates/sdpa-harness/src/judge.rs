//! The tolerance policy of DESIGN.md applied to one result of one case.

use crate::case::Case;
use crate::compare::{compare, compare_with, Report};
use crate::error::{HarnessError, Result};
use crate::tensor::Tensor;
use crate::tolerance::{self, Tolerance};
use ndarray::ArrayD;
use sdpa_core::DType;
use std::fmt;

/// Tolerance on the log-sum-exp, which every backend returns in f32 whatever the dtype.
pub const LSE: Tolerance = Tolerance {
    atol: 1e-4,
    rtol: 1e-5,
    reason: "the lse is max + ln(sum) kept in f32 (2^-24 relative) over sums of up to \
             ~10^4 terms; 1e-5 relative plus 1e-4 absolute (for lse near 0, where ln of \
             a sum near 1 loses relative accuracy) covers it with ~10x margin",
};

/// How a result fared against a case's truth.
#[derive(Debug, Clone)]
pub struct Verdict {
    /// Our output against `out_f64`.
    pub ours: Report,
    /// libtorch's same-dtype output (`out`) against `out_f64`, where the case has one.
    pub torch: Option<Report>,
    /// The bound our max abs error was held to (peer rule), or `None` under the preset.
    pub bound: Option<f64>,
    /// Our lse against `lse_f64`, where the case has one.
    pub lse: Option<Report>,
    /// The verdict.
    pub passed: bool,
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: ours {}",
            if self.passed { "pass" } else { "FAIL" },
            self.ours
        )?;
        if let (Some(t), Some(b)) = (&self.torch, self.bound) {
            write!(
                f,
                "; libtorch max abs err {:.3e}, bound {:.3e}",
                t.max_abs, b
            )?;
        }
        if let Some(l) = &self.lse {
            write!(f, "; lse {l}")?;
        }
        Ok(())
    }
}

fn expect_shape(case_name: &str, what: &str, t: &Tensor, shape: &[usize]) -> Result<()> {
    if t.shape() != shape {
        return Err(HarnessError::case(
            format!("case {case_name}: tensor {what}"),
            format!("shape {shape:?}"),
            format!("{:?}", t.shape()),
        ));
    }
    Ok(())
}

/// How the peer rule's absolute floor is sized.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Floor {
    /// One rounding at magnitude 1: outputs, which are averages of `v`'s rows.
    Unit,
    /// One rounding at the truth's own magnitude, `floor * max(1, max|truth|)`
    /// (FlashAttention 3's `(x + 0.3 - 0.3 - x)` floor): gradients, whose size is set by
    /// the scale, `k` and `q` and reaches several units.
    Magnitude,
}

/// Judges one result `got` (in `dtype`) of a run of `case` by the policy, against the
/// case's `{what}_f64` truth and, as the peer, libtorch's `{what}` in the same dtype:
/// what [`judge`] does for `out` (`Floor::Unit`), and the backward's `dq`, `dk`, `dv`,
/// `dmask` (`Floor::Magnitude`).
///
/// # Errors
/// A case without `{what}_f64`, or whose stored tensors have the wrong shape or dtype.
pub fn judge_result(
    case: &Case,
    dtype: DType,
    what: &str,
    got: &Tensor,
    floor: Floor,
) -> Result<Verdict> {
    let name = case.name().unwrap_or("<unnamed>").to_string();
    let truth_name = format!("{what}_f64");
    let truth = case.result(&truth_name).ok_or_else(|| {
        HarnessError::case(
            format!("case {name}"),
            format!("a tensor {truth_name} (the truth)"),
            "none",
        )
    })?;
    if truth.dtype() != Some(DType::F64) {
        return Err(HarnessError::case(
            format!("case {name}: tensor {truth_name}"),
            "dtype f64",
            truth.dtype_name(),
        ));
    }
    expect_shape(&name, what, got, truth.shape())?;
    let truth = truth.to_f64();
    let mut ours = compare(got.to_f64().view(), truth.view());
    let torch = match case.result(what) {
        Some(t) if t.dtype() == Some(dtype) => {
            expect_shape(&name, what, t, truth.shape())?;
            Some(compare(t.to_f64().view(), truth.view()))
        }
        _ => None,
    };
    // Where libtorch is itself non-finite and the truth is not (f16 overflow), its error
    // bounds nothing: fall back to the preset.
    let (torch, bound) = match torch {
        Some(r) if r.max_abs.is_finite() => {
            let magnitude = match floor {
                Floor::Unit => 1.0,
                Floor::Magnitude => truth.iter().fold(1.0f64, |m, x| m.max(x.abs())),
            };
            let b = tolerance::PEER_FACTOR * r.max_abs + tolerance::peer_floor(dtype) * magnitude;
            if ours.max_abs > b {
                ours.outside = 1;
            }
            (Some(r), Some(b))
        }
        torch => {
            ours = compare_with(
                got.to_f64().view(),
                truth.view(),
                Some(&tolerance::for_dtype(dtype)),
            );
            (torch, None)
        }
    };
    let passed = ours.passes();
    Ok(Verdict {
        ours,
        torch,
        bound,
        lse: None,
        passed,
    })
}

/// Judges `out` (in `dtype`) and `lse` of a run of `case` by the policy: within
/// `2 * max|torch - truth| + floor` where the case holds libtorch's own result `out`
/// in the same dtype, else within the dtype's preset; never non-finite where the truth
/// is finite; the lse within [`LSE`] of `lse_f64` where the case has it.
///
/// # Errors
/// A case without `out_f64`, or whose stored tensors have the wrong shape or dtype.
pub fn judge(
    case: &Case,
    dtype: DType,
    out: &Tensor,
    lse: Option<&ArrayD<f32>>,
) -> Result<Verdict> {
    let name = case.name().unwrap_or("<unnamed>").to_string();
    let Verdict {
        ours, torch, bound, ..
    } = judge_result(case, dtype, "out", out, Floor::Unit)?;
    let lse_report = match (lse, case.result("lse_f64")) {
        (Some(ours_lse), Some(truth_lse)) => {
            expect_shape(&name, "lse_f64", truth_lse, ours_lse.shape())?;
            Some(compare_with(
                ours_lse.mapv(f64::from).view(),
                truth_lse.to_f64().view(),
                Some(&LSE),
            ))
        }
        _ => None,
    };
    let passed = ours.passes() && lse_report.as_ref().is_none_or(Report::passes);
    Ok(Verdict {
        ours,
        torch,
        bound,
        lse: lse_report,
        passed,
    })
}

/// Every gradient of a backward run that the case has a truth for (`dq_f64`, `dk_f64`,
/// `dv_f64`, `dmask_f64`), judged by [`judge_result`] with the magnitude floor; in that
/// order, each with its name.
///
/// # Errors
/// A truth of another shape than the gradient.
pub fn judge_gradients(
    case: &Case,
    dtype: DType,
    grads: &crate::run::BackwardOutput,
) -> Result<Vec<(&'static str, Verdict)>> {
    let mut named = vec![("dq", &grads.dq), ("dk", &grads.dk), ("dv", &grads.dv)];
    if let Some(dm) = &grads.dmask {
        named.push(("dmask", dm));
    }
    let mut out = Vec::new();
    for (name, got) in named {
        if case.result(&format!("{name}_f64")).is_some() {
            out.push((
                name,
                judge_result(case, dtype, name, got, Floor::Magnitude)?,
            ));
        }
    }
    Ok(out)
}
