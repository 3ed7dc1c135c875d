//! KV-cache case files (DESIGN.md, "Case-file fields"): `q`, `k_cache`, `v_cache` (dense
//! `[B, Hkv, S_max, E]` or paged `[num_blocks, block_size, Hkv, E]`), `cache_seqlens`
//! (i32 `[B]`), an optional `block_table` (i32 `[B, max_blocks]`: the cache is paged),
//! optional `k_new` / `v_new` (`[B, Hkv, L_new, E]`), optional `alibi_slopes` (f32 `[Hq]`
//! or `[B, Hq]`); options in the metadata as for any case (`causal`, `scale`,
//! `window_left`, `window_right`, `softcap`). Every other tensor is a stored result
//! (`out`, `out_f64`, `lse`, the expected `k_cache_after` ...).
//!
//! ```
//! use ndarray::{ArrayD, IxDyn};
//! use sdpa_harness::kvcase::{run_kvcache, KvCase};
//! use sdpa_harness::Tensor;
//!
//! let f = |shape: &[usize], x: f32| Tensor::F32(ArrayD::from_elem(IxDyn(shape), x));
//! let case = KvCase {
//!     q: f(&[1, 2, 1, 4], 0.5),
//!     k_cache: f(&[1, 1, 8, 4], 0.0),
//!     v_cache: f(&[1, 1, 8, 4], 1.0),
//!     cache_seqlens: ArrayD::from_elem(IxDyn(&[1]), 3),
//!     block_table: None,
//!     new: Some((f(&[1, 1, 1, 4], 0.0), f(&[1, 1, 1, 4], 3.0))),
//!     alibi_slopes: None,
//!     options: Default::default(),
//!     results: Default::default(),
//!     extra_metadata: Default::default(),
//! };
//! let replayed = KvCase::from_bytes(&case.to_bytes())?;
//! assert_eq!(replayed, case);
//! let r = run_kvcache(&case, &sdpa::Exec::cpu())?;
//! // Four keys (three cached, one appended): values 1, 1, 1, 3 with equal weights.
//! assert!(r.out.to_f64().iter().all(|&x| (x - 1.5).abs() < 1e-6));
//! assert!(r.k_cache.is_some()); // the append changed the cache
//! # Ok::<(), sdpa_harness::HarnessError>(())
//! ```

use crate::case::{
    in_file, options_metadata, parse_options, parts_from_bytes, read_parts, serialize, Parts,
    OPTION_KEYS,
};
use crate::error::{HarnessError, Result};
use crate::tensor::Tensor;
use ndarray::{ArrayD, ArrayView4, Ix1, Ix2, Ix4};
use sdpa_core::SdpaOptions;
use std::collections::BTreeMap;
use std::path::Path;

/// One KV-cache call with its inputs, options and any stored results.
#[derive(Debug, Clone, PartialEq)]
pub struct KvCase {
    /// `[B, Hq, Lq, E]`.
    pub q: Tensor,
    /// Dense `[B, Hkv, S_max, E]` or paged `[num_blocks, block_size, Hkv, E]`.
    pub k_cache: Tensor,
    /// Like `k_cache`, last dim Ev.
    pub v_cache: Tensor,
    /// `[B]`: keys valid before the call.
    pub cache_seqlens: ArrayD<i32>,
    /// `[B, max_blocks]`: present for a paged cache.
    pub block_table: Option<ArrayD<i32>>,
    /// `(k_new, v_new)`, `[B, Hkv, L_new, E / Ev]`.
    pub new: Option<(Tensor, Tensor)>,
    /// f32 `[Hq]` or `[B, Hq]`.
    pub alibi_slopes: Option<ArrayD<f32>>,
    /// Options from the metadata.
    pub options: SdpaOptions,
    /// Every other tensor (`out`, `out_f64`, `lse`, ...), by name.
    pub results: BTreeMap<String, Tensor>,
    /// Metadata keys this crate does not interpret.
    pub extra_metadata: BTreeMap<String, String>,
}

