//! The checks of a call over a KV cache (DESIGN.md, "Inference"), on shapes and the
//! host copies of `block_table` and `cache_seqlens`: one function every backend runs
//! before it reads or writes anything, so that a bad table is the same `Err`, naming the
//! batch row, on the CPU and on CUDA.
//!
//! ```
//! use sdpa_core::kvcache::{check, CacheShape, KvCall};
//! use sdpa_core::SdpaOptions;
//!
//! let table = [0, 1, 2, 3];
//! let call = KvCall {
//!     q: [2, 8, 1, 64],
//!     cache: CacheShape::Paged { k: [4, 16, 2, 64], v: [4, 16, 2, 64], table: &table, table_shape: [2, 2] },
//!     cache_seqlens: &[20, 31],
//!     new: Some(([2, 2, 1, 64], [2, 2, 1, 64])),
//!     options: &SdpaOptions::default(),
//! };
//! let plan = check(&call)?;
//! assert_eq!((plan.heads_kv, plan.capacity, plan.lengths.clone()), (2, 32, vec![21, 32]));
//! let late = KvCall { cache_seqlens: &[20, 32], ..call };
//! assert!(check(&late).unwrap_err().to_string().contains("batch row 1: 32 + 1"));
//! # Ok::<(), sdpa_core::SdpaError>(())
//! ```

use crate::{shape_text, Result, SdpaError, SdpaOptions};
use std::collections::HashMap;

/// The cache's shapes (and, when paged, its block table, row-major).
#[derive(Debug, Clone, Copy)]
pub enum CacheShape<'a> {
    /// `k [B, Hkv, S_max, E]`, `v [B, Hkv, S_max, Ev]`.
    Dense {
        /// Key cache shape.
        k: [usize; 4],
        /// Value cache shape.
        v: [usize; 4],
    },
    /// `k [num_blocks, block_size, Hkv, E]`, `v [num_blocks, block_size, Hkv, Ev]`.
    Paged {
        /// Key blocks' shape.
        k: [usize; 4],
        /// Value blocks' shape.
        v: [usize; 4],
        /// `block_table [B, max_blocks]`, row-major.
        table: &'a [i32],
        /// Its shape.
        table_shape: [usize; 2],
    },
}

/// A KV-cache call as the checks see it.
#[derive(Debug, Clone, Copy)]
pub struct KvCall<'a> {
    /// `q [B, Hq, Lq, E]`.
    pub q: [usize; 4],
    /// The cache.
    pub cache: CacheShape<'a>,
    /// Valid keys of each batch row before the call.
    pub cache_seqlens: &'a [i32],
    /// `(k_new, v_new)` shapes, `[B, Hkv, L_new, E]` and `[B, Hkv, L_new, Ev]`.
    pub new: Option<([usize; 4], [usize; 4])>,
    /// Options (causal is bottom-right whatever alignment is asked; no dropout).
    pub options: &'a SdpaOptions,
}

/// What a checked call is.
#[derive(Debug, Clone, PartialEq)]
pub struct KvPlan {
    /// B.
    pub batch: usize,
    /// Hq.
    pub heads_q: usize,
    /// Hkv (divides Hq).
    pub heads_kv: usize,
    /// Lq.
    pub len_q: usize,
    /// E.
    pub head_dim: usize,
    /// Ev.
    pub head_dim_v: usize,
    /// L_new (0 without an append).
    pub len_new: usize,
    /// Keys a batch row can hold: S_max, or max_blocks * block_size.
    pub capacity: usize,
    /// `Some(block_size)` for a paged cache.
    pub block_size: Option<usize>,
    /// Keys each batch row attends to: `cache_seqlens[b] + L_new`.
    pub lengths: Vec<usize>,
    /// The softmax scale (`1 / sqrt(E)` unless the options give one).
    pub scale: f64,
}

impl KvPlan {
    /// The longest row's keys (0 for an empty batch).
    pub fn max_len(&self) -> usize {
        self.lengths.iter().copied().max().unwrap_or(0)
    }
}

