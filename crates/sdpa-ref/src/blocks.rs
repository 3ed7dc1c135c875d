//! Attention over a block of a larger call, in the accumulation type, and the merge of
//! blocks by their row statistics: the truth for split-KV decoding and ring attention.
//!
//! A block is the call's queries `query_offset ..` against keys `key_offset ..` of a
//! problem of `len_q` queries and `len_kv` keys (its [`Frame`]). Causal masking, the
//! window, ALiBi distances and the dropout index of each element are those of the larger
//! problem, so blocks computed apart and merged equal the whole call: the forward by
//! [`merge`], the backward by summing each block's gradients (given the whole call's row
//! statistics and `D = rowsum(dout * out)`).
//!
//! Results stay in the accumulation type (f64 for f64 inputs, f32 otherwise) and in the
//! online-softmax form FlashAttention accumulates in: each row's maximum score, its
//! `sum exp(s - max)` and the output unnormalised. Merging rescales by
//! `exp(max_p - max)`, a difference of two scores, and divides once at the end: no
//! rounding of a large lse (an f32 `max + ln(sum)` of scores near 1e7 is off by whole
//! units), and no more roundings of the output than the one-device call's.
//!
//! ```
//! use ndarray::{s, Array4};
//! use sdpa_core::{Causal, SdpaOptions};
//! use sdpa_ref::blocks::{merge, partial, Frame};
//!
//! let x = Array4::<f64>::from_shape_fn((1, 1, 6, 4), |(_, _, i, e)| ((i * 5 + e) % 7) as f64 * 0.2);
//! let options = SdpaOptions { causal: Causal::TopLeft, ..Default::default() };
//! let whole = sdpa_ref::sdpa(x.view(), x.view(), x.view(), None, &options)?;
//! // Queries 3..6 against keys 0..3, then against keys 3..6, merged.
//! let q = x.slice(s![.., .., 3..6, ..]);
//! let parts = [0, 3].map(|k0| {
//!     let kv = x.slice(s![.., .., k0..k0 + 3, ..]);
//!     let frame = Frame { query_offset: 3, key_offset: k0, len_q: 6, len_kv: 6 };
//!     partial(q, kv, kv, None, &options, frame)
//! });
//! let [a, b] = parts;
//! let (out, _lse) = merge(&[&a?, &b?])?.finish();
//! let err = (&out - &whole.out.slice(s![.., .., 3..6, ..])).mapv(f64::abs);
//! assert!(err.iter().all(|&e| e < 1e-14));
//! # Ok::<(), sdpa_core::SdpaError>(())
//! ```

use crate::bwd::{head_grads, nan_to_zero, HeadInputs};
use crate::{alibi_plan, problem, Accum, Broadcast, Context, DropoutSpace, Element};
use ndarray::{s, Array1, Array2, Array3, Array4, ArrayView3, ArrayView4, ArrayViewD, Zip};
use num_traits::{Float, Zero};
use rayon::prelude::*;
use sdpa_core::{shape_text, Causal, Problem, Result, SdpaError, SdpaOptions, Window};

/// The keys `lo..limit` row `row` of an `L x S` problem reads under `causal` and
/// `window` (empty when `lo == limit`): the one statement of the range for the
/// reference's rows and for [`Frame::is_masked_out`].
pub(crate) fn visible_keys(
    causal: Causal,
    window: Window,
    row: usize,
    len_q: usize,
    len_kv: usize,
) -> (usize, usize) {
    let (lo, hi) = window.key_range(row, len_q, len_kv);
    let limit = causal.key_limit(row, len_q, len_kv).min(hi);
    (lo.min(limit), limit)
}

/// Where a call's queries and keys sit in a larger problem of `len_q` queries and
/// `len_kv` keys: query `i` of the call is row `query_offset + i` there, key `j` is key
/// `key_offset + j`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame {
    /// Row of the larger problem that is the call's first query.
    pub query_offset: usize,
    /// Key of the larger problem that is the call's first key.
    pub key_offset: usize,
    /// `L` of the larger problem.
    pub len_q: usize,
    /// `S` of the larger problem.
    pub len_kv: usize,
}

