//! The manifests the generator writes, as [`sdpa_manifest::Manifest`] (the type the
//! harness reads back).

use crate::cases::Case;
use crate::inputs::INPUT_SEED;
use crate::torch::CpuResult;
use crate::{Result, PINNED_ENV};
use sdpa_core::Causal;
use sdpa_manifest::{AttentionCase, Manifest, MaskEntry};
use std::collections::BTreeMap;
use std::path::Path;

/// The tch version the generator is built on (Cargo.toml pins it).
pub const TCH: &str = "0.24.0";

/// `(name, text)` pairs as the manifest's `tensors` map.
pub fn tensors(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|&(name, text)| (name.to_owned(), text.to_owned()))
        .collect()
}

/// A manifest with only the fields every generated one has; the callers fill in theirs.
pub fn base(libtorch: &str, produced_by: &str) -> Manifest {
    Manifest {
        case_count: None,
        cases: None,
        date: None,
        device: None,
        dropout: None,
        input_seed: None,
        inputs: None,
        inputs_and_truth: None,
        libtorch: libtorch.to_owned(),
        libtorch_git: None,
        max_out_bytes: None,
        metadata: None,
        module: None,
        pinned_env: None,
        produced_by: produced_by.to_owned(),
        results: None,
        skipped_larger_than_max_out_bytes: None,
        tch: Some(TCH.to_owned()),
        tensors: None,
        threads: None,
        total_bytes: None,
    }
}

/// Writes `dir/manifest.json`.
pub fn write(dir: &Path, manifest: &Manifest) -> Result<()> {
    let path = dir.join("manifest.json");
    let text = manifest
        .to_json()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    std::fs::write(&path, text).map_err(|e| format!("{}: {e}", path.display()))
}

/// The manifest entry of a dense case.
pub fn attention_case(case: &Case, r: &CpuResult, file: &str, bytes: usize) -> AttentionCase {
    AttentionCase {
        b: case.b,
        bytes,
        causal: case.causal.name().to_owned(),
        dropout_p: case.dropout.p,
        dtype: case.dtype.name().to_owned(),
        e: case.e,
        enable_gqa: case.enable_gqa,
        ev: case.ev,
        file: file.to_owned(),
        fill: format!("{:?}", case.fill),
        group: case.group.to_owned(),
        has_dmask: None,
        has_lse: r.lse.is_some(),
        hkv: case.hkv,
        hq: case.hq,
        is_causal: case.causal == Causal::TopLeft,
        l: case.l,
        mask: case.mask.as_ref().map(|m| MaskEntry {
            axes: m.axes.to_owned(),
            kind: if m.bool_mask { "bool" } else { "additive" }.to_owned(),
            pattern: format!("{:?}", m.pattern),
            shape: m.shape(case.b, case.hq, case.l, case.s),
        }),
        name: case.name.clone(),
        offset: case.dropout.offset.to_string(),
        s: case.s,
        scale: case.scale,
        seed: case.dropout.seed.to_string(),
        torch_backend: r.torch_backend.clone(),
    }
}

