//! The golden cases of `golden/` (libtorch 2.11 through tch, see tools/sdpa-golden and
//! ci/golden.sh) through every CPU backend, judged by DESIGN.md's tolerance policy:
//! `max|ours - truth| <= 2 * max|libtorch - truth| + floor`, truth being libtorch's f64
//! math result, never NaN/Inf where the truth is finite, and the lse within
//! `judge::LSE` of the f64 log-sum-exp.
//!
//! The peer rule cannot see a wrong truth (a wrong `out_f64` moves libtorch's error and
//! ours alike), so the truth is also held against the reference run in f64 on the same
//! inputs: two f64 computations of one function must agree to rounding.
//!
//! The manifest and the files must agree exactly: a manifest entry without its file, a
//! file without its entry, a tensor of the wrong shape or dtype, options that differ
//! from the manifest's — each fails naming the case; nothing is skipped.

use sdpa_core::{check_support, Backend, Causal, DType, Device};
use sdpa_harness::case::Case;
use sdpa_harness::golden::golden_dir;
use sdpa_harness::{compare, judge, run, Tensor};
use serde_json::Value;
use std::collections::BTreeSet;

/// The committed goldens hold at least this many cases (issue 3).
const MIN_CASES: usize = 150;

fn manifest() -> Value {
    let path = golden_dir().join("manifest.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (regenerate with bash ci/golden.sh)",
            path.display()
        )
    });
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn dtype_of(name: &str) -> Option<DType> {
    match name {
        "f64" => Some(DType::F64),
        "f32" => Some(DType::F32),
        "f16" => Some(DType::F16),
        "bf16" => Some(DType::BF16),
        _ => None,
    }
}

fn usize_field(entry: &Value, key: &str) -> Result<usize, String> {
    entry[key].as_u64().map(|v| v as usize).ok_or(format!(
        "manifest field {key}: expected an integer, got {}",
        entry[key]
    ))
}

/// What the manifest says one case file holds.
struct Entry {
    name: String,
    file: String,
    dtype: DType,
    q: [usize; 4],
    k: [usize; 4],
    v: [usize; 4],
    out: [usize; 4],
    mask: Option<(bool, Vec<usize>)>,
    has_lse: bool,
    causal: Causal,
    dropout: (f64, u64, u64),
    scale: Option<f64>,
    enable_gqa: bool,
}

fn parse_entry(e: &Value) -> Result<Entry, String> {
    let text = |key: &str| {
        e[key].as_str().map(str::to_owned).ok_or(format!(
            "manifest field {key}: expected a string, got {}",
            e[key]
        ))
    };
    let dtype = dtype_of(&text("dtype")?).ok_or(format!("manifest dtype {}", e["dtype"]))?;
    let [b, hq, hkv, l, s, d, dv] =
        ["b", "hq", "hkv", "l", "s", "e", "ev"].map(|key| usize_field(e, key));
    let (b, hq, hkv, l, s, d, dv) = (b?, hq?, hkv?, l?, s?, d?, dv?);
    let mask = match &e["mask"] {
        Value::Null => None,
        m => {
            let shape = m["shape"]
                .as_array()
                .ok_or("manifest mask.shape: expected an array")?
                .iter()
                .map(|x| x.as_u64().map(|x| x as usize).ok_or("mask.shape: integers"))
                .collect::<Result<Vec<_>, _>>()?;
            Some((m["kind"] == "bool", shape))
        }
    };
    let int_text = |key: &str| -> Result<u64, String> {
        text(key)?
            .parse()
            .map_err(|_| format!("manifest field {key}: expected an integer string"))
    };
    Ok(Entry {
        name: text("name")?,
        file: text("file")?,
        dtype,
        q: [b, hq, l, d],
        k: [b, hkv, s, d],
        v: [b, hkv, s, dv],
        out: [b, hq, l, dv],
        mask,
        has_lse: e["has_lse"]
            .as_bool()
            .ok_or("manifest has_lse: expected a bool")?,
        causal: text("causal")?.parse()?,
        dropout: (
            e["dropout_p"]
                .as_f64()
                .ok_or("manifest dropout_p: expected a number")?,
            int_text("seed")?,
            int_text("offset")?,
        ),
        scale: e["scale"].as_f64(),
        enable_gqa: e["enable_gqa"]
            .as_bool()
            .ok_or("manifest enable_gqa: expected a bool")?,
    })
}

