//! Writes the seed corpora under `fuzz/corpus/<target>/` (deterministic; rerun after
//! changing a target's input format): `cargo run --example seed_corpus`.
//!
//! `case_file` gets small, valid case files covering every dtype, mask kind, causal
//! alignment, dropout and GQA, plus one file per way a header can be wrong; the
//! structured targets get pseudo-random byte strings, which `arbitrary` maps to inputs.

use sdpa_core::{Causal, DType, Dropout, SdpaOptions};
use sdpa_harness::strategies::{MaskSpec, ProblemSpec, SplitMix64};
use std::path::Path;

fn write(dir: &Path, name: &str, bytes: &[u8]) {
    std::fs::create_dir_all(dir).expect("create corpus dir");
    std::fs::write(dir.join(name), bytes).expect("write seed");
}

fn tiny(mask: MaskSpec, causal: Causal, dropout: Dropout, group: usize) -> ProblemSpec {
    ProblemSpec {
        batch: 1,
        heads_kv: 2,
        group,
        len_q: 3,
        len_kv: 5,
        head_dim: 4,
        head_dim_v: 2,
        mask,
        options: SdpaOptions {
            causal,
            dropout,
            scale: None,
            enable_gqa: group > 1,
            ..Default::default()
        },
        data_seed: 7,
    }
}

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    let cases = root.join("case_file");
    let specs = [
        (
            "plain",
            tiny(MaskSpec::None, Causal::None, Dropout::NONE, 1),
        ),
        (
            "bool_top_left",
            tiny(
                MaskSpec::Bool {
                    shape: vec![3, 5],
                    keep: 0.7,
                },
                Causal::TopLeft,
                Dropout::NONE,
                1,
            ),
        ),
        (
            "additive_bottom_right_gqa",
            tiny(
                MaskSpec::Additive {
                    shape: vec![1, 4, 1, 5],
                    neg_inf: 0.3,
                },
                Causal::BottomRight,
                Dropout::NONE,
                2,
            ),
        ),
        (
            "dropout",
            tiny(MaskSpec::None, Causal::None, Dropout::new(0.25, 3, 8), 1),
        ),
    ];
    for (name, spec) in &specs {
        for dtype in DType::ALL {
            let bytes = spec.to_case(dtype).to_bytes().expect("serialise");
            write(&cases, &format!("{name}_{dtype}.safetensors"), &bytes);
        }
    }
    let valid = specs[1]
        .1
        .to_case(DType::F32)
        .to_bytes()
        .expect("serialise");
    write(&cases, "truncated.safetensors", &valid[..valid.len() / 2]);
    write(&cases, "header_only.safetensors", &valid[..16]);
    let mut bad_meta = valid.clone();
    if let Some(at) = bad_meta.windows(6).position(|w| w == b"\"true\"") {
        bad_meta[at + 1..at + 5].copy_from_slice(b"maby");
    }
    write(&cases, "bad_metadata.safetensors", &bad_meta);

    let mut rng = SplitMix64(0x5eed);
    for target in ["api", "nested", "differential"] {
        for i in 0..16 {
            let len = 32 + (rng.next_u64() % 160) as usize;
            let bytes: Vec<u8> = (0..len).map(|_| rng.next_u64() as u8).collect();
            write(&root.join(target), &format!("seed_{i:02}"), &bytes);
        }
    }
}
