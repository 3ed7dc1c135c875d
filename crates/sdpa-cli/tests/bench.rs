//! `sdpa bench` on the CPU with tiny problems: every problem flag runs and prints a
//! row; bad sizes, problems too big for memory and varlen on the CPU are refused with
//! exit code 2 and a message naming the argument, before anything is allocated.

use std::process::{Command, Output};
use std::time::{Duration, Instant};

fn bench(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sdpa"))
        .arg("bench")
        .args(["--device", "cpu", "--repeats", "1"])
        .args(args)
        .output()
        .expect("the sdpa binary runs")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Runs `args`, expects success and the math row timed, returns the table.
fn math_row(args: &[&str], label_has: &[&str]) -> String {
    let o = bench(args);
    assert!(o.status.success(), "{args:?}: {}", stderr(&o));
    let table = stdout(&o);
    assert!(table.contains("GFLOP/s"), "{table}");
    assert!(
        table.contains("masks and dropout do not change the count"),
        "{table}"
    );
    let math = table
        .lines()
        .find(|l| l.starts_with("math "))
        .unwrap_or_else(|| panic!("no math row: {table}"));
    assert!(math.contains(" ms "), "math not timed: {math}");
    for want in label_has {
        assert!(math.contains(want), "{want} missing from {math}");
    }
    assert!(table.contains("auto (math)"), "{table}");
    assert!(
        table.contains("flash") && table.contains("runs on CUDA only"),
        "{table}"
    );
    table
}

fn refused(args: &[&str]) -> String {
    let o = bench(args);
    assert_eq!(
        o.status.code(),
        Some(2),
        "{args:?}: {}{}",
        stdout(&o),
        stderr(&o)
    );
    assert!(stdout(&o).is_empty(), "{}", stdout(&o));
    let e = stderr(&o);
    assert!(e.starts_with("error: "), "{e}");
    assert!(!e.contains("panicked"), "{e}");
    e
}

#[test]
fn overflowing_sizes_are_an_error_naming_the_argument() {
    let e = refused(&["--shape", "4294967296,4294967296,1,1"]);
    assert!(
        e.contains("--batch, --heads") && e.contains("(or --shape)"),
        "{e}"
    );
    assert!(e.contains("[4294967296, 4294967296, 1, 1]"), "{e}");
    let e = refused(&["--shape", "1,1,4,4", "--len-kv", "18446744073709551615"]);
    assert!(e.contains("--len-kv"), "{e}");
}

#[test]
fn specification_errors_name_the_argument() {
    let e = refused(&["--shape", "1,6,4,4", "--kv-heads", "4"]);
    assert!(e.contains("key:") && e.contains("divides"), "{e}");
    let e = refused(&["--shape", "1,2,4,4", "--dropout", "1.5"]);
    assert!(e.contains("dropout_p"), "{e}");
}

#[test]
fn gqa_mqa_l_ne_s_ev_ne_e_run() {
    math_row(
        &["--shape", "2,4,8,8", "--kv-heads", "2", "--dtype", "f32"],
        &["Hq=4 Hkv=2"],
    );
    math_row(&["--shape", "1,4,8,8", "--kv-heads", "1"], &["Hkv=1"]);
    math_row(&["--shape", "1,2,5,8", "--len-kv", "13"], &["L=5 S=13"]);
    math_row(
        &[
            "--shape",
            "1,2,8,16",
            "--head-dim-v",
            "4",
            "--dtype",
            "bf16",
        ],
        &["E=16 Ev=4 bf16"],
    );
}

#[test]
fn causal_alignments_and_dropout_run() {
    math_row(
        &[
            "--shape",
            "1,2,6,8",
            "--len-kv",
            "10",
            "--causal",
            "bottom-right",
        ],
        &["causal=bottom_right"],
    );
    math_row(&["--shape", "1,2,6,8", "--causal"], &["causal=top_left"]);
    math_row(
        &["--shape", "1,2,6,8", "--dropout", "0.25", "--dtype", "f64"],
        &["dropout=0.25 "],
    );
}

#[test]
fn every_mask_kind_runs() {
    for (kind, label) in [
        ("key-padding", "mask=key-padding"),
        ("bool", "mask=bool"),
        ("additive", "mask=additive"),
    ] {
        math_row(
            &["--shape", "3,2,6,8", "--len-kv", "9", "--mask", kind],
            &[label],
        );
    }
}

#[test]
fn json_carries_every_dimension() {
    let o = bench(&[
        "--shape",
        "2,4,8,8",
        "--kv-heads",
        "2",
        "--len-kv",
        "12",
        "--head-dim-v",
        "4",
        "--mask",
        "bool",
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let rows: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let math = &rows.as_array().unwrap()[1];
    assert_eq!(math["backend"], "math");
    assert_eq!(math["heads_kv"], 2);
    assert_eq!(math["len_kv"], 12);
    assert_eq!(math["head_dim_v"], 4);
    assert_eq!(math["mask"], "bool");
    // 2*B*Hq*L*S*(E+Ev): masks do not change it.
    assert_eq!(math["flops"], 2.0 * 2.0 * 4.0 * 8.0 * 12.0 * 12.0);
}

#[test]
fn a_problem_too_big_for_memory_is_refused_before_allocation() {
    // q alone is 2 TiB: far past any test machine's memory, well inside isize.
    let start = Instant::now();
    let e = refused(&["--shape", "64,64,65536,2048", "--dtype", "f32"]);
    assert!(e.contains("problem too large for memory"), "{e}");
    assert!(e.contains("q [64, 64, 65536, 2048]"), "{e}");
    assert!(e.contains("MemAvailable"), "{e}");
    // Allocating (or filling) 2 TiB would take far longer, or be killed.
    assert!(
        start.elapsed() < Duration::from_secs(20),
        "{:?}",
        start.elapsed()
    );
}

#[test]
fn varlen_on_the_cpu_is_refused() {
    let e = refused(&["--varlen-q", "3,5", "--varlen-k", "4,6", "--heads", "2"]);
    assert!(e.contains("--varlen-q") && e.contains("CUDA only"), "{e}");
    let e = refused(&["--varlen-q", "3,5", "--varlen-k", "4"]);
    assert!(e.contains("--varlen-k: expected 2 lengths"), "{e}");
    let e = refused(&["--varlen-q", "3,5", "--mask", "bool"]);
    assert!(e.contains("--mask"), "{e}");
}

#[test]
fn help_documents_the_syntax() {
    let o = Command::new(env!("CARGO_BIN_EXE_sdpa"))
        .args(["bench", "--help"])
        .output()
        .unwrap();
    let h = stdout(&o);
    for want in [
        "--kv-heads",
        "--len-kv",
        "--head-dim-v",
        "bottom-right",
        "key-padding",
        "--varlen-q",
        "CUDA only",
        "masks and dropout do not change the count",
        "MemAvailable",
    ] {
        assert!(h.contains(want), "{want} missing from --help:\n{h}");
    }
}

#[test]
fn backward_is_timed_with_its_flop_count() {
    // GQA, a mask and dropout: the backward of each on the CPU (the reference).
    let table = math_row(
        &[
            "--shape",
            "1,4,24,16",
            "--kv-heads",
            "2",
            "--dtype",
            "f32",
            "--mask",
            "additive",
            "--dropout",
            "0.1",
            "--backward",
        ],
        &["Hq=4"],
    );
    assert!(
        table.contains("Backward (dq, dk, dv from one untimed forward): 2.5x"),
        "{table}"
    );
    let o = bench(&["--shape", "1,2,16,8", "--backward", "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let rows: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    let math = rows
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["backend"] == "math")
        .unwrap();
    assert_eq!(math["pass"], "backward");
    // 2.5 x 4*B*H*L*S*E.
    assert_eq!(
        math["flops"].as_f64().unwrap(),
        2.5 * 4.0 * 2.0 * 16.0 * 16.0 * 8.0
    );
}

#[test]
fn sweep_writes_json_that_chart_draws() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("sweep.json");
    let o = bench(&[
        "--sweep",
        "--sweep-lens",
        "16,32",
        "--sweep-head-dims",
        "8",
        "--sweep-tokens",
        "64",
        "--sweep-hidden",
        "16",
        "--out",
        json.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(doc["source"], "sdpa");
    let rows = doc["rows"].as_array().unwrap();
    // 2 lengths x 2 causal settings, each auto + math + flash + efficient.
    assert_eq!(rows.len(), 16);
    let math: Vec<_> = rows.iter().filter(|r| r["backend"] == "math").collect();
    assert!(math.iter().all(|r| r["tflops"].as_f64().unwrap() > 0.0));
    // B * L = 64 tokens, H * E = 16 at every point.
    assert!(math.iter().all(|r| {
        r["batch"].as_u64().unwrap() * r["len"].as_u64().unwrap() == 64
            && r["heads"].as_u64().unwrap() * r["head_dim"].as_u64().unwrap() == 16
    }));
    let charts = dir.path().join("charts");
    let o = Command::new(env!("CARGO_BIN_EXE_sdpa"))
        .args([
            "chart",
            json.to_str().unwrap(),
            "--out",
            charts.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    for name in [
        "forward-hdim8-noncausal-bf16.svg",
        "forward-hdim8-causal-bf16.svg",
    ] {
        let svg = std::fs::read_to_string(charts.join(name)).unwrap();
        assert!(
            svg.contains("sdpa math") && svg.contains("TFLOP/s"),
            "{name}"
        );
    }
    // A sweep takes no single-problem flags; a chart of nothing timed is refused.
    let o = bench(&["--sweep", "--shape", "1,2,16,8"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("--shape"), "{}", stderr(&o));
    let empty = dir.path().join("empty.json");
    std::fs::write(&empty, r#"{"source": "torch", "rows": []}"#).unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_sdpa"))
        .args([
            "chart",
            empty.to_str().unwrap(),
            "--out",
            charts.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("at least one timed point"),
        "{}",
        stderr(&o)
    );
}
