//! Replays every committed crash input (`fuzz/regressions/<target>/`) and every seed
//! (`fuzz/corpus/<target>/`) through its target: `cargo test` here fails on any input
//! that still breaks a property, so a crash found by `ci/fuzz.sh` stays a failing test
//! until it is fixed. Runs on stable with no libFuzzer involved.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;

fn inputs(dir: &Path) -> Vec<std::path::PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<_> = entries
        .map(|e| e.expect("readable directory entry").path())
        .filter(|p| p.is_file() && p.file_name().is_some_and(|n| n != ".gitkeep"))
        .collect();
    files.sort();
    files
}

fn replay(kind: &str) -> usize {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut failures = Vec::new();
    let mut count = 0;
    for (target, run) in sdpa_fuzz::TARGETS {
        for path in inputs(&root.join(kind).join(target)) {
            let data = std::fs::read(&path).expect("readable input");
            count += 1;
            if let Err(panic) = catch_unwind(AssertUnwindSafe(|| run(&data))) {
                let message = panic
                    .downcast_ref::<String>()
                    .map(String::as_str)
                    .or_else(|| panic.downcast_ref::<&str>().copied())
                    .unwrap_or("(non-string panic)");
                failures.push(format!("{}: {message}", path.display()));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {count} inputs fail:\n{}",
        failures.len(),
        failures.join("\n")
    );
    count
}

#[test]
fn committed_crash_inputs_no_longer_fail() {
    replay("regressions");
}

#[test]
fn seed_corpora_pass() {
    let count = replay("corpus");
    assert!(count > 0, "no seed corpus under fuzz/corpus/");
}
