//! The `sdpa` binary as a user drives it: eval replays case files and rejects bad
//! ones with one line and no output file; bench and the tutorial print their tables.

use sdpa_core::{Causal, DType, Dropout, SdpaOptions};
use sdpa_harness::case::Case;
use sdpa_harness::strategies::{MaskSpec, ProblemSpec};
use sdpa_harness::{run, Tensor};
use std::path::Path;
use std::process::{Command, Output};

fn sdpa(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sdpa"))
        .args(args)
        .output()
        .expect("the sdpa binary runs")
}

fn spec() -> ProblemSpec {
    ProblemSpec {
        batch: 2,
        heads_kv: 2,
        group: 3,
        len_q: 19,
        len_kv: 31,
        head_dim: 12,
        head_dim_v: 5,
        mask: MaskSpec::Additive {
            shape: vec![2, 1, 19, 31],
            neg_inf: 0.2,
        },
        options: SdpaOptions {
            causal: Causal::BottomRight,
            dropout: Dropout::new(0.25, 77, 1234),
            scale: Some(-0.4),
            enable_gqa: true,
            ..Default::default()
        },
        data_seed: 5,
    }
}

#[test]
fn eval_replays_a_case_and_writes_out_and_lse() {
    let dir = tempfile::tempdir().unwrap();
    for dtype in DType::ALL {
        let case_path = dir.path().join(format!("case-{dtype}.safetensors"));
        let out_path = dir.path().join(format!("out-{dtype}.safetensors"));
        let case = spec().to_case(dtype);
        case.write(&case_path).unwrap();
        let o = sdpa(&[
            "eval",
            case_path.to_str().unwrap(),
            "--backend",
            "math",
            "--device",
            "cpu",
            "--out",
            out_path.to_str().unwrap(),
        ]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let stdout = String::from_utf8_lossy(&o.stdout);
        assert!(stdout.contains("math on cpu"), "{stdout}");
        let written = std::fs::read(&out_path).unwrap();
        let st = safetensors::SafeTensors::deserialize(&written).unwrap();
        let expected = run::run_reference(&case).unwrap();
        let out = st.tensor("out").unwrap();
        assert_eq!(out.shape(), &[2, 6, 19, 5]);
        assert_eq!(out.data(), expected.out.to_le_bytes().as_slice());
        let lse = st.tensor("lse").unwrap();
        assert_eq!(lse.dtype(), safetensors::Dtype::F32);
        assert_eq!(
            lse.data(),
            Tensor::F32(expected.lse).to_le_bytes().as_slice()
        );
    }
}

fn assert_rejected(case_path: &Path, out_path: &Path, needle: &str) {
    let o = sdpa(&[
        "eval",
        case_path.to_str().unwrap(),
        "--out",
        out_path.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(2), "{needle}");
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    assert!(stderr.starts_with("error: "), "{stderr}");
    assert!(stderr.contains(needle), "expected {needle:?} in {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(!out_path.exists(), "no output file on bad input");
}

#[test]
fn eval_rejects_bad_files_with_one_line_and_no_output() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.safetensors");
    let path = dir.path().join("bad.safetensors");

    std::fs::write(&path, b"").unwrap();
    assert_rejected(&path, &out, "empty file");

    std::fs::write(&path, b"this is not a safetensors file at all").unwrap();
    assert_rejected(
        &path,
        &out,
        "case file header length: expected at most 29 bytes",
    );

    let good = spec().to_case(DType::F32).to_bytes().unwrap();
    std::fs::write(&path, &good[..good.len() - 10]).unwrap();
    assert_rejected(&path, &out, "expected data_offsets [start, end]");

    let mut case = spec().to_case(DType::F32);
    case.q = Tensor::F64(case.q.to_f64());
    case.write(&path).unwrap();
    assert_rejected(
        &path,
        &out,
        "key: expected dtype f64 (the dtype of query), got f32",
    );

    let mut case = spec().to_case(DType::F32);
    case.attn_mask = Some(Tensor::F64(case.attn_mask.unwrap().to_f64()));
    case.write(&path).unwrap();
    assert_rejected(&path, &out, "attn_mask: expected dtype bool or f32");

    let mut case = spec().to_case(DType::F32);
    case.options.enable_gqa = false;
    case.write(&path).unwrap();
    assert_rejected(&path, &out, "key: expected 6 heads");

    let mut case = spec().to_case(DType::F32);
    case.options.dropout.p = 1.5;
    case.write(&path).unwrap();
    assert_rejected(
        &path,
        &out,
        "dropout_p: expected a number in [0, 1], got 1.5",
    );

    // q missing: write a file with only k and v.
    let case = spec().to_case(DType::F32);
    let bytes = sdpa_harness::case::serialize(
        &[("k".to_string(), &case.k), ("v".to_string(), &case.v)],
        &Default::default(),
    );
    std::fs::write(&path, bytes).unwrap();
    assert_rejected(&path, &out, "a tensor named q");

    let o = sdpa(&[
        "eval",
        dir.path().join("missing.safetensors").to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(!out.exists());

    // Flash cannot take f32 or an explicit mask: the reason is named.
    let case = spec().to_case(DType::F32);
    case.write(&path).unwrap();
    let o = sdpa(&[
        "eval",
        path.to_str().unwrap(),
        "--backend",
        "flash",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("flash: "));
    assert!(!out.exists());
}

#[test]
fn bench_json_reports_every_backend() {
    let o = sdpa(&[
        "bench",
        "--device",
        "cpu",
        "--shape",
        "1,2,64,16",
        "--dtype",
        "f32",
        "--repeats",
        "2",
        "--json",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let rows: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let rows = rows.as_array().unwrap();
    assert_eq!(rows.len(), 4);
    assert_eq!(rows[0]["backend"], "auto (math)");
    assert!(rows[1]["median_ms"].as_f64().unwrap() > 0.0);
    assert!(rows[1]["gflops"].as_f64().unwrap() > 0.0);
    assert!(rows[2]["unavailable"]
        .as_str()
        .unwrap()
        .contains("runs on CUDA only"));
}

#[test]
fn the_tutorial_runs_without_a_gpu() {
    let o = sdpa(&[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(stdout.contains("out [2, 1, 3, 8]"), "{stdout}");
    assert!(
        stdout.contains("scaled for the CPU: batch 32 -> 2"),
        "{stdout}"
    );
    assert!(
        stdout.contains("cannot run here: runs on CUDA only"),
        "{stdout}"
    );
    assert!(
        stdout.contains("flash only: no enabled backend can run this problem"),
        "{stdout}"
    );
    // Section 4: the module, profiled (batch cut for the CPU), with its op table.
    assert!(
        stdout.contains("CausalSelfAttention(E=512, heads=8"),
        "{stdout}"
    );
    assert!(stdout.contains("CausalSelfAttention.forward"), "{stdout}");
}

#[test]
fn check_judges_case_files_with_truth() {
    let dir = tempfile::tempdir().unwrap();
    let mut case: Case = spec().to_case(DType::BF16);
    let truth = run::run_reference_f64(&case).unwrap();
    case.results.insert("out_f64".into(), truth.out.clone());
    case.write(dir.path().join("good.safetensors")).unwrap();
    let o = sdpa(&["check", dir.path().to_str().unwrap(), "--device", "cpu"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));
    assert!(String::from_utf8_lossy(&o.stdout).contains("1 passed, 0 failed"));
    // A wrong truth is caught.
    let mut wrong = truth.out.to_f64();
    wrong[[0, 0, 0, 0]] += 0.5;
    case.results.insert("out_f64".into(), Tensor::F64(wrong));
    case.write(dir.path().join("bad.safetensors")).unwrap();
    let o = sdpa(&["check", dir.path().to_str().unwrap(), "--device", "cpu"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stdout).contains("1 passed, 1 failed"));
}

#[test]
fn profile_prints_the_op_table_and_writes_a_chrome_trace() {
    let dir = tempfile::tempdir().unwrap();
    let trace = dir.path().join("trace.json");
    let o = sdpa(&[
        "profile",
        "--device",
        "cpu",
        "--batch",
        "2",
        "--seq",
        "16",
        "--embed",
        "32",
        "--heads",
        "4",
        "--iters",
        "3",
        "--trace",
        trace.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let stdout = String::from_utf8_lossy(&o.stdout);
    for op in [
        "CausalSelfAttention.forward",
        "c_attn (linear)",
        "sdpa (math, cpu)",
        "c_proj (linear)",
    ] {
        let line = stdout
            .lines()
            .find(|l| l.starts_with(op))
            .unwrap_or_else(|| panic!("{op} in {stdout}"));
        assert!(line.split_whitespace().any(|w| w == "3"), "3 calls: {line}");
    }
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(&trace).unwrap()).unwrap();
    let events = json["traceEvents"].as_array().unwrap();
    assert_eq!(events.len(), 3 * 5);
    assert!(events
        .iter()
        .all(|e| e["ph"] == "X" && e["dur"].as_f64().unwrap() >= 0.0));
}