/// The dense shapes `[B, Hkv, capacity, E]` of a cache for the budget: a paged cache's
/// capacity is `max_blocks * block_size` a row.
pub(crate) fn dense_equivalent(
    k: &[usize],
    v: &[usize],
    table: Option<&[usize]>,
) -> (Vec<usize>, Vec<usize>) {
    match (table, k, v) {
        (Some(&[b, blocks]), &[_, bs, hkv, e], &[.., ev]) => {
            let cap = blocks.saturating_mul(bs);
            (vec![b, hkv, cap, e], vec![b, hkv, cap, ev])
        }
        _ => (k.to_vec(), v.to_vec()),
    }
}

fn int_tensor(name: &str, t: Tensor, dims: usize) -> Result<ArrayD<i32>> {
    match t {
        Tensor::I32(a) if a.ndim() == dims => Ok(a),
        other => Err(HarnessError::case(
            format!("tensor {name}"),
            format!("i32 with {dims} dims"),
            format!("{} {:?}", other.dtype_name(), other.shape()),
        )),
    }
}

impl KvCase {
    fn from_parts((mut tensors, meta): Parts) -> Result<KvCase> {
        let options = parse_options(&meta)?;
        let mut take = |name: &str| {
            tensors.remove(name).ok_or_else(|| {
                HarnessError::case("KV-cache case", format!("a tensor named {name}"), "none")
            })
        };
        let q = take("q")?;
        let k_cache = take("k_cache")?;
        let v_cache = take("v_cache")?;
        let cache_seqlens = int_tensor("cache_seqlens", take("cache_seqlens")?, 1)?;
        for (name, t) in [("q", &q), ("k_cache", &k_cache), ("v_cache", &v_cache)] {
            if t.shape().len() != 4 || t.dtype().is_none() {
                return Err(HarnessError::case(
                    format!("tensor {name}"),
                    "a floating-point tensor of 4 dims",
                    format!("{} {:?}", t.dtype_name(), t.shape()),
                ));
            }
        }
        let block_table = tensors
            .remove("block_table")
            .map(|t| int_tensor("block_table", t, 2))
            .transpose()?;
        let new = match (tensors.remove("k_new"), tensors.remove("v_new")) {
            (None, None) => None,
            (Some(k), Some(v)) => Some((k, v)),
            _ => {
                return Err(HarnessError::case(
                    "KV-cache case",
                    "both k_new and v_new, or neither",
                    "one of them",
                ))
            }
        };
        let alibi_slopes = match tensors.remove("alibi_slopes") {
            None => None,
            Some(Tensor::F32(a)) => Some(a),
            Some(other) => {
                return Err(HarnessError::case(
                    "tensor alibi_slopes",
                    "f32",
                    other.dtype_name(),
                ))
            }
        };
        let extra_metadata = meta
            .into_iter()
            .filter(|(k, _)| !OPTION_KEYS.contains(&k.as_str()))
            .collect();
        Ok(KvCase {
            q,
            k_cache,
            v_cache,
            cache_seqlens,
            block_table,
            new,
            alibi_slopes,
            options,
            results: tensors,
            extra_metadata,
        })
    }

    /// Parses a KV-cache case from safetensors bytes, with the checks (and budget) of
    /// [`Case::from_bytes`](crate::case::Case::from_bytes).
    ///
    /// # Errors
    /// Everything `Case::from_bytes` refuses, a missing `q`, `k_cache`, `v_cache` or
    /// `cache_seqlens`, integer tensors that are not i32 of the right rank, `k_new`
    /// without `v_new`, slopes that are not f32.
    pub fn from_bytes(bytes: &[u8]) -> Result<KvCase> {
        KvCase::from_parts(parts_from_bytes(bytes)?)
    }