impl Frame {
    /// The frame of a call that is the whole problem.
    pub fn whole(len_q: usize, len_kv: usize) -> Self {
        Frame {
            query_offset: 0,
            key_offset: 0,
            len_q,
            len_kv,
        }
    }

    /// Checks that the frame holds the call's queries and keys.
    fn check(&self, p: &Problem) -> Result<()> {
        let fits = |offset: usize, len: usize, total: usize| {
            offset.checked_add(len).is_some_and(|end| end <= total)
        };
        if !fits(self.query_offset, p.len_q, self.len_q)
            || !fits(self.key_offset, p.len_kv, self.len_kv)
        {
            return Err(SdpaError::invalid(
                "frame",
                format!(
                    "query_offset + {} <= len_q and key_offset + {} <= len_kv (the call's \
                     queries and keys inside the larger problem)",
                    p.len_q, p.len_kv
                ),
                format!(
                    "query_offset {}, key_offset {}, len_q {}, len_kv {}",
                    self.query_offset, self.key_offset, self.len_q, self.len_kv
                ),
            ));
        }
        Ok(())
    }

    /// Whether no query of a call of `len_q` queries and `len_kv` keys at this frame
    /// reads any of its keys under `options`' causal masking and window (a block a ring
    /// or a split may skip): exact, row by row. `false` for a call the frame does not
    /// hold (nothing is skipped that the call itself would refuse).
    pub fn is_masked_out(&self, len_q: usize, len_kv: usize, options: &SdpaOptions) -> bool {
        let fits = |offset: usize, len: usize, total: usize| {
            offset.checked_add(len).is_some_and(|end| end <= total)
        };
        if !fits(self.query_offset, len_q, self.len_q)
            || !fits(self.key_offset, len_kv, self.len_kv)
        {
            return false;
        }
        let keys = self.key_offset..self.key_offset + len_kv;
        keys.is_empty()
            || !(self.query_offset..self.query_offset + len_q).any(|row| {
                let (lo, limit) =
                    visible_keys(options.causal, options.window, row, self.len_q, self.len_kv);
                lo < limit && lo < keys.end && keys.start < limit
            })
    }
}

/// The result of a block in online-softmax form, in the accumulation type: per row the
/// maximum score `max` over the block's keys, `sum = sum_j exp(s_j - max)` and
/// `out = sum_j exp(s_j - max) * z_j / (1 - p) * v_j` (unnormalised; `z` the dropout
/// keep bits). A row that reads no key has `max = -inf`, `sum = 0`, `out = 0`; a row
/// with a NaN score has NaN `max` and `sum`.
#[derive(Debug, Clone, PartialEq)]
pub struct Partial<A> {
    out: Array4<A>,
    max: Array3<A>,
    sum: Array3<A>,
}

fn check_rows(arg: &'static str, out: &[usize], rows: &[usize]) -> Result<()> {
    if out[..3] != *rows {
        return Err(SdpaError::invalid(
            arg,
            format!("shape {} (out's first three dims)", shape_text(&out[..3])),
            shape_text(rows),
        ));
    }
    Ok(())
}

impl<A: Accum> Partial<A> {
    /// A partial result from its parts (`out [B, Hq, L, Ev]` unnormalised, `max` and
    /// `sum` `[B, Hq, L]`).
    ///
    /// # Errors
    /// `max` or `sum` of another shape than `out`'s first three dims.
    pub fn new(out: Array4<A>, max: Array3<A>, sum: Array3<A>) -> Result<Self> {
        check_rows("max", out.shape(), max.shape())?;
        check_rows("sum", out.shape(), sum.shape())?;
        Ok(Partial { out, max, sum })
    }

    /// The unnormalised output, `[B, Hq, L, Ev]`.
    pub fn out(&self) -> &Array4<A> {
        &self.out
    }

    /// Each row's maximum score, `[B, Hq, L]`.
    pub fn max(&self) -> &Array3<A> {
        &self.max
    }

    /// Each row's `sum exp(s - max)`, `[B, Hq, L]`.
    pub fn sum(&self) -> &Array3<A> {
        &self.sum
    }