fn expect(
    what: &str,
    t: Option<&Tensor>,
    dtype: Option<DType>,
    shape: &[usize],
) -> Result<(), String> {
    let t = t.ok_or(format!("no tensor {what}"))?;
    if t.dtype() != dtype || t.shape() != shape {
        return Err(format!(
            "tensor {what}: expected {} {shape:?}, got {} {:?}",
            dtype.map_or("bool", DType::name),
            t.dtype_name(),
            t.shape()
        ));
    }
    Ok(())
}

/// Reads one case and checks it against its manifest entry: names, shapes, dtypes,
/// options, and that the harness writes the same bytes back.
fn load(entry: &Entry) -> Result<Case, String> {
    let path = golden_dir().join(&entry.file);
    let bytes = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let case = Case::from_bytes(&bytes).map_err(|e| e.to_string())?;
    if case.name() != Some(entry.name.as_str()) {
        return Err(format!(
            "metadata name: expected {:?}, got {:?}",
            entry.name,
            case.name()
        ));
    }
    let [b, hq, l, _] = entry.q;
    let dt = Some(entry.dtype);
    expect("q", Some(&case.q), dt, &entry.q)?;
    expect("k", Some(&case.k), dt, &entry.k)?;
    expect("v", Some(&case.v), dt, &entry.v)?;
    expect("out", case.result("out"), dt, &entry.out)?;
    expect(
        "out_f64",
        case.result("out_f64"),
        Some(DType::F64),
        &entry.out,
    )?;
    expect(
        "lse_f64",
        case.result("lse_f64"),
        Some(DType::F64),
        &[b, hq, l],
    )?;
    match (entry.has_lse, case.result("lse")) {
        (true, lse) => expect("lse", lse, Some(DType::F32), &[b, hq, l])?,
        (false, None) => {}
        (false, Some(_)) => return Err("tensor lse: the manifest says there is none".into()),
    }
    match (&entry.mask, &case.attn_mask) {
        (None, None) => {}
        (Some((is_bool, shape)), m) => expect(
            "attn_mask",
            m.as_ref(),
            (!is_bool).then_some(entry.dtype),
            shape,
        )?,
        (None, Some(_)) => return Err("tensor attn_mask: the manifest says there is none".into()),
    }
    let o = &case.options;
    let (p, seed, offset) = entry.dropout;
    if o.causal != entry.causal
        || (o.dropout.p, o.dropout.seed, o.dropout.offset) != (p, seed, offset)
        || o.scale != entry.scale
        || o.enable_gqa != entry.enable_gqa
    {
        return Err(format!(
            "options in the file ({o:?}) differ from the manifest's"
        ));
    }
    let known = ["out", "out_f64", "lse", "lse_f64"];
    if let Some(extra) = case.results.keys().find(|k| !known.contains(&k.as_str())) {
        return Err(format!("unexpected tensor {extra}"));
    }
    let rewritten = case.to_bytes().map_err(|e| e.to_string())?;
    if rewritten != bytes {
        return Err("the harness does not write the file back byte for byte".into());
    }
    Ok(case)
}

/// How far two f64 computations of one case may differ: each rounds a score to a few
/// ulps of its magnitude and the softmax passes that on as a relative error of the
/// weights; `max|lse_f64|` bounds the magnitude of the scores that matter, and
/// `max|v| * keep_scale` the outputs. 1e-12 covers the reordered sums (the F64 preset's
/// number); the second term matters only for the huge scores of the large-value cases
/// (|score| ~ 1e11 there: ~2e-3 allowed, their f64 results differ by ~5e-5).
fn truth_bound(case: &Case) -> f64 {
    let finite_max = |t: &Tensor| {
        t.to_f64()
            .iter()
            .filter(|x| x.is_finite())
            .fold(1.0f64, |m, x| m.max(x.abs()))
    };
    let v_max = finite_max(&case.v);
    let score_max = case.result("lse_f64").map_or(1.0, finite_max);
    let keep_scale = case.options.dropout.keep_scale().max(1.0);
    v_max * keep_scale * (1e-12 + 64.0 * f64::EPSILON * score_max)
}

/// Runs `case` on one CPU backend.
fn run_on(backend: Backend, case: &Case) -> sdpa_harness::Result<run::RunOutput> {
    match backend {
        Backend::Math => run::run_reference(case),
        // A backend that starts to accept CPU problems must be added here, or this
        // test would silently not cover it.
        other => panic!(
            "no CPU runner for backend {} in tests/golden.rs",
            other.name()
        ),
    }
}

