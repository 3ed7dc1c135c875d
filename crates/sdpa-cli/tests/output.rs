//! What the CLI writes (`eval --out`, `profile --trace`): replaced whole or not at all,
//! never through a link, never over a device, a folder, a FIFO or the input, and no
//! temp file left behind, whatever happens.

use sdpa_core::{Causal, DType, Dropout, SdpaOptions};
use sdpa_harness::case::Case;
use sdpa_harness::run;
use sdpa_harness::strategies::{MaskSpec, ProblemSpec};
use std::collections::BTreeSet;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn sdpa(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sdpa"))
        .args(args)
        .output()
        .expect("the sdpa binary runs")
}

fn case(data_seed: u64) -> Case {
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
            causal: Causal::TopLeft,
            dropout: Dropout::new(0.0, 0, 0),
            scale: None,
            enable_gqa: false,
            ..Default::default()
        },
        data_seed,
    }
    .to_case(DType::F32)
}

fn write_case(dir: &Path, name: &str, data_seed: u64) -> PathBuf {
    let path = dir.join(name);
    case(data_seed).write(&path).unwrap();
    path
}

fn eval_args<'a>(case: &'a Path, out: &'a Path) -> Vec<&'a str> {
    vec![
        "eval",
        case.to_str().unwrap(),
        "--device",
        "cpu",
        "--out",
        out.to_str().unwrap(),
    ]
}

fn listing(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

/// The `out` tensor's bytes in a written result file.
fn out_bytes(path: &Path) -> Vec<u8> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensor("out").unwrap().data().to_vec()
}

fn expected_out_bytes(data_seed: u64) -> Vec<u8> {
    run::run_reference(&case(data_seed))
        .unwrap()
        .out
        .to_le_bytes()
}