    /// The parts: `(out, max, sum)`.
    pub fn into_parts(self) -> (Array4<A>, Array3<A>, Array3<A>) {
        (self.out, self.max, self.sum)
    }

    /// The partial result of a normalised output and its log-sum-exp (e.g. a one-device
    /// call's): `max = lse`, `sum = 1` (0 where `lse = -inf`, NaN where it is NaN).
    ///
    /// # Errors
    /// `lse` of another shape than `out`'s first three dims.
    pub fn from_normalised(out: Array4<A>, lse: Array3<A>) -> Result<Self> {
        check_rows("lse", out.shape(), lse.shape())?;
        let sum = lse.mapv(|l| {
            if l.is_nan() {
                l
            } else if l == A::neg_infinity() {
                A::zero()
            } else {
                A::one()
            }
        });
        Ok(Partial { out, max: lse, sum })
    }

    /// The normalised output `out / sum` (0 for a row with no key, NaN for a NaN row)
    /// and each row's log-sum-exp `max + ln(sum)` (`-inf`, NaN).
    pub fn finish(&self) -> (Array4<A>, Array3<A>) {
        let mut out = self.out.clone();
        for ((b, h, i), &sum) in self.sum.indexed_iter() {
            let mut row = out.slice_mut(s![b, h, i, ..]);
            if sum.is_nan() {
                row.fill(A::nan());
            } else if sum > A::zero() {
                row.mapv_inplace(|x| x / sum);
            }
        }
        let lse = Zip::from(&self.max).and(&self.sum).map_collect(|&m, &s| {
            if s == A::zero() {
                A::neg_infinity()
            } else {
                m + s.ln()
            }
        });
        (out, lse)
    }
}

fn context<'a, T: Element>(
    problem: &'a Problem,
    q: ArrayView4<'a, T>,
    k: ArrayView4<'a, T>,
    v: ArrayView4<'a, T>,
    alibi: Option<ArrayViewD<'_, f32>>,
    frame: Frame,
) -> Result<Context<'a, T>> {
    frame.check(problem)?;
    let alibi = alibi_plan(alibi, problem)?;
    // The frame's problem is the dropout index space.
    let space = DropoutSpace::resolve(
        Some(DropoutSpace {
            batch_offset: 0,
            heads_q: problem.heads_q,
            len_q: frame.len_q,
            len_kv: frame.len_kv,
        }),
        problem,
    )?;
    Ok(Context::new(problem, q, k, v, Broadcast::None, space)
        .with_alibi(alibi)
        .in_frame(frame))
}

/// Attention of `q` over the keys `k`, `v` of a block at `frame` of a larger call with
/// `options` (and ALiBi `alibi_slopes`, `[Hq]` or `[B, Hq]`), as [`sdpa`](crate::sdpa)
/// computes it but with causal, window, ALiBi and dropout taken at the frame's
/// positions, and the result in online-softmax form in the accumulation type. Blocks
/// take no `attn_mask`.
///
/// # Errors
/// What [`sdpa`](crate::sdpa) rejects, and a `frame` that does not hold the call.
pub fn partial<T: Element>(
    q: ArrayView4<'_, T>,
    k: ArrayView4<'_, T>,
    v: ArrayView4<'_, T>,
    alibi_slopes: Option<ArrayViewD<'_, f32>>,
    options: &SdpaOptions,
    frame: Frame,
) -> Result<Partial<T::Acc>> {
    let problem = problem(&q, &k, &v, None, options)?;
    let ctx = context(&problem, q.view(), k.view(), v.view(), alibi_slopes, frame)?;
    let [batch, heads_q, len_q, head_dim_v] = problem.out_shape();
    let mut stats = Array3::from_elem(
        (batch, heads_q, len_q),
        (T::Acc::neg_infinity(), T::Acc::zero()),
    );
    let mut out = Array4::<T::Acc>::zeros((batch, heads_q, len_q, head_dim_v));
    ctx.for_each_block(&mut stats, &mut out, |at, kv, weights, rows| {
        ctx.weighted_values(at, kv, weights, rows, |x| x)
    });
    Ok(Partial {
        out,
        max: stats.mapv(|(m, _)| m),
        sum: stats.mapv(|(_, s)| s),
    })
}

