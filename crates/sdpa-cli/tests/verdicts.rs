//! Verdicts and partial results: a failed verdict exits 1, bad input (the stored results'
//! dtypes and shapes included) exits 2 before anything is computed or written, and
//! `check` names every bad file, goes on, and prints its counts.

use ndarray::{ArrayD, IxDyn};
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

/// A case of out [1, 2, 7, 4], lse [1, 2, 7].
fn case(dtype: DType) -> Case {
    ProblemSpec {
        batch: 1,
        heads_kv: 2,
        group: 1,
        len_q: 7,
        len_kv: 9,
        head_dim: 8,
        head_dim_v: 4,
        mask: MaskSpec::None,
        options: SdpaOptions {
            causal: Causal::None,
            dropout: Dropout::new(0.0, 0, 0),
            scale: None,
            enable_gqa: false,
            ..Default::default()
        },
        data_seed: 9,
    }
    .to_case(dtype)
}

/// The case with its truth (`out_f64`, `lse_f64`) and its own-dtype result (`out`).
fn case_with_results(dtype: DType) -> Case {
    let mut c = case(dtype);
    let truth = run::run_reference_f64(&c).unwrap();
    c.results.insert("out_f64".into(), truth.out);
    c.results
        .insert("lse_f64".into(), Tensor::F64(truth.lse.mapv(f64::from)));
    c.results
        .insert("out".into(), run::run_reference(&c).unwrap().out);
    c
}

fn eval(case: &Path, out: &Path) -> Output {
    sdpa(&[
        "eval",
        case.to_str().unwrap(),
        "--device",
        "cpu",
        "--out",
        out.to_str().unwrap(),
    ])
}

fn zeros(shape: &[usize]) -> Tensor {
    Tensor::F64(ArrayD::zeros(IxDyn(shape)))
}

fn off_by_half(t: &Tensor) -> ArrayD<f64> {
    let mut wrong = t.to_f64();
    wrong[[0, 1, 2, 3]] += 0.5;
    wrong
}

/// `out_f64` off by 0.5 in one element, and no libtorch `out` (which, as right as ours,
/// would widen the peer bound to cover the error).
fn wrong_truth(mut c: Case) -> Case {
    let wrong = off_by_half(&c.results["out_f64"]);
    c.results.insert("out_f64".into(), Tensor::F64(wrong));
    c.results.remove("out");
    c
}

#[test]
fn eval_passes_with_0_and_fails_its_verdict_with_1() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("case.safetensors");
    let out = dir.path().join("out.safetensors");

    case_with_results(DType::F32).write(&path).unwrap();
    let o = eval(&path, &out);
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(0), "{stdout}");
    assert!(stdout.contains("vs out_f64: pass"), "{stdout}");

    // A wrong truth: the verdict fails, the result is still written.
    wrong_truth(case_with_results(DType::F32))
        .write(&path)
        .unwrap();
    std::fs::remove_file(&out).unwrap();
    let o = eval(&path, &out);
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("vs out_f64: FAIL"), "{stdout}");
    assert!(out.exists(), "a failed verdict still writes the result");

    // Only a same-dtype `out` to compare with, and it is wrong.
    let mut c = case(DType::F32);
    let ours = run::run_reference(&c).unwrap().out;
    c.results.insert(
        "out".into(),
        Tensor::from_f64(&off_by_half(&ours), DType::F32),
    );
    c.write(&path).unwrap();
    let o = eval(&path, &out);
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("vs out: FAIL"), "{stdout}");

    c.results.insert("out".into(), ours);
    c.write(&path).unwrap();
    let o = eval(&path, &out);
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(0), "{stdout}");
    assert!(stdout.contains("vs out: pass"), "{stdout}");
}

