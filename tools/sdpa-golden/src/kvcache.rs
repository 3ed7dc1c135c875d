//! `golden/kvcache/`: KV-cache cases (issue 17, item 6; DESIGN.md "Case-file fields").
//!
//! libtorch has no KV-cache or paged API, so each case is taken apart the way the spec
//! defines it: `k_new` / `v_new` are written into the cache at `cache_seqlens` (plain
//! tensor copies; the result is `k_cache_after` / `v_cache_after`), then each batch
//! row's `cache_seqlens[b] + L_new` keys are gathered from its pages (or its dense rows)
//! into a dense K/V, and attention runs over them with the causal alignment
//! (bottom-right), the window and ALiBi as one explicit float mask (0 or the ALiBi bias
//! where a key takes part, -inf elsewhere):
//! - without a softcap, libtorch's `scaled_dot_product_attention` in the case dtype
//!   (`out`, the peer of the 2x rule) and its math path on the inputs upcast to f64
//!   (`out_f64`, truth);
//! - with one (a function of the scores, no mask can say it), the same steps composed
//!   of libtorch ops: `q k^T * scale`, `c tanh(. / c)`, plus the mask, softmax, times V,
//!   in the case dtype (`out`) and in f64 (`out_f64`).
//! `lse_f64` is the f64 log-sum-exp of the masked scores. Every row keeps its diagonal key
//! (no fully masked row: libtorch's SDPA and the spec differ there).

use crate::cases::DType;
use crate::inputs::{case_rng, normal, tensor_f64};
use crate::torch::kind;
use crate::write;
use crate::Result;
use std::path::Path;
use tch::{Kind, Tensor};

/// ALiBi slopes of a case.
#[derive(Clone, Copy, PartialEq)]
pub enum Alibi {
    None,
    /// `[Hq]`: `2^(-8 (h + 1) / Hq)`.
    Heads,
    /// `[B, Hq]`: the same times `1 + b / 4`.
    Batch,
}

/// One KV-cache case.
pub struct KvGolden {
    pub name: String,
    pub dtype: DType,
    pub b: usize,
    pub hkv: usize,
    pub group: usize,
    pub lq: usize,
    pub e: usize,
    pub ev: usize,
    /// `None`: a dense cache of `capacity` keys a row; `Some(bs)`: pages of `bs` keys,
    /// `capacity / bs` table entries a row.
    pub block_size: Option<usize>,
    pub capacity: usize,
    pub seqlens: Vec<i32>,
    pub l_new: usize,
    pub causal: bool,
    pub window: (i64, i64),
    pub softcap: Option<f64>,
    pub alibi: Alibi,
}

impl KvGolden {
    fn hq(&self) -> usize {
        self.hkv * self.group
    }
    fn scale(&self) -> f64 {
        1.0 / (self.e as f64).sqrt()
    }
}

