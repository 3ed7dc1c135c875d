//! `sdpa eval --backward`: the backward of a case with `dout`, written and judged.

use sdpa_harness::case::{read_tensor_file, Case};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn sdpa(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sdpa"))
        .args(args)
        .output()
        .expect("the sdpa binary runs")
}

fn golden(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../golden")
        .join(name)
}

#[test]
fn eval_backward_writes_and_judges_every_gradient() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("g.safetensors");
    let case = golden("backward/mask_float_ls_bf16.safetensors");
    let o = sdpa(&[
        "eval",
        case.to_str().unwrap(),
        "--backward",
        "--device",
        "cpu",
        "--out",
        out.to_str().unwrap(),
    ]);
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    for against in ["out_f64", "dq_f64", "dk_f64", "dv_f64", "dmask_f64"] {
        assert!(
            stdout.contains(&format!("vs {against}: pass")),
            "{against}: {stdout}"
        );
    }
    let written = read_tensor_file(&std::fs::read(&out).unwrap()).unwrap();
    let input = Case::read(&case).unwrap();
    for (name, like) in [
        ("dq", &input.q),
        ("dk", &input.k),
        ("dv", &input.v),
        ("dmask", input.attn_mask.as_ref().unwrap()),
    ] {
        let t = &written.tensors[name];
        assert_eq!(t.shape(), like.shape(), "{name}");
        assert_eq!(t.dtype(), input.q.dtype(), "{name}");
    }
    assert!(written.tensors.contains_key("out") && written.tensors.contains_key("lse"));
}

#[test]
fn eval_backward_without_dout_or_on_a_fused_backend_is_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("g.safetensors");
    let forward_only = golden("causal_bottom_right_bool_b11s_l21_s29_f32.safetensors");
    let o = sdpa(&[
        "eval",
        forward_only.to_str().unwrap(),
        "--backward",
        "--device",
        "cpu",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        stderr.contains("tensor dout: expected the incoming gradient"),
        "{stderr}"
    );
    let case = golden("backward/mask_float_ls_bf16.safetensors");
    let o = sdpa(&[
        "eval",
        case.to_str().unwrap(),
        "--backward",
        "--backend",
        "flash",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(2));
    // On the CPU only the reference runs: flash (whose backward runs on CUDA) is refused
    // with its reason.
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("flash: runs on CUDA only"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(!out.exists(), "nothing written on bad input");
}

#[test]
fn check_judges_the_gradients_of_a_case_with_dout() {
    // out, then dq, dk, dv and dmask against their f64 truths: five verdicts.
    let case = golden("backward/mask_float_ls_bf16.safetensors");
    let o = sdpa(&["check", "--device", "cpu", case.to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{stdout}");
    assert!(stdout.contains("5 passed, 0 failed, 0 errors"), "{stdout}");
    // A forward-only case gets one verdict.
    let forward_only = golden("causal_bottom_right_bool_b11s_l21_s29_f32.safetensors");
    let o = sdpa(&["check", "--device", "cpu", forward_only.to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&o.stdout).contains("1 passed, 0 failed, 0 errors"));
}