    /// Reads a KV-cache case file (as [`Case::read`](crate::case::Case::read) reads).
    ///
    /// # Errors
    /// As [`KvCase::from_bytes`], prefixed with the path, and I/O errors.
    pub fn read(path: impl AsRef<Path>) -> Result<KvCase> {
        let path = path.as_ref();
        read_parts(path)
            .and_then(KvCase::from_parts)
            .map_err(|e| in_file(path, e))
    }

    /// Serialises the case as safetensors bytes (deterministic).
    pub fn to_bytes(&self) -> Vec<u8> {
        let seqlens = Tensor::I32(self.cache_seqlens.clone());
        let table = self.block_table.clone().map(Tensor::I32);
        let slopes = self.alibi_slopes.clone().map(Tensor::F32);
        let mut named: Vec<(String, &Tensor)> = vec![
            ("q".into(), &self.q),
            ("k_cache".into(), &self.k_cache),
            ("v_cache".into(), &self.v_cache),
            ("cache_seqlens".into(), &seqlens),
        ];
        if let Some(t) = &table {
            named.push(("block_table".into(), t));
        }
        if let Some((k, v)) = &self.new {
            named.push(("k_new".into(), k));
            named.push(("v_new".into(), v));
        }
        if let Some(a) = &slopes {
            named.push(("alibi_slopes".into(), a));
        }
        named.extend(self.results.iter().map(|(n, t)| (n.clone(), t)));
        let mut meta = options_metadata(&self.options);
        meta.extend(self.extra_metadata.clone());
        serialize(&named, &meta)
    }

    /// A stored result tensor by name.
    pub fn result(&self, name: &str) -> Option<&Tensor> {
        self.results.get(name)
    }
}

/// A case file of either kind, read once: a KV-cache case when it holds `k_cache`.
#[derive(Debug, Clone, PartialEq)]
pub enum CaseFile {
    /// q, k, v (and a mask): [`Case`](crate::case::Case).
    Sdpa(Box<crate::case::Case>),
    /// q over a KV cache: [`KvCase`].
    KvCache(Box<KvCase>),
}

impl CaseFile {
    /// Reads a case file with the checks of [`Case::read`](crate::case::Case::read), then
    /// builds the kind it holds.
    ///
    /// # Errors
    /// What [`Case::read`](crate::case::Case::read) or [`KvCase::read`] refuses.
    pub fn read(path: impl AsRef<Path>) -> Result<CaseFile> {
        let path = path.as_ref();
        read_parts(path)
            .and_then(|parts| {
                if parts.0.contains_key("k_cache") {
                    KvCase::from_parts(parts).map(|c| CaseFile::KvCache(Box::new(c)))
                } else {
                    crate::case::Case::from_parts(parts).map(|c| CaseFile::Sdpa(Box::new(c)))
                }
            })
            .map_err(|e| in_file(path, e))
    }
}

/// What a KV-cache run gives: `out`, `lse` and, after an append, the updated caches.
#[derive(Debug, Clone, PartialEq)]
pub struct KvRunOutput {
    /// `[B, Hq, Lq, Ev]` in the case dtype.
    pub out: Tensor,
    /// `[B, Hq, Lq]`.
    pub lse: ArrayD<f32>,
    /// The key cache after the append (`None` without `k_new`).
    pub k_cache: Option<Tensor>,
    /// The value cache after the append.
    pub v_cache: Option<Tensor>,
    /// Key splits (1 on the CPU).
    pub splits: usize,
}

fn four<'a, T>(name: &str, a: &'a ArrayD<T>) -> Result<ArrayView4<'a, T>> {
    a.view().into_dimensionality::<Ix4>().map_err(|_| {
        HarnessError::case(
            format!("tensor {name}"),
            "4 dims",
            format!("{} dims", a.ndim()),
        )
    })
}

fn same<'a, T: 'static>(
    name: &str,
    t: &'a Tensor,
    pick: for<'b> fn(&'b Tensor) -> Option<&'b ArrayD<T>>,
) -> Result<&'a ArrayD<T>> {
    pick(t).ok_or_else(|| {
        HarnessError::case(format!("tensor {name}"), "the dtype of q", t.dtype_name())
    })
}

