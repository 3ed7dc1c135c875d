//! `manifest.json` of a golden folder, as one serde type: `tools/sdpa-golden` writes
//! it (`golden/`, `golden/backward/`, `golden/module/`, `golden/cuda/`), `ci/golden_nested.py` writes the
//! same shape from Python (`golden/nested/`, `golden/nested/cuda/`), and
//! `sdpa-harness` reads every one of them back.
//!
//! A crate of its own so that the generator (its own workspace, with libtorch) and the
//! harness share the type without the generator pulling in the harness or the harness
//! pulling in libtorch; `sdpa-core`, the specification, stays free of file formats.
//!
//! The committed manifests must come out byte for byte, so the layout is fixed here:
//! [`Manifest::to_json`] writes serde_json's pretty form plus a newline, fields in
//! declaration order, and every struct declares its fields in alphabetical order (the
//! order the files have had since they were first written from a sorted map). Fields
//! that only some manifests have are `Option`s left out when `None`; fields that are
//! written as `null` (`mask`, `scale`, a rejected result's `file`) are `Option`s without
//! that attribute. Unknown fields are refused, so a typo in a manifest fails the read.
//!
//! ```
//! use sdpa_manifest::Manifest;
//!
//! let text = r#"{"case_count": 1, "cases": [{"b": 1, "bytes": 8, "causal_applied": false,
//!   "dropout": 0.0, "dtype": "f32", "e": 8, "file": "m.safetensors", "heads": 2,
//!   "is_causal": false, "mode": "eval", "name": "m", "t": 3}],
//!   "libtorch": "2.11.0", "produced_by": "doc"}"#;
//! let manifest = Manifest::from_json(text)?;
//! assert_eq!(manifest.files().collect::<Vec<_>>(), ["m.safetensors"]);
//! assert_eq!(Manifest::from_json(&manifest.to_json()?)?, manifest);
//! # Ok::<(), serde_json::Error>(())
//! ```
#![warn(missing_docs)]
#![forbid(unsafe_code)]

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// A golden folder's `manifest.json`: what produced it and what it lists.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// How many entries `cases` holds (every manifest but `golden/cuda/`'s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub case_count: Option<usize>,
    /// The case files.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cases: Option<Vec<Case>>,
    /// `golden/cuda/`: the day the GPU run made it (UTC, `YYYY-MM-DD`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub date: Option<String>,
    /// The device: `cpu`, or the card (and driver) of a GPU run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    /// `golden/`: how the dropout cases' keep-mask is made.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dropout: Option<String>,
    /// The seed every input is drawn from, as hex.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_seed: Option<String>,
    /// `golden/`: how the inputs are drawn from `input_seed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inputs: Option<String>,
    /// `golden/cuda/`: where each result's inputs and truth are.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inputs_and_truth: Option<String>,
    /// libtorch's version, e.g. `2.11.0+cu130`.
    pub libtorch: String,
    /// `golden/`: libtorch's git commit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub libtorch_git: Option<String>,
    /// `golden/cuda/`: cases whose `out` is larger than this many bytes get no result.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_out_bytes: Option<usize>,
    /// `golden/module/`: what the case files' metadata holds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<String>,
    /// `golden/module/`: the module computed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub module: Option<String>,
    /// `golden/`: the environment that pins libtorch's arithmetic, as `NAME=value`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pinned_env: Option<Vec<String>>,
    /// The command that wrote the folder.
    pub produced_by: String,
    /// `golden/cuda/`: one entry per case and CUDA backend, file or refusal.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub results: Option<Vec<CudaResult>>,
    /// `golden/cuda/`: the cases left out for being larger than `max_out_bytes`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub skipped_larger_than_max_out_bytes: Option<Vec<String>>,
    /// The tch version of the generator.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tch: Option<String>,
    /// What each tensor name of the case files holds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tensors: Option<BTreeMap<String, String>>,
    /// `golden/`: libtorch's thread count.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threads: Option<usize>,
    /// The bytes of all case files together.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_bytes: Option<usize>,
}

