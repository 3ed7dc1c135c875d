//! The expected results a case carries, checked against its problem before anything
//! runs: a wrong shape found only after the run would leave an output written and a
//! message about the wrong tensor.

use crate::error::CliError;
use sdpa_core::{DType, Problem};
use sdpa_harness::case::Case;
use sdpa_harness::HarnessError;
use std::path::Path;

/// Whose shape a stored result has.
#[derive(Clone, Copy)]
enum Like {
    Out,
    Lse,
    Query,
    Key,
    Value,
    Mask,
}

/// What a stored result may be: `Some(dtype)` for exactly that dtype, `None` for any
/// floating-point dtype.
struct Rule {
    name: &'static str,
    dtype: Option<DType>,
    like: Like,
}

const fn rule(name: &'static str, dtype: Option<DType>, like: Like) -> Rule {
    Rule { name, dtype, like }
}

/// The stored results the CLI reads: the truth in f64, and libtorch's own result (its
/// dtype is the case's or, for a dump from elsewhere, any float; the judge uses it as a
/// peer only when the dtypes agree).
const RULES: [Rule; 13] = [
    rule("out_f64", Some(DType::F64), Like::Out),
    rule("lse_f64", Some(DType::F64), Like::Lse),
    rule("out", None, Like::Out),
    rule("lse", None, Like::Lse),
    // The backward's (`eval --backward`): the incoming gradient, libtorch's gradients
    // and their f64 truth.
    rule("dout", None, Like::Out),
    rule("dq", None, Like::Query),
    rule("dk", None, Like::Key),
    rule("dv", None, Like::Value),
    rule("dmask", None, Like::Mask),
    rule("dq_f64", Some(DType::F64), Like::Query),
    rule("dk_f64", Some(DType::F64), Like::Key),
    rule("dv_f64", Some(DType::F64), Like::Value),
    rule("dmask_f64", Some(DType::F64), Like::Mask),
];

fn mismatch(case_path: &Path, what: &str, expected: String, actual: String) -> CliError {
    CliError::in_case(
        case_path,
        HarnessError::Case {
            what: format!("tensor {what}"),
            expected,
            actual,
        },
    )
}

/// Checks the dtype and shape of every stored result of `case` (read from `case_path`)
/// that the CLI reads against what `problem` produces.
///
/// # Errors
/// The first result whose dtype or shape is wrong, naming the file, the tensor, the
/// expected and the actual value.
pub fn check(case_path: &Path, case: &Case, problem: &Problem) -> Result<(), CliError> {
    for rule in &RULES {
        let Some(tensor) = case.result(rule.name) else {
            continue;
        };
        match (rule.dtype, tensor.dtype()) {
            (_, None) => {
                return Err(mismatch(
                    case_path,
                    rule.name,
                    format!(
                        "dtype {}",
                        rule.dtype.map_or("f64, f32, f16 or bf16", DType::name)
                    ),
                    tensor.dtype_name().to_string(),
                ))
            }
            (Some(want), Some(got)) if want != got => {
                return Err(mismatch(
                    case_path,
                    rule.name,
                    format!("dtype {want}"),
                    got.to_string(),
                ))
            }
            _ => {}
        }
        let (shape, of): (Vec<usize>, &str) = match rule.like {
            Like::Lse => (problem.lse_shape().to_vec(), "[B, Hq, L] from q"),
            Like::Out => (problem.out_shape().to_vec(), "[B, Hq, L, Ev] from q and v"),
            Like::Query => (case.q.shape().to_vec(), "the shape of q"),
            Like::Key => (case.k.shape().to_vec(), "the shape of k"),
            Like::Value => (case.v.shape().to_vec(), "the shape of v"),
            Like::Mask => match &case.attn_mask {
                Some(m) => (m.shape().to_vec(), "the shape of attn_mask"),
                None => {
                    return Err(mismatch(
                        case_path,
                        rule.name,
                        "no mask gradient (the case has no attn_mask)".into(),
                        "one".into(),
                    ))
                }
            },
        };
        if tensor.shape() != shape.as_slice() {
            return Err(mismatch(
                case_path,
                rule.name,
                format!("shape {shape:?} ({of})"),
                format!("{:?}", tensor.shape()),
            ));
        }
    }
    Ok(())
}
