//! `sdpa eval` on KV-cache case files: a paged f16 case with an append, ALiBi, window
//! and softcap runs on the CPU reference, writes out, lse and the updated caches, and
//! passes against its f64 truth and its expected caches; a wrong expected cache fails
//! the verdict (exit 1); a bad block table is refused by batch row (exit 2) with nothing
//! written.

use ndarray::{Array1, Array2, ArrayD, IxDyn};
use sdpa_core::rng::SplitMix64;
use sdpa_core::{Causal, SdpaOptions, Window};
use sdpa_harness::kvcase::{run_kvcache, widened, KvCase};
use sdpa_harness::Tensor;
use std::process::{Command, Output};

fn sdpa(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sdpa"))
        .args(args)
        .output()
        .expect("the sdpa binary runs")
}

fn case() -> KvCase {
    let mut rng = SplitMix64(0x6b76);
    let mut f16 = |shape: &[usize]| {
        Tensor::F16(ArrayD::from_shape_simple_fn(IxDyn(shape), || {
            half::f16::from_f64(rng.symmetric())
        }))
    };
    // 2 rows, 2 kv heads of 4 query heads each, blocks of 4 keys, shuffled.
    KvCase {
        q: f16(&[2, 8, 2, 16]),
        k_cache: f16(&[7, 4, 2, 16]),
        v_cache: f16(&[7, 4, 2, 16]),
        cache_seqlens: Array1::from(vec![5, 9]).into_dyn(),
        block_table: Some(
            Array2::from_shape_vec((2, 3), vec![6, 0, 3, 2, 5, 1])
                .unwrap()
                .into_dyn(),
        ),
        new: Some((f16(&[2, 2, 2, 16]), f16(&[2, 2, 2, 16]))),
        alibi_slopes: Some(Array1::from_shape_fn(8, |h| 0.1 * (h + 1) as f32).into_dyn()),
        options: SdpaOptions {
            causal: Causal::BottomRight,
            window: Window { left: 6, right: 0 },
            softcap: Some(8.0),
            ..Default::default()
        },
        results: Default::default(),
        extra_metadata: Default::default(),
    }
}

#[test]
fn eval_runs_a_paged_case_with_an_append_and_judges_out_and_the_caches() {
    let dir = std::env::temp_dir().join(format!("sdpa-kv-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut c = case();
    let expected = run_kvcache(&c, &sdpa::Exec::cpu()).unwrap();
    let truth = run_kvcache(&widened(&c), &sdpa::Exec::cpu()).unwrap();
    c.results.insert("out_f64".into(), truth.out.clone());
    c.results
        .insert("k_cache_after".into(), expected.k_cache.clone().unwrap());
    c.results
        .insert("v_cache_after".into(), expected.v_cache.clone().unwrap());
    let cases = dir.join("cases");
    std::fs::create_dir_all(&cases).unwrap();
    let path = cases.join("kv.safetensors");
    std::fs::write(&path, c.to_bytes()).unwrap();
    let out = dir.join("out.safetensors");
    let run = sdpa(&[
        "eval",
        path.to_str().unwrap(),
        "--device",
        "cpu",
        "--out",
        out.to_str().unwrap(),
    ]);
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(stdout.contains("KV-cache reference on cpu"), "{stdout}");
    assert!(
        stdout.contains("vs out_f64: pass") && stdout.contains("vs k_cache_after: pass: bit-equal"),
        "{stdout}"
    );
    let bytes = std::fs::read(&out).unwrap();
    let written = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut names = written.names();
    names.sort();
    assert_eq!(names, ["k_cache", "lse", "out", "v_cache"]);

    // `sdpa check` judges KV-cache cases beside the others.
    let run = sdpa(&["check", cases.to_str().unwrap(), "--device", "cpu"]);
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(stdout.contains("3 passed"), "{stdout}");

    // A wrong expected cache fails the verdict.
    let mut wrong = c.clone();
    wrong
        .results
        .insert("v_cache_after".into(), c.v_cache.clone());
    std::fs::write(&path, wrong.to_bytes()).unwrap();
    let run = sdpa(&[
        "eval",
        path.to_str().unwrap(),
        "--device",
        "cpu",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(
        run.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&run.stdout)
    );

    // A block index out of range: exit 2, naming the row, and nothing written.
    let mut bad = case();
    bad.block_table = Some(
        Array2::from_shape_vec((2, 3), vec![6, 0, 3, 2, 9, 1])
            .unwrap()
            .into_dyn(),
    );
    std::fs::write(&path, bad.to_bytes()).unwrap();
    let fresh = dir.join("never.safetensors");
    let run = sdpa(&[
        "eval",
        path.to_str().unwrap(),
        "--device",
        "cpu",
        "--out",
        fresh.to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert_eq!(run.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("block_table") && stderr.contains("batch row 1, entry 1: 9"),
        "{stderr}"
    );
    assert!(!fresh.exists());
    std::fs::remove_dir_all(&dir).unwrap();
}
