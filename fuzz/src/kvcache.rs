//! `kvcache`: arbitrary KV-cache calls (shapes, block tables, lengths, appends) through
//! `sdpa_core::kvcache::check` and the KV-cache reference.
//!
//! Properties:
//! - `check` never panics, and accepts exactly the calls an independent statement of
//!   DESIGN.md's rules accepts (shapes consistent, Hkv divides Hq, lengths >= 0 and
//!   within the capacity after the append, every table entry a row reaches in
//!   `0..num_blocks`, no cache slot appended to by two rows, no dropout);
//! - on `Ok` the reference runs without an `Err`, changes exactly the appended slots (to
//!   `k_new` / `v_new`) and leaves every other element of the caches as it was;
//! - on `Err` the reference returns the same error and writes nothing.

use arbitrary::{Arbitrary, Unstructured};
use ndarray::{Array1, Array2, Array4};
use sdpa_core::kvcache::{check, CacheShape, KvCall};
use sdpa_core::{Causal, Dropout, SdpaOptions};
use sdpa_ref::kvcache::{attention_with_kvcache, KvCache};
use std::collections::HashSet;

#[derive(Debug, Clone, Arbitrary)]
struct Input {
    /// B, Hkv, group, Lq, E, Ev, L_new (each small).
    dims: [u8; 7],
    /// Paged (block size 1 to 4) or dense.
    paged: Option<u8>,
    /// Dense S_max, or paged num_blocks (0 to 7).
    keys: u8,
    /// max_blocks a row (paged).
    table_cols: u8,
    /// Raw table entries (read row-major, padded with 0) and lengths (padded with 0).
    table: Vec<i8>,
    seqlens: Vec<i8>,
    /// Break one shape: 0 none; 1 the batch of k_new; 2 Hq; 3 the table's rows; 4 the
    /// seqlens' count; 5 v_cache's head dim of E.
    breaker: u8,
    dropout: bool,
    causal: bool,
}

/// The rules, stated once more and independently of `check`.
fn allowed(
    [b, hkv, hq, e, l_new]: [usize; 5],
    k: [usize; 4],
    v: [usize; 4],
    table: Option<(&[i32], [usize; 2])>,
    seqlens: &[i32],
    new: Option<([usize; 4], [usize; 4])>,
    dropout: bool,
) -> bool {
    if dropout || seqlens.len() != b || k[..3] != v[..3] || k[3] != e {
        return false;
    }
    let (heads, capacity, bs) = match table {
        None => (k[1], k[2], 0),
        Some((_, [_, cols])) => (k[2], cols * k[1], k[1]),
    };
    if heads == 0 || hq % heads != 0 || heads != hkv {
        return false;
    }
    if let Some((entries, [rows, cols])) = table {
        if rows != b || entries.len() != rows * cols || bs == 0 {
            return false;
        }
    } else if k[0] != b {
        return false;
    }
    if let Some((kn, vn)) = new {
        if kn != [b, heads, l_new, e] || vn != [b, heads, l_new, v[3]] {
            return false;
        }
    }
    let mut written = HashSet::new();
    for (row, &len) in seqlens.iter().enumerate() {
        if len < 0 || len as usize + l_new > capacity {
            return false;
        }
        if let Some((entries, [_, cols])) = table {
            let total = len as usize + l_new;
            for m in 0..total.div_ceil(bs) {
                let x = entries[row * cols + m];
                if x < 0 || x as usize >= k[0] {
                    return false;
                }
            }
            for j in len as usize..total {
                if !written.insert((entries[row * cols + j / bs], j % bs)) {
                    return false;
                }
            }
        }
    }
    true
}

