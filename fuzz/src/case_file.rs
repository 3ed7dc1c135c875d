//! `case_file`: arbitrary bytes as a case file.
//!
//! Properties: [`Case::from_bytes`] returns `Ok` or `Err`, never panics; a parsed case
//! serialises to bytes that parse back and serialise to the same bytes; a case the
//! specification accepts runs through the reference (within [`WORK_BUDGET`]) without
//! an `Err`, and its output and lse have the problem's shapes and dtype; a case it
//! accepts asks for work bounded by the input's size (zero-size tensors cannot declare
//! dims no data backs); every input is done within [`TIME_BUDGET`].

use crate::{work, WORK_BUDGET};
use sdpa_harness::case::Case;
use sdpa_harness::run;
use std::time::{Duration, Instant};

/// Wall time one input may take, parsing and running included: the harness budget
/// lets a case ask for about 0.3 s of the reference; these run far less
/// ([`WORK_BUDGET`]). `ci/fuzz.sh` gives libFuzzer a matching `-timeout`.
pub const TIME_BUDGET: Duration = Duration::from_secs(2);

/// One fuzz input; panics on a violated property.
pub fn run(data: &[u8]) {
    let start = Instant::now();
    check(data);
    let elapsed = start.elapsed();
    assert!(
        elapsed < TIME_BUDGET,
        "{} input bytes took {elapsed:?}, over the {TIME_BUDGET:?} budget",
        data.len()
    );
}

fn check(data: &[u8]) {
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
    // The harness refuses a case whose dims ask for more than 5e7 + n^2 operations for
    // the n elements it stores (at most one per input byte); this target's own count
    // of the work must agree that an accepted case is bounded by its input.
    let n = data.len() as u128;
    let bound = 100_000_000 + 2 * n * n;
    assert!(
        work(&problem) <= bound,
        "{}: accepted from {n} bytes, but its work {} exceeds {bound}",
        problem.summary(),
        work(&problem)
    );
    // Valid problems too large to run thousands of times a second are skipped.
    if work(&problem) > WORK_BUDGET {
        return;
    }
    let got = run::run_reference(&case)
        .unwrap_or_else(|e| panic!("{}: validated, then refused: {e}", problem.summary()));
    assert_eq!(got.out.shape(), problem.out_shape(), "out shape");
    assert_eq!(got.out.dtype(), Some(problem.dtype), "out dtype");
    assert_eq!(got.lse.shape(), problem.lse_shape(), "lse shape");
}
