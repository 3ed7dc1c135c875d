//! Compares the PTX of every kernel variant built from today's embedded sources with the
//! PTX of another revision's `kernels/` (a refactoring of the sources must leave the
//! kernel bodies byte-identical). `bash ci/ptx-compare.sh REV` extracts that revision and
//! runs this with `--ignored`: `SDPA_PTX_BASELINE` is its `kernels/` folder,
//! `SDPA_PTX_OUT` receives `before/` and `after/` PTX files to diff, `SDPA_PTX_ONLY`
//! (a symbol substring) picks variants.
//!
//! No `-lineinfo`: line numbers move with any edit. The `sdpa_shared_bytes` declaration
//! is left out of the comparison (the refactoring added it).

use sdpa_cuda::sources::expanded_source;
use sdpa_cuda::spec::KernelSpec;
use sdpa_cuda::{nvrtc, KernelConfig};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

/// `name` from a `kernels/` folder on disk with its includes (relative to that folder)
/// expanded once each, as `sdpa_cuda::sources::expanded_source` does for the embedded
/// files. A file that moved into a subfolder is looked up at the top level too, for
/// revisions before the move.
fn expand_from_dir(root: &Path, name: &str, seen: &mut Vec<String>, out: &mut String) {
    let base = name.rsplit('/').next().unwrap();
    let text = std::fs::read_to_string(root.join(name))
        .or_else(|_| std::fs::read_to_string(root.join(base)))
        .unwrap_or_else(|e| panic!("{}/{name}: {e}", root.display()));
    for line in text.lines() {
        let trimmed = line.trim();
        if trimmed == "#pragma once" {
            continue;
        }
        if let Some(rest) = trimmed.strip_prefix("#include \"") {
            let inc = rest.trim_end_matches('"');
            if !seen.iter().any(|s| s == inc) {
                seen.push(inc.to_string());
                expand_from_dir(root, inc, seen, out);
            }
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
}

/// The PTX split into what is compared: the kernel entries (from the first `.entry` on)
/// and the module preamble without the `sdpa_shared_bytes` declaration.
fn parts(ptx: &str) -> (String, String) {
    let at = ptx.find(".visible .entry").unwrap_or(ptx.len());
    let preamble = ptx[..at]
        .lines()
        .filter(|l| !l.contains("sdpa_shared_bytes"))
        .collect::<Vec<_>>()
        .join("\n");
    (preamble, ptx[at..].to_string())
}

#[test]
#[ignore = "needs libnvrtc and SDPA_PTX_BASELINE (ci/ptx-compare.sh provides both)"]
fn kernel_bodies_match_the_baseline_revision() {
    let baseline = PathBuf::from(std::env::var_os("SDPA_PTX_BASELINE").expect("SDPA_PTX_BASELINE"));
    let out =
        PathBuf::from(std::env::var_os("SDPA_PTX_OUT").unwrap_or("target/ptx-compare".into()));
    // SDPA_PTX_ONLY: compare only the variants whose symbol contains it.
    let only = std::env::var("SDPA_PTX_ONLY").ok();
    for side in ["before", "after"] {
        std::fs::create_dir_all(out.join(side)).unwrap();
    }
    let config = KernelConfig::default();
    let symbol = |spec: &KernelSpec| spec.symbol(spec.variant().entries[0], &config);
    let jobs: Vec<(KernelSpec, u32)> = KernelSpec::all()
        .into_iter()
        .flat_map(|spec| [(spec, 80), (spec, 90)])
        .filter(|(spec, arch)| spec.runs_on(*arch))
        .filter(|(spec, _)| {
            only.as_ref()
                .is_none_or(|o| symbol(spec).contains(o.as_str()))
        })
        .collect();
    let next = AtomicUsize::new(0);
    let rows = Mutex::new(Vec::new());
    let threads = std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .min(8);
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some((spec, arch)) = jobs.get(i) else {
                    break;
                };
                let options: Vec<String> = spec
                    .options(*arch, &config)
                    .into_iter()
                    .filter(|o| o != "-lineinfo")
                    .collect();
                let mut before = String::new();
                let name = spec.source();
                if !baseline.join(name).exists() {
                    // A kernel the baseline revision does not have: nothing to compare.
                    let file = format!("{}-{}-sm{arch}.ptx", symbol(spec), spec.dtype);
                    rows.lock().unwrap().push((file, "new since the baseline"));
                    continue;
                }
                expand_from_dir(&baseline, name, &mut vec![name.to_string()], &mut before);
                let after = expanded_source(name, None).expect("embedded sources expand");
                let file = format!("{}-{}-sm{arch}.ptx", symbol(spec), spec.dtype);
                let ptx = |src: &str, side: &str| {
                    nvrtc::ptx(src, name, &options)
                        .map(|bytes| {
                            String::from_utf8_lossy(&bytes)
                                .trim_end_matches('\0')
                                .to_string()
                        })
                        .unwrap_or_else(|e| panic!("{side} {file}: {e}"))
                };
                let (ptx_before, ptx_after) = (ptx(&before, "before"), ptx(&after, "after"));
                std::fs::write(out.join("before").join(&file), &ptx_before).unwrap();
                std::fs::write(out.join("after").join(&file), &ptx_after).unwrap();
                let (pre_b, body_b) = parts(&ptx_before);
                let (pre_a, body_a) = parts(&ptx_after);
                let verdict = match (body_b == body_a, pre_b == pre_a) {
                    (true, true) => "identical",
                    (true, false) => "bodies identical, preamble differs",
                    (false, _) => "BODY DIFFERS",
                };
                rows.lock().unwrap().push((file, verdict));
            });
        }
    });
    let mut rows = rows.into_inner().unwrap();
    rows.sort();
    for (file, verdict) in &rows {
        println!("{verdict:<36} {file}");
    }
    let differ: Vec<&String> = rows
        .iter()
        .filter(|(_, v)| *v != "identical" && *v != "new since the baseline")
        .map(|(f, _)| f)
        .collect();
    println!(
        "{} variants compared, {} differ (PTX in {})",
        rows.len(),
        differ.len(),
        out.display()
    );
    assert!(differ.is_empty(), "PTX differs: {differ:?}");
}