/// Merges the partial results of one query set over disjoint key sets into the result
/// over their union, in `A`: `max = max_p max_p`, `sum = sum_p exp(max_p - max) sum_p`,
/// `out = sum_p exp(max_p - max) out_p` ([`Partial::finish`] then divides once). A part
/// whose row read no key adds nothing; a row no part read stays empty; a NaN in a
/// part's row reaches the merged row. Dropout merges like the rest: each part's output
/// holds its kept weights times `1/(1-p)`, and the rescaling is the same for every key.
///
/// # Errors
/// `partials` naming the first part whose shapes differ from the first part's, or an
/// empty list.
pub fn merge<A: Accum>(parts: &[&Partial<A>]) -> Result<Partial<A>> {
    let first = parts
        .first()
        .ok_or_else(|| SdpaError::invalid("partials", "at least one partial output", "none"))?;
    for (n, part) in parts.iter().enumerate() {
        if part.out.shape() != first.out.shape() {
            return Err(SdpaError::invalid(
                "partials",
                format!(
                    "every part with out {} (part 0's)",
                    shape_text(first.out.shape())
                ),
                format!("part {n}: out {}", shape_text(part.out.shape())),
            ));
        }
    }
    let neg_inf = A::neg_infinity();
    let mut merged = Partial {
        out: Array4::<A>::zeros(first.out.raw_dim()),
        max: Array3::<A>::from_elem(first.max.raw_dim(), neg_inf),
        sum: Array3::<A>::zeros(first.max.raw_dim()),
    };
    for ((b, h, i), max) in merged.max.indexed_iter_mut() {
        let at = [b, h, i];
        let mut row = merged.out.slice_mut(s![b, h, i, ..]);
        if parts
            .iter()
            .any(|p| p.max[at].is_nan() || p.sum[at].is_nan())
        {
            *max = A::nan();
            merged.sum[at] = A::nan();
            row.fill(A::nan());
            continue;
        }
        let m = parts
            .iter()
            .filter(|p| p.sum[at] > A::zero())
            .map(|p| p.max[at])
            .fold(neg_inf, Float::max);
        if m == neg_inf {
            continue;
        }
        *max = m;
        let mut sum = A::zero();
        for part in parts.iter().filter(|p| p.sum[at] > A::zero()) {
            let scale = (part.max[at] - m).exp();
            sum = sum + scale * part.sum[at];
            row.zip_mut_with(&part.out.slice(s![b, h, i, ..]), |o, &x| {
                *o = *o + scale * x
            });
        }
        merged.sum[at] = sum;
    }
    Ok(merged)
}

/// `D = rowsum(dout * out)` of each row, `[B, Hq, L]`, in the accumulation type: what
/// each block's backward needs of the whole call (a row's `D` sums over all its keys),
/// from `out` in the accumulation type (a [`Partial::finish`]ed merge).
///
/// # Errors
/// `grad_out` (`dout`) of another shape than `out`.
pub fn delta<T: Element>(
    out: ArrayView4<'_, T::Acc>,
    dout: ArrayView4<'_, T>,
) -> Result<Array3<T::Acc>> {
    if out.shape() != dout.shape() {
        return Err(SdpaError::invalid(
            "grad_out",
            format!("shape {} (out's)", shape_text(out.shape())),
            shape_text(dout.shape()),
        ));
    }
    let (batch, heads, len, _) = out.dim();
    Ok(Array3::from_shape_fn((batch, heads, len), |(b, h, i)| {
        out.slice(s![b, h, i, ..])
            .iter()
            .zip(dout.slice(s![b, h, i, ..]))
            .fold(T::Acc::zero(), |acc, (&o, &d)| acc + o * d.to_acc())
    }))
}