fn assert_refused(o: &Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{needle}: {stderr}");
    assert!(stderr.starts_with("error: "), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    assert!(stderr.contains(needle), "expected {needle:?} in {stderr}");
}

#[test]
fn parallel_runs_with_the_same_stem_each_keep_their_own_result() {
    let dir = tempfile::tempdir().unwrap();
    const PAIRS: u64 = 32;
    // r.1.safetensors and r.2.safetensors once shared the temp r.partial.
    let jobs: Vec<(u64, PathBuf, PathBuf)> = (0..2 * PAIRS)
        .map(|j| {
            let case = write_case(dir.path(), &format!("case{j}.safetensors"), 1000 + j);
            let out = dir
                .path()
                .join(format!("r{}.{}.safetensors", j / 2, j % 2 + 1));
            (1000 + j, case, out)
        })
        .collect();
    let before = listing(dir.path());
    let children: Vec<_> = jobs
        .iter()
        .map(|(_, case, out)| {
            Command::new(env!("CARGO_BIN_EXE_sdpa"))
                .args(eval_args(case, out))
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for (child, (seed, _, out)) in children.into_iter().zip(&jobs) {
        let o = child.wait_with_output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        assert_eq!(
            out_bytes(out),
            expected_out_bytes(*seed),
            "{}",
            out.display()
        );
    }
    let mut want = before;
    want.extend(
        jobs.iter()
            .map(|(_, _, out)| out.file_name().unwrap().to_string_lossy().into_owned()),
    );
    assert_eq!(listing(dir.path()), want, "outputs only, no temp files");
}

#[test]
fn a_device_a_folder_a_fifo_a_symlink_and_a_trailing_slash_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let case = write_case(dir.path(), "case.safetensors", 1);

    let o = sdpa(&eval_args(&case, Path::new("/dev/null")));
    assert_refused(&o, "/dev/null: expected a file name");
    assert!(o.stderr.ends_with(b"got a character device\n"));
    let meta = std::fs::symlink_metadata("/dev/null").unwrap();
    assert!(meta.file_type().is_char_device(), "the device node stays");

    let folder = dir.path().join("results");
    std::fs::create_dir(&folder).unwrap();
    let fifo = dir.path().join("fifo");
    let c_path = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: c_path is a NUL-terminated string that outlives the call.
    assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
    let victim = dir.path().join("victim");
    std::fs::write(&victim, b"keep").unwrap();
    let link = dir.path().join("link.safetensors");
    std::os::unix::fs::symlink(&victim, &link).unwrap();
    let before = listing(dir.path());

    assert_refused(&sdpa(&eval_args(&case, &folder)), "got a directory");
    assert!(folder.is_dir());
    assert_refused(&sdpa(&eval_args(&case, &fifo)), "got a FIFO");
    assert!(std::fs::symlink_metadata(&fifo)
        .unwrap()
        .file_type()
        .is_fifo());
    assert_refused(&sdpa(&eval_args(&case, &link)), "got a symlink");
    assert_eq!(std::fs::read(&victim).unwrap(), b"keep");
    assert!(std::fs::symlink_metadata(&link)
        .unwrap()
        .file_type()
        .is_symlink());
    let slash = format!("{}/", folder.display());
    assert_refused(
        &sdpa(&eval_args(&case, Path::new(&slash))),
        "got a name ending in /",
    );
    assert!(listing(&folder).is_empty(), "nothing written in the folder");
    assert_eq!(listing(dir.path()), before, "no temp file, no DIR.partial");
}

#[test]
fn the_input_is_refused_by_identity_however_it_is_spelled() {
    let dir = tempfile::tempdir().unwrap();
    let case = write_case(dir.path(), "case.safetensors", 2);
    let original = std::fs::read(&case).unwrap();
    let hard_link = dir.path().join("alias.safetensors");
    std::fs::hard_link(&case, &hard_link).unwrap();
    let dotted = dir.path().join(".").join("case.safetensors");
    let before = listing(dir.path());
    for out in [&case, &hard_link, &dotted] {
        let o = sdpa(&eval_args(&case, out));
        assert_refused(&o, "expected a file other than the input, got the input");
        assert_eq!(std::fs::read(&case).unwrap(), original, "{}", out.display());
    }
    assert_eq!(listing(dir.path()), before);
}

#[test]
fn symlinks_planted_at_guessable_temp_names_are_never_followed() {
    let dir = tempfile::tempdir().unwrap();
    let case = write_case(dir.path(), "case.safetensors", 3);
    let victim = dir.path().join("victim");
    std::fs::write(&victim, b"keep").unwrap();
    let out = dir.path().join("r.safetensors");
    // The old temp name and the obvious spellings of a new one.
    let planted = [
        "r.partial",
        "r.safetensors.partial",
        "r.safetensors.tmp",
        ".r.safetensors.tmp",
        ".r.safetensors.partial",
    ];
    for name in planted {
        std::os::unix::fs::symlink(&victim, dir.path().join(name)).unwrap();
    }
    let before = listing(dir.path());
    for _ in 0..2 {
        // The second run replaces the first run's output.
        let o = sdpa(&eval_args(&case, &out));
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        assert_eq!(std::fs::read(&victim).unwrap(), b"keep");
        assert_eq!(out_bytes(&out), expected_out_bytes(3));
    }
    let mut want = before;
    want.insert("r.safetensors".into());
    assert_eq!(listing(dir.path()), want);
    for name in planted {
        let meta = std::fs::symlink_metadata(dir.path().join(name)).unwrap();
        assert!(meta.file_type().is_symlink(), "{name} untouched");
    }
}

#[test]
fn a_write_that_fails_midway_leaves_the_old_output_and_no_temp_file() {
    let dir = tempfile::tempdir().unwrap();
    let case = write_case(dir.path(), "case.safetensors", 4);
    let out = dir.path().join("r.safetensors");
    std::fs::write(&out, b"the previous result").unwrap();
    let before = listing(dir.path());
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_sdpa"));
    cmd.args(eval_args(&case, &out));
    // SAFETY: between fork and exec the closure only calls setrlimit, a thin
    // system-call wrapper that neither allocates nor takes locks, on a value on its stack.
    // The binary itself ignores SIGXFSZ, so the over-limit write is an EFBIG it cleans
    // up after, not a signal that kills it.
    unsafe {
        cmd.pre_exec(|| {
            // Below the result's size (out [1, 2, 7, 4] f32 and lse, plus the header),
            // so the first bytes land and a later write fails.
            let limit = libc::rlimit {
                rlim_cur: 100,
                rlim_max: 100,
            };
            if libc::setrlimit(libc::RLIMIT_FSIZE, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let o = cmd.output().unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("r.safetensors: "), "{stderr}");
    assert!(stderr.to_lowercase().contains("file too large"), "{stderr}");
    assert_eq!(std::fs::read(&out).unwrap(), b"the previous result");
    assert_eq!(listing(dir.path()), before, "no temp file left");
}

#[test]
fn an_existing_output_is_replaced_whole_and_keeps_its_mode() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let case = write_case(dir.path(), "case.safetensors", 5);
    let out = dir.path().join("r.safetensors");
    std::fs::write(&out, vec![b'x'; 100_000]).unwrap();
    std::fs::set_permissions(&out, std::fs::Permissions::from_mode(0o640)).unwrap();
    let o = sdpa(&eval_args(&case, &out));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(out_bytes(&out), expected_out_bytes(5));
    let mode = std::fs::metadata(&out).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o640);
}

#[test]
fn profile_trace_follows_the_same_rules() {
    let dir = tempfile::tempdir().unwrap();
    let folder = dir.path().join("traces");
    std::fs::create_dir(&folder).unwrap();
    let victim = dir.path().join("victim");
    std::fs::write(&victim, b"keep").unwrap();
    let link = dir.path().join("trace.json");
    std::os::unix::fs::symlink(&victim, &link).unwrap();
    let before = listing(dir.path());
    let profile = |trace: &Path| {
        sdpa(&[
            "profile",
            "--device",
            "cpu",
            "--batch",
            "1",
            "--seq",
            "8",
            "--embed",
            "16",
            "--heads",
            "2",
            "--iters",
            "1",
            "--trace",
            trace.to_str().unwrap(),
        ])
    };
    for (trace, needle) in [
        (folder.as_path(), "got a directory"),
        (link.as_path(), "got a symlink"),
        (Path::new("/dev/null"), "got a character device"),
    ] {
        let o = profile(trace);
        assert_refused(&o, needle);
        assert!(o.stdout.is_empty(), "refused before profiling");
    }
    assert_eq!(std::fs::read(&victim).unwrap(), b"keep");
    assert_eq!(listing(dir.path()), before);
    let fresh = folder.join("t.json");
    let o = profile(&fresh);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(&fresh).unwrap()).unwrap();
    assert!(json["traceEvents"].is_array());
    assert_eq!(listing(&folder), BTreeSet::from(["t.json".to_string()]));
}
