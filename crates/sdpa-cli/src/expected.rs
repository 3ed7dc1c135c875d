//! The expected results a case carries, checked against its problem before anything
//! runs: a wrong shape found only after the run would leave an output written and a
//! message about the wrong tensor.

use crate::error::CliError;
use sdpa_core::{DType, Problem};
use sdpa_harness::case::Case;
use sdpa_harness::HarnessError;
use std::path::Path;

/// What a stored result may be: `Some(dtype)` for exactly that dtype, `None` for any
/// floating-point dtype.
struct Rule {
    name: &'static str,
    dtype: Option<DType>,
    lse: bool,
}

/// The stored results the CLI reads: the truth in f64, and libtorch's own result (its
/// dtype is the case's or, for a dump from elsewhere, any float; the judge uses it as a
/// peer only when the dtypes agree).
const RULES: [Rule; 4] = [
    Rule {
        name: "out_f64",
        dtype: Some(DType::F64),
        lse: false,
    },
    Rule {
        name: "lse_f64",
        dtype: Some(DType::F64),
        lse: true,
    },
    Rule {
        name: "out",
        dtype: None,
        lse: false,
    },
    Rule {
        name: "lse",
        dtype: None,
        lse: true,
    },
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
        let (shape, of): (Vec<usize>, &str) = if rule.lse {
            (problem.lse_shape().to_vec(), "[B, Hq, L] from q")
        } else {
            (problem.out_shape().to_vec(), "[B, Hq, L, Ev] from q and v")
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