/// Checks a call: shapes, dropout (refused), window / softcap / scale, GQA (Hkv divides Hq), every length
/// (`0 <= cache_seqlens[b]`, `cache_seqlens[b] + L_new` within the capacity), every table
/// entry a row reaches (in `0..num_blocks`), and that no cache slot is written by the
/// appends of two batch rows.
///
/// # Errors
/// [`SdpaError::InvalidArgument`] naming `dropout_p`, `k_cache`, `block_table`,
/// `cache_seqlens`, `k_new` or `query`, with the batch row (and table entry) at fault.
pub fn check(call: &KvCall<'_>) -> Result<KvPlan> {
    let [batch, heads_q, len_q, e] = call.q;
    if call.options.dropout.is_active() {
        return Err(SdpaError::invalid(
            "dropout_p",
            "0 for a KV-cache call",
            call.options.dropout.p,
        ));
    }
    let scale = call.options.checked_scale(e)?;
    let (kshape, vshape, paged) = match call.cache {
        CacheShape::Dense { k, v } => (k, v, false),
        CacheShape::Paged { k, v, .. } => (k, v, true),
    };
    let heads_kv = if paged { kshape[2] } else { kshape[1] };
    let head_dim_v = vshape[3];
    let layout_ok = kshape[..3] == vshape[..3]
        && kshape[3] == e
        && if paged {
            kshape[1] > 0
        } else {
            kshape[0] == batch
        };
    if !layout_ok {
        let want = if paged {
            format!(
                "k [num_blocks, block_size >= 1, Hkv, {e}] and v [num_blocks, block_size, Hkv, Ev]"
            )
        } else {
            format!("k [{batch}, Hkv, S_max, {e}] and v [{batch}, Hkv, S_max, Ev]")
        };
        return Err(SdpaError::invalid(
            "k_cache",
            want,
            format!("k {}, v {}", shape_text(&kshape), shape_text(&vshape)),
        ));
    }
    if heads_kv == 0 || heads_q % heads_kv != 0 {
        return Err(SdpaError::invalid(
            "query",
            format!("a number of query heads divisible by the cache's {heads_kv} kv heads"),
            heads_q,
        ));
    }
    let (capacity, block_size, table) = match call.cache {
        CacheShape::Dense { .. } => (kshape[2], None, None),
        CacheShape::Paged {
            table, table_shape, ..
        } => {
            let [rows, cols] = table_shape;
            if rows != batch || Some(table.len()) != rows.checked_mul(cols) {
                return Err(SdpaError::invalid(
                    "block_table",
                    format!("[{batch}, max_blocks]"),
                    format!("{} ({} entries)", shape_text(&table_shape), table.len()),
                ));
            }
            let capacity = cols.checked_mul(kshape[1]).ok_or_else(|| {
                SdpaError::invalid(
                    "block_table",
                    "max_blocks * block_size that fits usize",
                    shape_text(&table_shape),
                )
            })?;
            (capacity, Some(kshape[1]), Some((table, cols)))
        }
    };
    if call.cache_seqlens.len() != batch {
        return Err(SdpaError::invalid(
            "cache_seqlens",
            format!("[{batch}]"),
            format!("[{}]", call.cache_seqlens.len()),
        ));
    }
    let len_new = match call.new {
        None => 0,
        Some((kn, vn)) => {
            let want_k = [batch, heads_kv, kn[2], e];
            let want_v = [batch, heads_kv, kn[2], head_dim_v];
            if kn != want_k || vn != want_v {
                return Err(SdpaError::invalid(
                    "k_new",
                    format!(
                        "k_new {} and v_new {}",
                        shape_text(&want_k),
                        shape_text(&want_v)
                    ),
                    format!("k_new {}, v_new {}", shape_text(&kn), shape_text(&vn)),
                ));
            }
            kn[2]
        }
    };
    let mut lengths = Vec::with_capacity(batch);
    for (b, &len) in call.cache_seqlens.iter().enumerate() {
        let total = usize::try_from(len)
            .map_err(|_| {
                SdpaError::invalid(
                    "cache_seqlens",
                    "lengths >= 0",
                    format!("batch row {b}: {len}"),
                )
            })?
            .checked_add(len_new)
            .filter(|&n| n <= capacity)
            .ok_or_else(|| {
                SdpaError::invalid(
                    "cache_seqlens",
                    format!("cache_seqlens + L_new at most the cache's {capacity} keys"),
                    format!("batch row {b}: {len} + {len_new}"),
                )
            })?;
        if let (Some((table, cols)), Some(bs)) = (table, block_size) {
            for m in 0..total.div_ceil(bs) {
                let index = table[b * cols + m];
                if index < 0 || index as usize >= kshape[0] {
                    return Err(SdpaError::invalid(
                        "block_table",
                        format!("block indices in 0..{}", kshape[0]),
                        format!("batch row {b}, entry {m}: {index}"),
                    ));
                }
            }
        }
        lengths.push(total);
    }
    // Two rows appending into one slot would race on a device and depend on the order
    // on the host: refused (reading a shared block, as prefix caching does, is fine).
    if let (Some((table, cols)), Some(bs)) = (table, block_size) {
        if len_new > 0 {
            let mut writer: HashMap<(i32, usize), usize> = HashMap::new();
            for (b, &len) in call.cache_seqlens.iter().enumerate() {
                for j in len as usize..len as usize + len_new {
                    let slot = (table[b * cols + j / bs], j % bs);
                    if let Some(first) = writer.insert(slot, b) {
                        return Err(SdpaError::invalid(
                            "block_table",
                            "appends of different batch rows into different cache slots",
                            format!(
                                "batch rows {first} and {b} both write block {}, slot {}",
                                slot.0, slot.1
                            ),
                        ));
                    }
                }
            }
        }
    }
    Ok(KvPlan {
        batch,
        heads_q,
        heads_kv,
        len_q,
        head_dim: e,
        head_dim_v,
        len_new,
        capacity,
        block_size,
        lengths,
        scale,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    static OPTIONS: std::sync::LazyLock<SdpaOptions> =
        std::sync::LazyLock::new(SdpaOptions::default);

    fn paged<'a>(table: &'a [i32], seqlens: &'a [i32], new: usize) -> KvCall<'a> {
        KvCall {
            q: [2, 4, 1, 8],
            cache: CacheShape::Paged {
                k: [5, 4, 2, 8],
                v: [5, 4, 2, 8],
                table,
                table_shape: [2, table.len() / 2],
            },
            cache_seqlens: seqlens,
            new: (new > 0).then_some(([2, 2, new, 8], [2, 2, new, 8])),
            options: &OPTIONS,
        }
    }

    #[test]
    fn bad_tables_and_lengths_name_the_row() {
        let ok = check(&paged(&[0, 1, 2, 3], &[3, 7], 1)).unwrap();
        assert_eq!(ok.lengths, vec![4, 8]);
        let e = check(&paged(&[0, 1, 2, 9], &[3, 7], 1)).unwrap_err();
        assert!(e.to_string().contains("batch row 1, entry 1: 9"), "{e}");
        // Entries a row never reaches are not read, so not checked.
        assert!(check(&paged(&[0, -1, 2, 3], &[3, 7], 1)).is_ok());
        let e = check(&paged(&[0, 1, 2, 3], &[-1, 7], 0)).unwrap_err();
        assert!(e.to_string().contains("batch row 0: -1"), "{e}");
        let e = check(&paged(&[0, 1, 2, 3], &[3, 8], 1)).unwrap_err();
        assert!(e.to_string().contains("batch row 1: 8 + 1"), "{e}");
        // Both rows append into block 1, slot 3.
        let e = check(&paged(&[1, 0, 1, 2], &[3, 3], 1)).unwrap_err();
        assert!(
            e.to_string()
                .contains("batch rows 0 and 1 both write block 1, slot 3"),
            "{e}"
        );
        // Sharing a block both rows only read is fine.
        assert!(check(&paged(&[1, 0, 1, 2], &[4, 4], 1)).is_ok());
        let e = check(&paged(&[0, 1, 2], &[3, 7], 0)).unwrap_err();
        assert!(e.to_string().starts_with("block_table"), "{e}");
    }

    #[test]
    fn shapes_gqa_and_dropout_are_checked() {
        let dense = |q: [usize; 4], k: [usize; 4]| KvCall {
            q,
            cache: CacheShape::Dense { k, v: k },
            cache_seqlens: &[1],
            new: None,
            options: &OPTIONS,
        };
        assert!(check(&dense([1, 4, 1, 8], [1, 2, 6, 8])).is_ok());
        let e = check(&dense([1, 3, 1, 8], [1, 2, 6, 8])).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("query: expected a number of query heads divisible"),
            "{e}"
        );
        let e = check(&dense([1, 4, 1, 8], [2, 2, 6, 8])).unwrap_err();
        assert!(e.to_string().starts_with("k_cache"), "{e}");
        let e = check(&dense([1, 4, 1, 8], [1, 2, 6, 7])).unwrap_err();
        assert!(e.to_string().starts_with("k_cache"), "{e}");
        let options = SdpaOptions {
            dropout: crate::Dropout::new(0.1, 1, 0),
            ..SdpaOptions::default()
        };
        let e = check(&KvCall {
            options: &options,
            ..dense([1, 4, 1, 8], [1, 2, 6, 8])
        })
        .unwrap_err();
        assert!(e.to_string().starts_with("dropout_p"), "{e}");
    }
}
