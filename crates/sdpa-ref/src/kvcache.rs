//! Attention over a KV cache, dense or paged (DESIGN.md, "Inference"): the truth the
//! decode kernels are held to.
//!
//! `q [B, Hq, Lq, E]` attends, row by row of the batch, to the first
//! `cache_seqlens[b] + L_new` keys of its cache, after `k_new`/`v_new [B, Hkv, L_new, E]`
//! (if given) are written into the cache at `cache_seqlens[b]` (in place). Caches are
//! dense `[B, Hkv, S_max, E]` or paged `[num_blocks, block_size, Hkv, E]`, where batch
//! row `b`'s key `j` sits in block `block_table[b][j / block_size]` at slot
//! `j % block_size`. Causal (any alignment asked for) is bottom-right: the last query row
//! sees every key. Every argument is checked, and a bad one is an `Err` naming the batch
//! row, before anything is written.
//!
//! ```
//! use ndarray::{Array1, Array4};
//! use sdpa_core::SdpaOptions;
//! use sdpa_ref::kvcache::{attention_with_kvcache, KvCache};
//!
//! let q = Array4::<f64>::from_elem((1, 2, 1, 4), 0.5);
//! let mut k = Array4::<f64>::zeros((1, 2, 8, 4));
//! let mut v = Array4::<f64>::from_elem((1, 2, 8, 4), 1.0);
//! let lens = Array1::from(vec![3i32]);
//! let cache = KvCache::Dense { k: k.view_mut(), v: v.view_mut() };
//! let out = attention_with_kvcache(q.view(), cache, lens.view(), None, &SdpaOptions::default())?;
//! assert!(out.out.iter().all(|&x| (x - 1.0).abs() < 1e-12));
//! # Ok::<(), sdpa_core::SdpaError>(())
//! ```

use crate::{sdpa, Element, Output};
use ndarray::{s, Array3, Array4, ArrayView1, ArrayView2, ArrayView4, ArrayViewMut4};
use sdpa_core::{shape_text, Causal, Result, SdpaError, SdpaOptions};

/// A KV cache the call reads (and appends to).
#[derive(Debug)]
pub enum KvCache<'a, T> {
    /// `k [B, Hkv, S_max, E]`, `v [B, Hkv, S_max, Ev]`.
    Dense {
        /// Keys.
        k: ArrayViewMut4<'a, T>,
        /// Values.
        v: ArrayViewMut4<'a, T>,
    },
    /// `k [num_blocks, block_size, Hkv, E]`, `v [num_blocks, block_size, Hkv, Ev]`,
    /// `block_table [B, max_blocks]`.
    Paged {
        /// Key blocks.
        k: ArrayViewMut4<'a, T>,
        /// Value blocks.
        v: ArrayViewMut4<'a, T>,
        /// Block indices of each batch row's keys, in order.
        block_table: ArrayView2<'a, i32>,
    },
}

impl<'a, T> KvCache<'a, T> {
    /// The key and value arrays.
    fn arrays(&mut self) -> (&mut ArrayViewMut4<'a, T>, &mut ArrayViewMut4<'a, T>) {
        match self {
            KvCache::Dense { k, v } | KvCache::Paged { k, v, .. } => (k, v),
        }
    }

    /// The index of kv head `h`'s row for key `j` of batch row `b` in either array:
    /// dense `[b, h, j]`, paged `[block_table[b][j / block_size], j % block_size, h]`.
    fn at(&self, b: usize, h: usize, j: usize) -> [usize; 3] {
        match self {
            KvCache::Dense { .. } => [b, h, j],
            KvCache::Paged { k, block_table, .. } => {
                let size = k.shape()[1];
                [block_table[[b, j / size]] as usize, j % size, h]
            }
        }
    }
}