macro_rules! typed_kv {
    ($case:expr, $exec:expr, $variant:ident, $ty:ty) => {{
        fn pick(t: &Tensor) -> Option<&ArrayD<$ty>> {
            match t {
                Tensor::$variant(a) => Some(a),
                _ => None,
            }
        }
        let case = $case;
        let q = same("q", &case.q, pick)?;
        let mut k = same("k_cache", &case.k_cache, pick)?.clone();
        let mut v = same("v_cache", &case.v_cache, pick)?.clone();
        let new = match &case.new {
            None => None,
            Some((kn, vn)) => Some((same("k_new", kn, pick)?, same("v_new", vn, pick)?)),
        };
        let seqlens = case
            .cache_seqlens
            .view()
            .into_dimensionality::<Ix1>()
            .expect("checked 1-d");
        let table = case
            .block_table
            .as_ref()
            .map(|t| t.view().into_dimensionality::<Ix2>().expect("checked 2-d"));
        let (k4, v4) = (
            k.view_mut()
                .into_dimensionality::<Ix4>()
                .map_err(|_| HarnessError::case("tensor k_cache", "4 dims", "other"))?,
            v.view_mut()
                .into_dimensionality::<Ix4>()
                .map_err(|_| HarnessError::case("tensor v_cache", "4 dims", "other"))?,
        );
        let cache = match table {
            None => sdpa_ref::kvcache::KvCache::Dense { k: k4, v: v4 },
            Some(block_table) => sdpa_ref::kvcache::KvCache::Paged {
                k: k4,
                v: v4,
                block_table,
            },
        };
        let new = match new {
            None => None,
            Some((kn, vn)) => Some((
                sdpa::Tensor::Host(four("k_new", kn)?),
                sdpa::Tensor::Host(four("v_new", vn)?),
            )),
        };
        let r = sdpa::attention_with_kvcache(
            sdpa::Tensor::Host(four("q", q)?),
            sdpa::KvCache::Host(cache),
            seqlens,
            new,
            case.alibi_slopes.as_ref().map(|a| a.view()),
            &case.options,
            $exec,
        )?;
        let (Some(out), Some(lse)) = (r.out.into_host(), r.lse.into_host()) else {
            unreachable!("host arrays in, host arrays out")
        };
        let appended = case.new.is_some();
        Ok(KvRunOutput {
            out: Tensor::$variant(out.into_dyn()),
            lse: lse.into_dyn(),
            k_cache: appended.then(|| Tensor::$variant(k)),
            v_cache: appended.then(|| Tensor::$variant(v)),
            splits: r.splits,
        })
    }};
}

/// Runs a KV-cache case through the facade on `exec` (the reference on the CPU, the
/// decode kernels on CUDA); the case's own caches are not changed.
///
/// # Errors
/// Tensors of different dtypes, and everything the call refuses.
pub fn run_kvcache(case: &KvCase, exec: &sdpa::Exec<'_>) -> Result<KvRunOutput> {
    match &case.q {
        Tensor::F64(_) => typed_kv!(case, exec, F64, f64),
        Tensor::F32(_) => typed_kv!(case, exec, F32, f32),
        Tensor::F16(_) => typed_kv!(case, exec, F16, half::f16),
        Tensor::BF16(_) => typed_kv!(case, exec, BF16, half::bf16),
        other => Err(HarnessError::case(
            "tensor q",
            "a floating-point dtype",
            other.dtype_name(),
        )),
    }
}

/// The case with q, the caches, the new keys and values widened (exactly) to f64.
pub fn widened(case: &KvCase) -> KvCase {
    let w = |t: &Tensor| Tensor::F64(t.to_f64());
    KvCase {
        q: w(&case.q),
        k_cache: w(&case.k_cache),
        v_cache: w(&case.v_cache),
        new: case.new.as_ref().map(|(k, v)| (w(k), w(v))),
        ..case.clone()
    }
}