/// `golden/manifest.json`: the CPU cases and what makes them reproducible.
pub fn dense(
    libtorch: &str,
    libtorch_git: &str,
    cases: Vec<AttentionCase>,
    total_bytes: usize,
) -> Manifest {
    Manifest {
        case_count: Some(cases.len()),
        cases: Some(cases.into_iter().map(sdpa_manifest::Case::Attention).collect()),
        dropout: Some(
            "keep-mask from sdpa_core::dropout (Philox4x32-10); libtorch's math path zeroes \
             dropped weights and scales v by 1/(1-p)"
                .into(),
        ),
        input_seed: Some(format!("{INPUT_SEED:#x}")),
        inputs: Some(
            "SplitMix64 per case (seed ^ FNV-1a(name)); q, k, v ~ Irwin-Hall(4) normal in \
             f64, rounded to the case dtype"
                .into(),
        ),
        libtorch_git: Some(libtorch_git.to_owned()),
        pinned_env: Some(PINNED_ENV.iter().map(|(k, v)| format!("{k}={v}")).collect()),
        tensors: Some(tensors(&[
            ("q, k, v", "[B, H, L, E] / [B, Hkv, S, E] / [B, Hkv, S, Ev] in the case dtype"),
            ("attn_mask", "bool (true = takes part) or additive in the case dtype, in its broadcast shape"),
            ("out", "libtorch CPU in the case dtype: scaled_dot_product_attention (torch_backend says which path), or _scaled_dot_product_attention_math with dropout_mask for dropout cases"),
            ("out_f64", "truth: _scaled_dot_product_attention_math on the inputs upcast to f64 (same masks and dropout mask)"),
            ("lse", "f32 [B, Hq, L] from _scaled_dot_product_flash_attention_for_cpu (without dropout), where libtorch accepts the case"),
            ("lse_f64", "f64 [B, Hq, L]: logsumexp of the masked scaled f64 scores; -inf for rows with no key"),
        ])),
        threads: Some(1),
        total_bytes: Some(total_bytes),
        // The path names where the committed files were made; it stays as they have it
        // so they reproduce byte for byte.
        ..base(
            libtorch,
            "ci/golden.sh -> crates/sdpa-golden (tch 0.24 on the torch==2.11.0 wheel's libtorch, CPU)",
        )
    }
}

/// `golden/backward/manifest.json`: the backward cases; drawn and pinned as `golden/`.
pub fn backward(
    libtorch: &str,
    libtorch_git: &str,
    cases: Vec<AttentionCase>,
    total_bytes: usize,
) -> Manifest {
    Manifest {
        dropout: Some(
            "keep-mask from sdpa_core::dropout (Philox4x32-10), handed to \
             _scaled_dot_product_attention_math as dropout_mask; autograd through that op"
                .into(),
        ),
        inputs: Some(
            "SplitMix64 per case (seed ^ FNV-1a(name)); q, k, v, dout ~ Irwin-Hall(4) normal \
             in f64, rounded to the case dtype"
                .into(),
        ),
        tensors: Some(tensors(&[
            ("q, k, v", "[B, H, L, E] / [B, Hkv, S, E] / [B, Hkv, S, Ev] in the case dtype"),
            ("attn_mask", "bool (true = takes part) or additive in the case dtype, in its broadcast shape"),
            ("dout", "[B, Hq, L, Ev] in the case dtype: the gradient of out"),
            ("out", "libtorch CPU in the case dtype, the forward of the autograd graph: scaled_dot_product_attention (torch_backend says which path), or _scaled_dot_product_attention_math with dropout_mask for dropout cases"),
            ("out_f64", "truth: _scaled_dot_product_attention_math on the inputs upcast to f64 (same masks and dropout mask)"),
            ("lse", "f32 [B, Hq, L] from _scaled_dot_product_flash_attention_for_cpu (without dropout), where libtorch accepts the case"),
            ("lse_f64", "f64 [B, Hq, L]: logsumexp of the masked scaled f64 scores; -inf for rows with no key"),
            ("dq, dk, dv", "libtorch CPU autograd of out (the same call as out) with grad dout, in the case dtype; dk, dv summed over each kv head's query heads"),
            ("dmask", "additive masks only: libtorch's gradient of the stored mask (a leaf), in its broadcast shape (summed over the broadcast axes), in the case dtype"),
            ("dq_f64, dk_f64, dv_f64, dmask_f64", "truth: autograd of _scaled_dot_product_attention_math on the inputs and dout upcast to f64, checked against the spec's backward formulas composed in f64"),
        ])),
        produced_by: "ci/golden.sh -> tools/sdpa-golden (tch 0.24 on the torch==2.11.0 wheel's \
                      libtorch, CPU autograd)"
            .into(),
        ..dense(libtorch, libtorch_git, cases, total_bytes)
    }
}