/// Checks every argument against `q [B, Hq, Lq, E]`; returns `(Hkv, E, Ev, capacity)`.
fn check<T>(
    q: &ArrayView4<'_, T>,
    cache: &KvCache<'_, T>,
    cache_seqlens: &ArrayView1<'_, i32>,
    new: Option<&(ArrayView4<'_, T>, ArrayView4<'_, T>)>,
    options: &SdpaOptions,
) -> Result<(usize, usize, usize, usize)> {
    let [batch, _, _, e] = [q.shape()[0], q.shape()[1], q.shape()[2], q.shape()[3]];
    if options.dropout.is_active() {
        return Err(SdpaError::invalid(
            "dropout_p",
            "0 for a KV-cache call",
            options.dropout.p,
        ));
    }
    let (kshape, vshape) = match cache {
        KvCache::Dense { k, v } => (k.shape(), v.shape()),
        KvCache::Paged { k, v, .. } => (k.shape(), v.shape()),
    };
    let (hkv, ev) = match cache {
        KvCache::Dense { .. } => (kshape[1], vshape[3]),
        KvCache::Paged { .. } => (kshape[2], vshape[3]),
    };
    let layout_ok = kshape[..3] == vshape[..3]
        && kshape[3] == e
        && match cache {
            KvCache::Dense { .. } => kshape[0] == batch,
            KvCache::Paged { .. } => kshape[1] > 0,
        };
    if !layout_ok {
        let want = match cache {
            KvCache::Dense { .. } => {
                format!("k [{batch}, Hkv, S_max, {e}] and v [{batch}, Hkv, S_max, Ev]")
            }
            KvCache::Paged { .. } => {
                format!("k [num_blocks, block_size >= 1, Hkv, {e}] and v [num_blocks, block_size, Hkv, Ev]")
            }
        };
        return Err(SdpaError::invalid(
            "k_cache",
            want,
            format!("k {}, v {}", shape_text(kshape), shape_text(vshape)),
        ));
    }
    let capacity = match cache {
        KvCache::Dense { .. } => kshape[2],
        KvCache::Paged { block_table, .. } => {
            if block_table.nrows() != batch {
                return Err(SdpaError::invalid(
                    "block_table",
                    format!("[{batch}, max_blocks]"),
                    shape_text(block_table.shape()),
                ));
            }
            block_table.ncols() * kshape[1]
        }
    };
    if cache_seqlens.len() != batch {
        return Err(SdpaError::invalid(
            "cache_seqlens",
            format!("[{batch}]"),
            shape_text(cache_seqlens.shape()),
        ));
    }
    let l_new = match new {
        None => 0,
        Some((kn, vn)) => {
            let want_k = [batch, hkv, kn.shape()[2], e];
            let want_v = [batch, hkv, kn.shape()[2], ev];
            if kn.shape() != want_k || vn.shape() != want_v {
                return Err(SdpaError::invalid(
                    "k_new",
                    format!(
                        "k_new {} and v_new {}",
                        shape_text(&want_k),
                        shape_text(&want_v)
                    ),
                    format!(
                        "k_new {}, v_new {}",
                        shape_text(kn.shape()),
                        shape_text(vn.shape())
                    ),
                ));
            }
            kn.shape()[2]
        }
    };
    for (b, &len) in cache_seqlens.iter().enumerate() {
        let total = usize::try_from(len).ok().and_then(|n| n.checked_add(l_new));
        match total {
            None => {
                return Err(SdpaError::invalid(
                    "cache_seqlens",
                    "lengths >= 0",
                    format!("batch row {b}: {len}"),
                ))
            }
            Some(n) if n > capacity => {
                return Err(SdpaError::invalid(
                    "cache_seqlens",
                    format!("cache_seqlens + L_new at most the cache's {capacity} keys"),
                    format!("batch row {b}: {len} + {l_new}"),
                ))
            }
            Some(n) => {
                if let KvCache::Paged { k, block_table, .. } = cache {
                    let blocks = n.div_ceil(kshape[1]);
                    for m in 0..blocks {
                        let index = block_table[[b, m]];
                        if index < 0 || index as usize >= k.shape()[0] {
                            return Err(SdpaError::invalid(
                                "block_table",
                                format!("block indices in 0..{}", k.shape()[0]),
                                format!("batch row {b}, entry {m}: {index}"),
                            ));
                        }
                    }
                }
            }
        }
    }
    Ok((hkv, e, ev, capacity))
}

/// Attention of `q` over each batch row's cached keys (after the append), as the module
/// docs say. `lse` is `-inf` for a row with no key, as in [`sdpa`].
///
/// # Errors
/// `k_cache`, `block_table`, `cache_seqlens` or `k_new` naming the batch row or shape at
/// fault, `dropout_p` when dropout is asked for, and whatever [`sdpa`] refuses for the
/// gathered keys. Nothing is written on an error.
pub fn attention_with_kvcache<T: Element>(
    q: ArrayView4<'_, T>,
    mut cache: KvCache<'_, T>,
    cache_seqlens: ArrayView1<'_, i32>,
    new: Option<(ArrayView4<'_, T>, ArrayView4<'_, T>)>,
    options: &SdpaOptions,
) -> Result<Output<T>> {
    let (hkv, e, ev, _) = check(&q, &cache, &cache_seqlens, new.as_ref(), options)?;
    let batch = q.shape()[0];
    // The append, in place: key cache_seqlens[b] + t of row b gets k_new[b, :, t].
    if let Some((kn, vn)) = &new {
        for b in 0..batch {
            let start = cache_seqlens[b] as usize;
            for t in 0..kn.shape()[2] {
                for h in 0..hkv {
                    let [x, y, z] = cache.at(b, h, start + t);
                    let (k, v) = cache.arrays();
                    k.slice_mut(s![x, y, z, ..])
                        .assign(&kn.slice(s![b, h, t, ..]));
                    v.slice_mut(s![x, y, z, ..])
                        .assign(&vn.slice(s![b, h, t, ..]));
                }
            }
        }
    }
    let l_new = new.as_ref().map_or(0, |(kn, _)| kn.shape()[2]);
    let options = SdpaOptions {
        causal: if options.causal == Causal::None {
            Causal::None
        } else {
            Causal::BottomRight
        },
        ..*options
    };
    let [_, hq, lq, _] = [q.shape()[0], q.shape()[1], q.shape()[2], q.shape()[3]];
    let mut out = Array4::from_elem((batch, hq, lq, ev), T::from_acc(num_traits::Zero::zero()));
    let mut lse = Array3::from_elem((batch, hq, lq), f32::NEG_INFINITY);
    for b in 0..batch {
        let n = cache_seqlens[b] as usize + l_new;
        let at = |h, j| cache.at(b, h, j);
        let (kc, vc) = match &cache {
            KvCache::Dense { k, v } | KvCache::Paged { k, v, .. } => (k, v),
        };
        let k = Array4::from_shape_fn((1, hkv, n, e), |(_, h, j, c)| {
            let [x, y, z] = at(h, j);
            kc[[x, y, z, c]]
        });
        let v = Array4::from_shape_fn((1, hkv, n, ev), |(_, h, j, c)| {
            let [x, y, z] = at(h, j);
            vc[[x, y, z, c]]
        });
        let row = sdpa(
            q.slice(s![b..b + 1, .., .., ..]),
            k.view(),
            v.view(),
            None,
            &options,
        )?;
        out.slice_mut(s![b..b + 1, .., .., ..]).assign(&row.out);
        lse.slice_mut(s![b..b + 1, .., ..]).assign(&row.lse);
    }
    Ok(Output { out, lse })
}