impl Manifest {
    /// Parses a manifest's text.
    ///
    /// # Errors
    /// Text that is not a manifest: serde_json's message, with line and column.
    pub fn from_json(text: &str) -> serde_json::Result<Self> {
        serde_json::from_str(text)
    }

    /// The manifest's text, as the committed files have it: pretty-printed with two
    /// spaces, then a newline.
    ///
    /// # Errors
    /// Only what serde_json refuses to write; the type holds nothing it refuses.
    pub fn to_json(&self) -> serde_json::Result<String> {
        Ok(serde_json::to_string_pretty(self)? + "\n")
    }

    /// Every file the manifest lists: the case files, then the CUDA results that have
    /// one, in the manifest's order.
    pub fn files(&self) -> impl Iterator<Item = &str> {
        let cases = self.cases.iter().flatten().map(Case::file);
        let results = self.results.iter().flatten();
        cases.chain(results.filter_map(|r| r.file.as_deref()))
    }
}

/// One entry of `cases`: which kind is told by the fields it has.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Case {
    /// A dense SDPA case of `golden/`, or of `golden/backward/` (with `has_dmask`).
    Attention(AttentionCase),
    /// A dense `CausalSelfAttention` case of `golden/module/`.
    Module(ModuleCase),
    /// A nested SDPA case of `golden/nested/` (`kind: "sdpa"`).
    NestedAttention(NestedAttentionCase),
    /// A nested `CausalSelfAttention` case of `golden/nested/` (`kind: "module"`).
    NestedModule(NestedModuleCase),
}

impl Case {
    /// The case file's name, relative to the manifest's folder.
    pub fn file(&self) -> &str {
        match self {
            Case::Attention(c) => &c.file,
            Case::Module(c) => &c.file,
            Case::NestedAttention(c) => &c.file,
            Case::NestedModule(c) => &c.file,
        }
    }
}

/// A dense SDPA case: its shapes and options, and what libtorch produced.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttentionCase {
    /// Batch size.
    pub b: usize,
    /// The case file's size.
    pub bytes: usize,
    /// `none`, `top_left` or `bottom_right`.
    pub causal: String,
    /// Dropout probability.
    pub dropout_p: f64,
    /// `f64`, `f32`, `f16` or `bf16`.
    pub dtype: String,
    /// Head dim of q and k.
    pub e: usize,
    /// Whether GQA is on.
    pub enable_gqa: bool,
    /// Head dim of v.
    pub ev: usize,
    /// The case file's name.
    pub file: String,
    /// How q and k are filled: `Random`, `Large` or `LargeSigned`.
    pub fill: String,
    /// Which family of cases it belongs to.
    pub group: String,
    /// Backward cases (`golden/backward/`) only: whether the file holds `dmask` and
    /// `dmask_f64` (additive masks); absent from forward cases.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub has_dmask: Option<bool>,
    /// Whether the file holds libtorch's `lse`.
    pub has_lse: bool,
    /// Key/value heads.
    pub hkv: usize,
    /// Query heads.
    pub hq: usize,
    /// PyTorch's `is_causal` (top-left causal).
    pub is_causal: bool,
    /// Query length.
    pub l: usize,
    /// The mask, `null` when there is none.
    pub mask: Option<MaskEntry>,
    /// The case's name.
    pub name: String,
    /// Dropout's Philox offset, as a decimal string (a u64 does not fit a JSON number).
    pub offset: String,
    /// Key length.
    pub s: usize,
    /// The explicit scale, `null` for `1/sqrt(E)`.
    pub scale: Option<f64>,
    /// Dropout's Philox seed, as a decimal string.
    pub seed: String,
    /// libtorch's path for `out` (`math`, `flash_attention_cpu`, `math_dropout_mask`).
    pub torch_backend: String,
}