/// One fuzz input; panics on a violated property.
pub fn run(data: &[u8]) {
    let Ok(input) = Input::arbitrary(&mut Unstructured::new(data)) else {
        return;
    };
    let d = input.dims.map(|x| (x % 4) as usize);
    let (b, hkv, group, lq, e, ev, l_new) = (
        d[0],
        d[1].max(1),
        d[2].max(1),
        d[3],
        d[4].max(1),
        d[5].max(1),
        d[6],
    );
    let mut hq = hkv * group;
    let keys = (input.keys % 8) as usize;
    let bs = input.paged.map(|x| 1 + (x % 4) as usize);
    let cols = (input.table_cols % 5) as usize;
    let mut rows = b;
    let mut lens_n = b;
    let mut new_b = b;
    let mut ev_k = e;
    match input.breaker % 6 {
        1 => new_b += 1,
        2 => hq += 1,
        3 => rows += 1,
        4 => lens_n += 1,
        5 => ev_k += 1,
        _ => {}
    }
    let k_shape = match bs {
        None => [b, hkv, keys, ev_k],
        Some(bs) => [keys, bs, hkv, ev_k],
    };
    let v_shape = [k_shape[0], k_shape[1], k_shape[2], ev];
    let q_shape = [b, hq, lq, e];
    let pad = |raw: &[i8], n: usize| -> Vec<i32> {
        (0..n)
            .map(|i| raw.get(i).map_or(0, |&x| x as i32))
            .collect()
    };
    let table = pad(&input.table, rows * cols);
    let seqlens = pad(&input.seqlens, lens_n);
    let new_shapes = (l_new > 0).then_some(([new_b, hkv, l_new, e], [new_b, hkv, l_new, ev]));
    let options = SdpaOptions {
        dropout: if input.dropout {
            Dropout::new(0.5, 1, 0)
        } else {
            Dropout::NONE
        },
        causal: if input.causal {
            Causal::TopLeft
        } else {
            Causal::None
        },
        ..Default::default()
    };
    let cache = match bs {
        None => CacheShape::Dense {
            k: k_shape,
            v: v_shape,
        },
        Some(_) => CacheShape::Paged {
            k: k_shape,
            v: v_shape,
            table: &table,
            table_shape: [rows, cols],
        },
    };
    let call = KvCall {
        q: q_shape,
        cache,
        cache_seqlens: &seqlens,
        new: new_shapes,
        options: &options,
    };
    let verdict = check(&call);
    let want = allowed(
        [b, hkv, hq, e, l_new],
        k_shape,
        v_shape,
        bs.map(|_| (&table[..], [rows, cols])),
        &seqlens,
        new_shapes,
        input.dropout,
    );
    assert_eq!(
        verdict.is_ok(),
        want,
        "check says {verdict:?}, the rules say {want} for {call:?}"
    );

    // The reference on the same call, f64 data.
    let mut fill = 0.0f64;
    let mut next = || {
        fill += 1.0;
        fill
    };
    let q = Array4::from_shape_simple_fn(q_shape, &mut next);
    let mut kc = Array4::from_shape_simple_fn(k_shape, &mut next);
    let mut vc = Array4::from_shape_simple_fn(v_shape, &mut next);
    let (k0, v0) = (kc.clone(), vc.clone());
    let news =
        new_shapes.map(|(kn, vn)| (Array4::from_elem(kn, -1.0), Array4::from_elem(vn, -2.0)));
    let lens = Array1::from(seqlens.clone());
    let table2 = Array2::from_shape_vec((rows, cols), table.clone()).expect("rows * cols entries");
    let cache = match bs {
        None => KvCache::Dense {
            k: kc.view_mut(),
            v: vc.view_mut(),
        },
        Some(_) => KvCache::Paged {
            k: kc.view_mut(),
            v: vc.view_mut(),
            block_table: table2.view(),
        },
    };
    let r = attention_with_kvcache(
        q.view(),
        cache,
        lens.view(),
        news.as_ref().map(|(kn, vn)| (kn.view(), vn.view())),
        None,
        &options,
    );
    match (&verdict, &r) {
        (Err(a), Err(b)) => {
            assert_eq!(a, b, "the reference refuses differently");
            assert!(kc == k0 && vc == v0, "a refused call wrote the cache");
        }
        (Ok(plan), Ok(out)) => {
            assert_eq!(out.out.shape(), &[b, hq, lq, ev]);
            // Exactly the appended slots changed, to -1 (keys) and -2 (values).
            let mut appended = HashSet::new();
            for (row, &len) in seqlens.iter().enumerate() {
                for j in len as usize..plan.lengths[row] {
                    for h in 0..hkv {
                        appended.insert(match bs {
                            None => [row, h, j],
                            Some(bs) => [table[row * cols + j / bs] as usize, j % bs, h],
                        });
                    }
                }
            }
            for ((idx, &now), &was) in kc.indexed_iter().zip(k0.iter()) {
                let at = [idx.0, idx.1, idx.2];
                let want = if appended.contains(&at) { -1.0 } else { was };
                assert_eq!(now, want, "k_cache{idx:?}");
            }
            for ((idx, &now), &was) in vc.indexed_iter().zip(v0.iter()) {
                let at = [idx.0, idx.1, idx.2];
                let want = if appended.contains(&at) { -2.0 } else { was };
                assert_eq!(now, want, "v_cache{idx:?}");
            }
        }
        (v, r) => panic!(
            "check says {v:?} but the reference gives {:?}",
            r.as_ref().map(|_| ())
        ),
    }
}
