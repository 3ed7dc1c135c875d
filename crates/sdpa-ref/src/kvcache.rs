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
//! let out = attention_with_kvcache(q.view(), cache, lens.view(), None, None, &SdpaOptions::default())?;
//! assert!(out.out.iter().all(|&x| (x - 1.0).abs() < 1e-12));
//! # Ok::<(), sdpa_core::SdpaError>(())
//! ```

use crate::{forward, Element, Output};
use ndarray::{
    s, Array3, Array4, ArrayView1, ArrayView2, ArrayView4, ArrayViewD, ArrayViewMut4, Axis,
};
use sdpa_core::kvcache::{self, CacheShape, KvCall, KvPlan};
use sdpa_core::{Causal, Result, SdpaOptions};

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

/// The call as `sdpa_core::kvcache::check` sees it (the block table copied row-major).
fn check<T>(
    q: &ArrayView4<'_, T>,
    cache: &KvCache<'_, T>,
    cache_seqlens: &ArrayView1<'_, i32>,
    new: Option<&(ArrayView4<'_, T>, ArrayView4<'_, T>)>,
    options: &SdpaOptions,
) -> Result<KvPlan> {
    let dims = |a: &[usize]| [a[0], a[1], a[2], a[3]];
    let lens: Vec<i32> = cache_seqlens.iter().copied().collect();
    let (table, table_shape) = match cache {
        KvCache::Paged { block_table, .. } => (
            block_table.iter().copied().collect::<Vec<i32>>(),
            [block_table.nrows(), block_table.ncols()],
        ),
        KvCache::Dense { .. } => (Vec::new(), [0, 0]),
    };
    let shape = match cache {
        KvCache::Dense { k, v } => CacheShape::Dense {
            k: dims(k.shape()),
            v: dims(v.shape()),
        },
        KvCache::Paged { k, v, .. } => CacheShape::Paged {
            k: dims(k.shape()),
            v: dims(v.shape()),
            table: &table,
            table_shape,
        },
    };
    kvcache::check(&KvCall {
        q: dims(q.shape()),
        cache: shape,
        cache_seqlens: &lens,
        new: new.map(|(kn, vn)| (dims(kn.shape()), dims(vn.shape()))),
        options,
    })
}

/// Attention of `q` over each batch row's cached keys (after the append), as the module
/// docs say, with ALiBi when `alibi_slopes` (`[Hq]` or `[B, Hq]`, f32) are given. GQA is
/// implied (Hkv divides Hq). `lse` is `-inf` for a row with no key, as in
/// [`sdpa`](crate::sdpa).
///
/// # Errors
/// Everything `sdpa_core::kvcache::check` refuses (`k_cache`, `block_table`,
/// `cache_seqlens`, `k_new`, `query`, `dropout_p`, naming the batch row at fault), bad
/// `alibi_slopes`, and whatever the reference refuses for the gathered keys. Nothing is
/// written on an error.
pub fn attention_with_kvcache<T: Element>(
    q: ArrayView4<'_, T>,
    mut cache: KvCache<'_, T>,
    cache_seqlens: ArrayView1<'_, i32>,
    new: Option<(ArrayView4<'_, T>, ArrayView4<'_, T>)>,
    alibi_slopes: Option<ArrayViewD<'_, f32>>,
    options: &SdpaOptions,
) -> Result<Output<T>> {
    let plan = check(&q, &cache, &cache_seqlens, new.as_ref(), options)?;
    let (batch, hkv, e, ev) = (plan.batch, plan.heads_kv, plan.head_dim, plan.head_dim_v);
    let alibi = alibi_slopes
        .map(|a| crate::alibi_slopes(a, batch, plan.heads_q))
        .transpose()?;
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
    let l_new = plan.len_new;
    let options = SdpaOptions {
        causal: if options.causal == Causal::None {
            Causal::None
        } else {
            Causal::BottomRight
        },
        enable_gqa: true,
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
        let slopes = alibi
            .as_ref()
            .map(|a| a.index_axis(Axis(0), b).mapv(|x| x as f32).into_dyn());
        let row = forward(
            q.slice(s![b..b + 1, .., .., ..]),
            k.view(),
            v.view(),
            None,
            slopes.as_ref().map(|a| a.view()),
            &options,
            None,
        )?;
        out.slice_mut(s![b..b + 1, .., .., ..]).assign(&row.out);
        lse.slice_mut(s![b..b + 1, .., ..]).assign(&row.lse);
    }
    Ok(Output { out, lse })
}