#[test]
fn golden_cases_pass_on_every_cpu_backend() {
    let manifest = manifest();
    let entries: Vec<Entry> = manifest["cases"]
        .as_array()
        .expect("manifest.json: `cases` is an array")
        .iter()
        .enumerate()
        .map(|(i, e)| {
            parse_entry(e).unwrap_or_else(|err| panic!("manifest case #{i} ({}): {err}", e["name"]))
        })
        .collect();
    assert!(
        entries.len() >= MIN_CASES,
        "manifest lists {} cases, fewer than {MIN_CASES}",
        entries.len()
    );
    assert_eq!(
        manifest["case_count"].as_u64(),
        Some(entries.len() as u64),
        "manifest case_count"
    );

    // Files and manifest entries, one to one.
    let listed: BTreeSet<&str> = entries.iter().map(|e| e.file.as_str()).collect();
    assert_eq!(listed.len(), entries.len(), "manifest lists a file twice");
    let on_disk: BTreeSet<String> = std::fs::read_dir(golden_dir())
        .expect("golden/ is readable")
        .map(|d| {
            d.expect("golden/ entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .filter(|n| n.ends_with(".safetensors"))
        .collect();
    let mut problems: Vec<String> = Vec::new();
    for file in listed.iter().filter(|f| !on_disk.contains(**f)) {
        problems.push(format!(
            "{file}: listed in manifest.json, no such file in golden/"
        ));
    }
    for file in on_disk.iter().filter(|f| !listed.contains(f.as_str())) {
        problems.push(format!("{file}: in golden/, not listed in manifest.json"));
    }

    let mut runs = 0usize;
    let mut worst_ratio = (0.0f64, String::new());
    let mut worst_truth_ratio = (0.0f64, String::new());
    for entry in &entries {
        let case = match load(entry) {
            Ok(case) => case,
            Err(e) => {
                problems.push(format!("{}: {e}", entry.name));
                continue;
            }
        };
        let problem = match run::problem(&case) {
            Ok(p) => p,
            Err(e) => {
                problems.push(format!("{}: the spec rejects it: {e}", entry.name));
                continue;
            }
        };
        match run::run_reference_f64(&case) {
            Ok(ours) => {
                let truth = case
                    .result("out_f64")
                    .expect("load() checked out_f64")
                    .to_f64();
                let r = compare::compare(ours.out.to_f64().view(), truth.view());
                let bound = truth_bound(&case);
                if r.max_abs / bound > worst_truth_ratio.0 {
                    worst_truth_ratio = (r.max_abs / bound, entry.name.clone());
                }
                if !r.passes() || r.max_abs > bound {
                    problems.push(format!(
                        "{}: libtorch's f64 truth and the f64 reference disagree beyond {bound:.3e}: {r}",
                        entry.name
                    ));
                }
            }
            Err(e) => problems.push(format!("{}: f64 reference: {e}", entry.name)),
        }
        let backends: Vec<Backend> = Backend::PRIORITY
            .into_iter()
            .filter(|&b| check_support(b, &problem, Device::Cpu).is_ok())
            .collect();
        if backends.is_empty() {
            problems.push(format!("{}: no CPU backend accepts it", entry.name));
        }
        for backend in backends {
            runs += 1;
            let label = format!("{} on {}", entry.name, backend.name());
            let got = match run_on(backend, &case) {
                Ok(got) => got,
                Err(e) => {
                    problems.push(format!("{label}: {e}"));
                    continue;
                }
            };
            let lse = got.lse.clone();
            match judge::judge(&case, entry.dtype, &got.out, Some(&lse)) {
                Ok(v) if v.passed => {
                    if let (Some(bound), true) = (v.bound, v.ours.max_abs.is_finite()) {
                        let ratio = v.ours.max_abs / bound;
                        if ratio > worst_ratio.0 {
                            worst_ratio = (ratio, label);
                        }
                    }
                }
                Ok(v) => problems.push(format!("{label}: {v}")),
                Err(e) => problems.push(format!("{label}: {e}")),
            }
        }
    }
    println!(
        "golden: {} cases, {runs} backend runs; closest to its bound: {} at {:.2} of it; \
         f64 truth vs f64 reference closest: {} at {:.2} of its bound",
        entries.len(),
        worst_ratio.1,
        worst_ratio.0,
        worst_truth_ratio.1,
        worst_truth_ratio.0
    );
    assert!(
        problems.is_empty(),
        "{} golden problem(s):\n{}",
        problems.len(),
        problems.join("\n")
    );
}