/// The cases: dense and paged (16, 32, 64), decode (Lq = 1) and chunks with an append,
/// GQA / MQA / MHA, E != Ev, window, softcap, ALiBi of both shapes, every dtype, lengths
/// 1 and 0 (with an append).
pub fn all() -> Vec<KvGolden> {
    let base = |name: &str, dtype| KvGolden {
        name: name.to_string(),
        dtype,
        b: 2,
        hkv: 2,
        group: 2,
        lq: 1,
        e: 64,
        ev: 64,
        block_size: None,
        capacity: 96,
        seqlens: vec![37, 96],
        l_new: 0,
        causal: true,
        window: (-1, -1),
        softcap: None,
        alibi: Alibi::None,
    };
    vec![
        KvGolden {
            b: 3,
            group: 4,
            seqlens: vec![17, 96, 50],
            ..base("kv_decode_dense_gqa4_f16", DType::F16)
        },
        KvGolden {
            block_size: Some(16),
            capacity: 64,
            seqlens: vec![30, 5],
            l_new: 1,
            ..base("kv_decode_paged16_append_bf16", DType::Bf16)
        },
        KvGolden {
            block_size: Some(32),
            capacity: 96,
            lq: 7,
            l_new: 7,
            seqlens: vec![40, 0],
            ..base("kv_chunk7_paged32_append_f32", DType::F32)
        },
        KvGolden {
            lq: 4,
            l_new: 4,
            seqlens: vec![60, 33],
            window: (20, 0),
            ..base("kv_chunk4_dense_window20_append_f16", DType::F16)
        },
        KvGolden {
            block_size: Some(16),
            capacity: 80,
            lq: 3,
            seqlens: vec![70, 9],
            softcap: Some(2.0),
            alibi: Alibi::Heads,
            ..base("kv_chunk3_paged16_softcap_alibi_bf16", DType::Bf16)
        },
        KvGolden {
            lq: 5,
            causal: false,
            seqlens: vec![44, 91],
            window: (8, 2),
            alibi: Alibi::Batch,
            ..base("kv_chunk5_dense_window8_2_alibi_batch_f32", DType::F32)
        },
        KvGolden {
            block_size: Some(16),
            capacity: 48,
            lq: 2,
            l_new: 2,
            seqlens: vec![21, 3],
            window: (5, -1),
            softcap: Some(5.0),
            alibi: Alibi::Heads,
            ..base("kv_chunk2_paged16_window5_softcap_alibi_append_f64", DType::F64)
        },
        KvGolden {
            hkv: 4,
            group: 1,
            e: 48,
            ev: 32,
            lq: 6,
            seqlens: vec![64, 12],
            softcap: Some(1.0),
            ..base("kv_chunk6_dense_mha_e48_ev32_softcap_f16", DType::F16)
        },
        KvGolden {
            hkv: 1,
            group: 8,
            e: 128,
            ev: 128,
            block_size: Some(64),
            capacity: 192,
            seqlens: vec![150, 64],
            ..base("kv_decode_paged64_mqa8_e128_f16", DType::F16)
        },
        KvGolden {
            block_size: Some(16),
            capacity: 32,
            seqlens: vec![0, 1],
            l_new: 1,
            alibi: Alibi::Batch,
            ..base("kv_decode_paged16_lengths_0_1_append_alibi_bf16", DType::Bf16)
        },
    ]
}

fn draw(rng: &mut sdpa_core::rng::SplitMix64, shape: &[usize], dtype: DType) -> Tensor {
    let values: Vec<f64> = (0..shape.iter().product::<usize>())
        .map(|_| normal(rng))
        .collect();
    tensor_f64(&values, shape).to_kind(kind(dtype))
}

fn int_tensor(values: &[i32], shape: &[usize]) -> Tensor {
    let dims: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
    Tensor::from_slice(values).reshape(&dims)
}

/// The case's slopes, row-major, and their shape; empty without ALiBi.
fn slopes(c: &KvGolden) -> (Vec<f32>, Vec<usize>) {
    let hq = c.hq();
    let heads = sdpa_core::geometric_alibi_slopes(hq);
    match c.alibi {
        Alibi::None => (Vec::new(), Vec::new()),
        Alibi::Heads => (heads, vec![hq]),
        Alibi::Batch => (
            (0..c.b)
                .flat_map(|b| heads.iter().map(move |h| h * (1.0 + b as f32 / 4.0)))
                .collect(),
            vec![c.b, hq],
        ),
    }
}

/// Row i of `lq` over `n` keys sees key j (bottom-right causal, the window).
fn sees(c: &KvGolden, i: usize, j: usize, n: usize) -> bool {
    let diag = i as i64 + n as i64 - c.lq as i64;
    let j = j as i64;
    !(c.causal && j > diag)
        && !(c.window.0 >= 0 && j < diag - c.window.0)
        && !(c.window.1 >= 0 && j > diag + c.window.1)
}

/// Writes every case into `dir`.
pub fn generate(cases: &[KvGolden], dir: &Path, libtorch: &str) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let mut total = 0;
    for c in cases {
        crate::tick(&c.name);
        total += one(c, dir, libtorch)?;
    }
    eprintln!(
        "sdpa-golden: {} KV-cache cases, {:.2} MB, into {}",
        cases.len(),
        total as f64 / 1e6,
        dir.display()
    );
    Ok(())
}

