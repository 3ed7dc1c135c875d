//! `case_file`: arbitrary bytes as a case file.
//!
//! Properties: [`Case::from_bytes`] returns `Ok` or `Err`, never panics; a parsed case
//! serialises to bytes that parse back and serialise to the same bytes; a case the
//! specification accepts runs through the reference (within [`WORK_BUDGET`]) without
//! an `Err`, and its output and lse have the problem's shapes and dtype.

use crate::{work, WORK_BUDGET};
use sdpa_harness::case::Case;
use sdpa_harness::run;

/// One fuzz input; panics on a violated property.
pub fn run(data: &[u8]) {
    let Ok(case) = Case::from_bytes(data) else {
        return;
    };
    let bytes = case.to_bytes().expect("a parsed case serialises");
    let again = Case::from_bytes(&bytes)
        .unwrap_or_else(|e| panic!("a re-serialised case does not parse: {e}"));
    assert_eq!(
        again.to_bytes().expect("a parsed case serialises"),
        bytes,
        "serialise -> parse -> serialise changed the bytes"
    );
    let Ok(problem) = run::problem(&case) else {
        return;
    };
    // Valid problems too large to run here are skipped, but not those whose sizes do
    // not even fit in memory's address space: those must be refused, not attempted.
    if work(&problem) > WORK_BUDGET && work(&problem) <= isize::MAX as u128 {
        return;
    }
    let got = run::run_reference(&case)
        .unwrap_or_else(|e| panic!("{}: validated, then refused: {e}", problem.summary()));
    assert_eq!(got.out.shape(), problem.out_shape(), "out shape");
    assert_eq!(got.out.dtype(), Some(problem.dtype), "out dtype");
    assert_eq!(got.lse.shape(), problem.lse_shape(), "lse shape");
}