/// The gradients a block contributes, in the accumulation type: `dq` of the block's
/// queries (summed over the blocks of their keys for the whole `dq`), `dk` and `dv` of
/// its keys (summed over the query heads of each group, and over the blocks of the
/// queries that read them).
#[derive(Debug, Clone, PartialEq)]
pub struct PartialGrads<A> {
    /// `[B, Hq, L, E]`.
    pub dq: Array4<A>,
    /// `[B, Hkv, S, E]`.
    pub dk: Array4<A>,
    /// `[B, Hkv, S, Ev]`.
    pub dv: Array4<A>,
}

/// The backward of [`partial`]: the block's share of the whole call's gradients, given
/// the block's rows' `max` and `sum` over the whole call (a [`merge`] of every block of
/// those rows) and their `delta` (`D`, from [`delta`] of the finished output), in the
/// accumulation type: `P = exp(s - max) / sum`, not renormalised over the block (its
/// rows' other keys are elsewhere).
///
/// # Errors
/// What [`partial`] rejects, and `grad_out`, `max`, `sum` or `delta` of a shape other
/// than the problem's.
#[allow(clippy::too_many_arguments)]
pub fn partial_backward<T: Element>(
    q: ArrayView4<'_, T>,
    k: ArrayView4<'_, T>,
    v: ArrayView4<'_, T>,
    dout: ArrayView4<'_, T>,
    max: ArrayView3<'_, T::Acc>,
    sum: ArrayView3<'_, T::Acc>,
    delta: ArrayView3<'_, T::Acc>,
    alibi_slopes: Option<ArrayViewD<'_, f32>>,
    options: &SdpaOptions,
    frame: Frame,
) -> Result<PartialGrads<T::Acc>> {
    let problem = problem(&q, &k, &v, None, options)?;
    for (arg, want, got) in [
        ("grad_out", &problem.out_shape()[..], dout.shape()),
        ("max", &problem.lse_shape()[..], max.shape()),
        ("sum", &problem.lse_shape()[..], sum.shape()),
        ("delta", &problem.lse_shape()[..], delta.shape()),
    ] {
        if want != got {
            return Err(SdpaError::invalid(
                arg,
                format!("shape {} (the problem's)", shape_text(want)),
                shape_text(got),
            ));
        }
    }
    let ctx = context(&problem, q.view(), k.view(), v.view(), alibi_slopes, frame)?;
    let keys_nan_free: Vec<Array2<T::Acc>> = ctx.keys.iter().map(nan_to_zero).collect();
    let p = &problem;
    let heads: Vec<_> = (0..p.batch * p.heads_q)
        .into_par_iter()
        .map(|bh| {
            let (b, h) = (bh / p.heads_q, bh % p.heads_q);
            let inputs = HeadInputs {
                lse: max.slice(s![b, h, ..]).to_owned(),
                dout: dout.slice(s![b, h, .., ..]).mapv(T::to_acc),
                delta: Some::<Array1<T::Acc>>(delta.slice(s![b, h, ..]).to_owned()),
                sum: Some(sum.slice(s![b, h, ..]).to_owned()),
            };
            head_grads(&ctx, &keys_nan_free, b, h, &inputs, false)
        })
        .collect();
    let mut grads = PartialGrads {
        dq: Array4::zeros((p.batch, p.heads_q, p.len_q, p.head_dim)),
        dk: Array4::zeros((p.batch, p.heads_kv, p.len_kv, p.head_dim)),
        dv: Array4::zeros((p.batch, p.heads_kv, p.len_kv, p.head_dim_v)),
    };
    let add = |x: &mut T::Acc, &y: &T::Acc| *x = *x + y;
    // In head order, as the whole call's backward sums a group.
    for (bh, head) in heads.into_iter().enumerate() {
        let (b, h) = (bh / p.heads_q, bh % p.heads_q);
        let kv = p.kv_head(h);
        grads.dq.slice_mut(s![b, h, .., ..]).assign(&head.dq);
        Zip::from(grads.dk.slice_mut(s![b, kv, .., ..]))
            .and(&head.dk)
            .for_each(add);
        Zip::from(grads.dv.slice_mut(s![b, kv, .., ..]))
            .and(&head.dv)
            .for_each(add);
    }
    Ok(grads)
}