fn one(c: &KvGolden, dir: &Path, libtorch: &str) -> Result<usize> {
    let fail = |what: &str, e: tch::TchError| format!("kvcache/{}: {what}: {e}", c.name);
    let (hq, hkv) = (c.hq(), c.hkv);
    if c.seqlens.len() != c.b {
        return Err(format!("kvcache/{}: {} seqlens for B = {}", c.name, c.seqlens.len(), c.b));
    }
    let mut rng = case_rng(&c.name, 0);
    let q = draw(&mut rng, &[c.b, hq, c.lq, c.e], c.dtype);
    // The cache: dense rows, or pages in a shuffled order (two spare pages no row uses).
    let (k_cache, v_cache, table, per_row) = match c.block_size {
        None => (
            draw(&mut rng, &[c.b, hkv, c.capacity, c.e], c.dtype),
            draw(&mut rng, &[c.b, hkv, c.capacity, c.ev], c.dtype),
            None,
            0,
        ),
        Some(bs) => {
            let per_row = c.capacity / bs;
            let pages = c.b * per_row + 2;
            let mut order: Vec<i32> = (0..pages as i32).collect();
            for i in (1..pages).rev() {
                let j = (rng.next_u64() % (i as u64 + 1)) as usize;
                order.swap(i, j);
            }
            (
                draw(&mut rng, &[pages, bs, hkv, c.e], c.dtype),
                draw(&mut rng, &[pages, bs, hkv, c.ev], c.dtype),
                Some(order[..c.b * per_row].to_vec()),
                per_row,
            )
        }
    };
    let new = (c.l_new > 0).then(|| {
        (
            draw(&mut rng, &[c.b, hkv, c.l_new, c.e], c.dtype),
            draw(&mut rng, &[c.b, hkv, c.l_new, c.ev], c.dtype),
        )
    });
    // Where key j of row b lives: (page, slot) of a paged cache, (b, j) of a dense one.
    let at = |b: usize, j: usize| -> (i64, i64) {
        match (c.block_size, &table) {
            (Some(bs), Some(t)) => (t[b * per_row + j / bs] as i64, (j % bs) as i64),
            _ => (b as i64, j as i64),
        }
    };
    // The append: plain copies into the caches.
    let k_after = k_cache.copy();
    let v_after = v_cache.copy();
    if let Some((kn, vn)) = &new {
        for b in 0..c.b {
            for t in 0..c.l_new {
                let (page, slot) = at(b, c.seqlens[b] as usize + t);
                for (cache, src) in [(&k_after, kn), (&v_after, vn)] {
                    let row = src.get(b as i64).select(1, t as i64); // [Hkv, dim]
                    let mut dst = match c.block_size {
                        Some(_) => cache.get(page).get(slot),       // [Hkv, dim]
                        None => cache.get(page).select(1, slot), // [Hkv, dim]
                    };
                    dst.copy_(&row);
                }
            }
        }
    }
    let (slope_values, slope_shape) = slopes(c);
    let slope = |b: usize, h: usize| -> f64 {
        match c.alibi {
            Alibi::None => 0.0,
            Alibi::Heads => slope_values[h] as f64,
            Alibi::Batch => slope_values[b * hq + h] as f64,
        }
    };
    let scale = c.scale();
    let mut outs = Vec::new();
    let mut outs64 = Vec::new();
    let mut lses = Vec::new();
    for b in 0..c.b {
        let n = c.seqlens[b] as usize + c.l_new;
        // This row's keys, gathered: [Hkv, n, dim], then the GQA heads expanded.
        let gather = |cache: &Tensor| -> Tensor {
            let rows: Vec<Tensor> = (0..n)
                .map(|j| {
                    let (page, slot) = at(b, j);
                    match c.block_size {
                        Some(_) => cache.get(page).get(slot),
                        None => cache.get(page).select(1, slot),
                    }
                })
                .collect();
            Tensor::stack(&rows, 1).repeat_interleave_self_int(c.group as i64, 0, None)
        };
        let (kb, vb) = (gather(&k_after), gather(&v_after));
        let qb = q.get(b as i64);
        // The mask [Hq, Lq, n]: the ALiBi bias where a key takes part, -inf elsewhere.
        let mut mask = Vec::with_capacity(hq * c.lq * n);
        for h in 0..hq {
            for i in 0..c.lq {
                let diag = i as i64 + n as i64 - c.lq as i64;
                for j in 0..n {
                    mask.push(if sees(c, i, j, n) {
                        -slope(b, h) * (diag - j as i64).abs() as f64
                    } else {
                        f64::NEG_INFINITY
                    });
                }
            }
        }
        let mask64 = tensor_f64(&mask, &[hq, c.lq, n]);
        let mask_t = mask64.to_kind(kind(c.dtype));
        let (q64, k64, v64) = (
            qb.to_kind(Kind::Double),
            kb.to_kind(Kind::Double),
            vb.to_kind(Kind::Double),
        );
        let composed = |q: &Tensor, k: &Tensor, v: &Tensor, m: &Tensor, cap: f64| -> Tensor {
            let s = q.matmul(&k.transpose(-2, -1)) * scale;
            let s = (s / cap).tanh() * cap + m;
            s.softmax(-1, q.kind()).matmul(v)
        };
        let (out, out64) = match c.softcap {
            None => {
                let out = Tensor::f_scaled_dot_product_attention(
                    &qb, &kb, &vb, Some(&mask_t), 0.0, false, Some(scale), false,
                )
                .map_err(|e| fail("scaled_dot_product_attention", e))?;
                let out64 = Tensor::f_internal_scaled_dot_product_attention_math(
                    &q64,
                    &k64,
                    &v64,
                    Some(&mask64),
                    0.0,
                    false,
                    None::<&Tensor>,
                    Some(scale),
                    false,
                )
                .map_err(|e| fail("math f64", e))?
                .0;
                (out, out64)
            }
            Some(cap) => (
                composed(&qb, &kb, &vb, &mask_t, cap),
                composed(&q64, &k64, &v64, &mask64, cap),
            ),
        };
        let mut s64 = q64.matmul(&k64.transpose(-2, -1)) * scale;
        if let Some(cap) = c.softcap {
            s64 = (s64 / cap).tanh() * cap;
        }
        lses.push((s64 + &mask64).logsumexp([-1], false));
        outs.push(out);
        outs64.push(out64);
    }
    let out = Tensor::stack(&outs, 0);
    let out_f64 = Tensor::stack(&outs64, 0);
    let lse_f64 = Tensor::stack(&lses, 0);
    if out_f64.isnan().any().int64_value(&[]) != 0 {
        return Err(format!("kvcache/{}: the f64 truth holds NaN (a fully masked row?)", c.name));
    }

    let seqlens = int_tensor(&c.seqlens, &[c.b]);
    let table_t = table.as_ref().map(|t| int_tensor(t, &[c.b, per_row]));
    let slopes_t = (!slope_values.is_empty()).then(|| {
        let dims: Vec<i64> = slope_shape.iter().map(|&d| d as i64).collect();
        Tensor::from_slice(&slope_values).reshape(&dims)
    });
    let mut tensors: Vec<(&str, &Tensor)> = vec![
        ("q", &q),
        ("k_cache", &k_cache),
        ("v_cache", &v_cache),
        ("cache_seqlens", &seqlens),
        ("out", &out),
        ("out_f64", &out_f64),
        ("lse_f64", &lse_f64),
    ];
    if let Some(t) = &table_t {
        tensors.push(("block_table", t));
    }
    if let Some((kn, vn)) = &new {
        tensors.push(("k_new", kn));
        tensors.push(("v_new", vn));
        tensors.push(("k_cache_after", &k_after));
        tensors.push(("v_cache_after", &v_after));
    }
    if let Some(s) = &slopes_t {
        tensors.push(("alibi_slopes", s));
    }
    let mut meta = vec![
        ("name".to_owned(), c.name.clone()),
        (
            "causal".to_owned(),
            if c.causal { "bottom_right" } else { "none" }.to_owned(),
        ),
        ("libtorch".to_owned(), libtorch.to_owned()),
        (
            "torch_backend".to_owned(),
            if c.softcap.is_some() {
                "composed_ops"
            } else {
                "sdpa_explicit_mask"
            }
            .to_owned(),
        ),
    ];
    if c.window != (-1, -1) {
        meta.push(("window_left".to_owned(), c.window.0.to_string()));
        meta.push(("window_right".to_owned(), c.window.1.to_string()));
    }
    if let Some(cap) = c.softcap {
        meta.push(("softcap".to_owned(), format!("{cap:?}")));
    }
    write::case_file(&dir.join(format!("{}.safetensors", c.name)), &tensors, &meta)
}