/// The mask of an [`AttentionCase`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MaskEntry {
    /// The axes it has beyond broadcasting, e.g. `ls` or `b11s`.
    pub axes: String,
    /// `bool` or `additive`.
    pub kind: String,
    /// How its elements are drawn.
    pub pattern: String,
    /// Its stored (broadcast) shape.
    pub shape: Vec<usize>,
}

/// A dense `CausalSelfAttention` case.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModuleCase {
    /// Batch size.
    pub b: usize,
    /// The case file's size.
    pub bytes: usize,
    /// Whether attention was causal (training with `is_causal`).
    pub causal_applied: bool,
    /// Dropout probability.
    pub dropout: f64,
    /// `f32`, `f16` or `bf16`.
    pub dtype: String,
    /// Embedding width.
    pub e: usize,
    /// The case file's name.
    pub file: String,
    /// Attention heads.
    pub heads: usize,
    /// The module's `is_causal` flag.
    pub is_causal: bool,
    /// `train` or `eval`.
    pub mode: String,
    /// The case's name.
    pub name: String,
    /// Sequence length.
    pub t: usize,
}

/// A nested SDPA case (written by `ci/golden_nested.py`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NestedAttentionCase {
    /// The case file's size.
    pub bytes: usize,
    /// `none`, `top_left` or `bottom_right`.
    pub causal: String,
    /// `f32`, `f16` or `bf16`.
    pub dtype: String,
    /// Head dim of q and k.
    pub e: usize,
    /// Head dim of v.
    pub ev: usize,
    /// The case file's name.
    pub file: String,
    /// Key/value heads.
    pub hkv: usize,
    /// Query heads.
    pub hq: usize,
    /// `sdpa`.
    pub kind: String,
    /// Key lengths per sequence.
    pub lens_kv: Vec<usize>,
    /// Query lengths per sequence.
    pub lens_q: Vec<usize>,
    /// The case's name.
    pub name: String,
    /// The explicit scale, `null` for `1/sqrt(E)`.
    pub scale: Option<f64>,
}

/// A nested `CausalSelfAttention` case (written by `ci/golden_nested.py`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NestedModuleCase {
    /// The case file's size.
    pub bytes: usize,
    /// Whether attention was causal (training with `is_causal`).
    pub causal_applied: bool,
    /// `f32`, `f16` or `bf16`.
    pub dtype: String,
    /// Embedding width.
    pub e: usize,
    /// The case file's name.
    pub file: String,
    /// Attention heads.
    pub heads: usize,
    /// The module's `is_causal` flag.
    pub is_causal: bool,
    /// `module`.
    pub kind: String,
    /// Sequence lengths.
    pub lens: Vec<usize>,
    /// `train` or `eval`.
    pub mode: String,
    /// The case's name.
    pub name: String,
}

/// One entry of `golden/cuda/`'s `results`: a backend's file for a case, or why the
/// backend refused it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CudaResult {
    /// `flash`, `efficient`, `cudnn`, `math` or `math_dropout_mask`.
    pub backend: String,
    /// The file's size, when there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes: Option<usize>,
    /// The CPU case's name.
    pub case: String,
    /// `NAME.BACKEND.safetensors`, `null` when the backend refused the case.
    pub file: Option<String>,
    /// libtorch's first line of refusal.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rejected: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    /// Every committed manifest reads and writes back to the same bytes.
    #[test]
    fn committed_manifests_round_trip_byte_for_byte() {
        let golden = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../golden");
        for dir in ["", "backward", "module", "cuda", "nested", "nested/cuda"] {
            let path = golden.join(dir).join("manifest.json");
            let text = std::fs::read_to_string(&path)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            let manifest =
                Manifest::from_json(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            assert_eq!(manifest.to_json().unwrap(), text, "{}", path.display());
            assert!(manifest.files().count() > 0, "{}", path.display());
        }
    }

    #[test]
    fn unknown_fields_are_refused() {
        let text = r#"{"libtorch": "2.11.0", "produced_by": "test", "case_cout": 1}"#;
        let err = Manifest::from_json(text).unwrap_err().to_string();
        assert!(err.contains("unknown field `case_cout`"), "{err}");
    }
}