#[test]
fn stored_results_of_the_wrong_shape_or_dtype_are_bad_input_before_any_write() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("case.safetensors");
    let out = dir.path().join("out.safetensors");
    let p = path.display().to_string();
    let bad: Vec<(&str, Tensor, String)> = vec![
        (
            "out_f64",
            zeros(&[1, 2, 7, 5]),
            format!(
                "{p}: tensor out_f64: expected shape [1, 2, 7, 4] ([B, Hq, L, Ev] from q and v), got [1, 2, 7, 5]"
            ),
        ),
        (
            "out_f64",
            Tensor::F32(ArrayD::zeros(IxDyn(&[1, 2, 7, 4]))),
            format!("{p}: tensor out_f64: expected dtype f64, got f32"),
        ),
        (
            "out",
            zeros(&[1, 2, 4, 7]),
            format!(
                "{p}: tensor out: expected shape [1, 2, 7, 4] ([B, Hq, L, Ev] from q and v), got [1, 2, 4, 7]"
            ),
        ),
        (
            "out",
            Tensor::Bool(ArrayD::from_elem(IxDyn(&[1, 2, 7, 4]), true)),
            format!("{p}: tensor out: expected dtype f64, f32, f16 or bf16, got bool"),
        ),
        (
            "lse_f64",
            zeros(&[1, 2, 9]),
            format!(
                "{p}: tensor lse_f64: expected shape [1, 2, 7] ([B, Hq, L] from q), got [1, 2, 9]"
            ),
        ),
        (
            "lse",
            zeros(&[2, 7]),
            format!(
                "{p}: tensor lse: expected shape [1, 2, 7] ([B, Hq, L] from q), got [2, 7]"
            ),
        ),
    ];
    for (name, tensor, message) in bad {
        let mut c = case_with_results(DType::F32);
        c.results.insert(name.into(), tensor);
        c.write(&path).unwrap();
        let o = eval(&path, &out);
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{stderr}");
        assert_eq!(stderr, format!("error: {message}\n"));
        assert!(o.stdout.is_empty(), "nothing computed: {stderr}");
        assert!(!out.exists(), "nothing written: {message}");
    }
}

#[test]
fn check_names_each_bad_file_goes_on_and_prints_the_counts() {
    let dir = tempfile::tempdir().unwrap();
    let good = case_with_results(DType::F32);
    good.write(dir.path().join("a_good.safetensors")).unwrap();
    std::fs::write(dir.path().join("b_garbage.safetensors"), b"not a case").unwrap();
    wrong_truth(good.clone())
        .write(dir.path().join("c_wrong_truth.safetensors"))
        .unwrap();
    let mut bad_shape = good.clone();
    bad_shape
        .results
        .insert("out_f64".into(), zeros(&[1, 2, 7, 3]));
    bad_shape
        .write(dir.path().join("d_bad_shape.safetensors"))
        .unwrap();
    good.write(dir.path().join("e_good.safetensors")).unwrap();
    let missing = dir.path().join("missing.safetensors");

    let o = sdpa(&[
        "check",
        dir.path().to_str().unwrap(),
        missing.to_str().unwrap(),
        "--device",
        "cpu",
    ]);
    let (stdout, stderr) = (
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr),
    );
    assert_eq!(o.status.code(), Some(2), "{stdout}{stderr}");
    // CPU: math only, one verdict per good case.
    assert!(
        stdout.contains("2 passed, 1 failed, 3 errors"),
        "{stdout}{stderr}"
    );
    assert!(stdout.contains("c_wrong_truth.safetensors [math]: FAIL"));
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 3, "{stderr}");
    for (line, file) in lines.iter().zip([
        "b_garbage.safetensors: ",
        "d_bad_shape.safetensors: tensor out_f64: expected shape [1, 2, 7, 4]",
        "missing.safetensors: ",
    ]) {
        assert!(line.starts_with("error: "), "{line}");
        assert!(line.contains(file), "{file} in {line}");
    }

    // Only failed verdicts: 1.
    for bad in ["b_garbage", "d_bad_shape"] {
        std::fs::remove_file(dir.path().join(format!("{bad}.safetensors"))).unwrap();
    }
    let o = sdpa(&["check", dir.path().to_str().unwrap(), "--device", "cpu"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stdout).contains("2 passed, 1 failed, 0 errors"));
}

#[test]
fn help_documents_the_exit_codes() {
    for args in [&["--help"][..], &["eval", "--help"], &["check", "--help"]] {
        let o = sdpa(args);
        assert!(o.status.success());
        let help = String::from_utf8_lossy(&o.stdout);
        assert!(help.contains("1 = a verdict failed"), "{help}");
        assert!(help.contains("2 = bad input or usage"), "{help}");
    }
}
