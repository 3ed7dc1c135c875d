//! Reference scaled dot-product attention on the CPU: slow enough to read, fast enough
//! to test with (a real GEMM per query block, rayon over batch, head and block).
//!
//! Semantics are PyTorch 2.11's math backend, as `sdpa-core` specifies them: exact
//! two-pass softmax with max subtraction, masks (bool or additive, broadcast), both
//! causal alignments, custom and negative scale, GQA, `Ev != E`, dropout from the
//! shared Philox stream, fully masked rows giving 0. Intermediates are f64 for f64
//! inputs and f32 otherwise; the output is rounded once.
//!
//! NaN follows sdpa-core's rule ([`Problem`]'s "NaN and Inf"): a NaN in a query row,
//! in a key or additive mask entry it attends to gives NaN in that row's output and
//! lse (also where PyTorch's CPU math path, whose safe softmax turns an all-NaN row into
//! 0, does not); a NaN in `v` of an attended key gives NaN in the output columns that
//! read it; keys masked out (bool mask, causal) are not read.
//!
//! # Shapes
//! `q [B, Hq, L, E]`, `k [B, Hkv, S, E]`, `v [B, Hkv, S, Ev]`, any strides ->
//! `out [B, Hq, L, Ev]` (contiguous) and `lse [B, Hq, L]` (f32).
//!
//! ```
//! use ndarray::Array4;
//! use sdpa_core::{Causal, SdpaOptions};
//!
//! let q = Array4::<f32>::from_shape_fn((1, 2, 3, 4), |(_, h, i, e)| (h + i * e) as f32 * 0.1);
//! let options = SdpaOptions { causal: Causal::TopLeft, ..Default::default() };
//! let result = sdpa_ref::sdpa(q.view(), q.view(), q.view(), None, &options)?;
//! assert_eq!(result.out.shape(), &[1, 2, 3, 4]);
//! // The first query sees only the first key, so it returns the first value row.
//! assert_eq!(result.out.slice(ndarray::s![0, 1, 0, ..]), q.slice(ndarray::s![0, 1, 0, ..]));
//! # Ok::<(), sdpa_core::SdpaError>(())
//! ```
#![warn(missing_docs)]
// deny, not forbid: ndarray's `s!` expands to an `allow(unsafe_code)` of its own.
#![deny(unsafe_code)]

pub mod blocks;
pub mod bwd;
mod element;
pub mod kvcache;

pub use blocks::Frame;
pub use bwd::{sdpa_backward, sdpa_backward_with_alibi, Gradients};
pub use element::{Accum, Element};

use ndarray::{
    s, Array2, Array3, Array4, ArrayView2, ArrayView4, ArrayViewD, ArrayViewMut1, ArrayViewMut2,
    Axis, Ix4, IxDyn,
};
use num_traits::{Float, One, Zero};
use rayon::prelude::*;
use sdpa_core::dropout::flat_index;
use sdpa_core::{MaskDesc, MaskKind, Problem, Result, SdpaError, SdpaOptions, TensorDesc};

/// Query rows per task: large enough that the two GEMMs run near peak, small enough
/// that a `[rows, S]` score block stays in cache and rayon has work to balance.
const QUERY_BLOCK: usize = 64;

/// An explicit `attn_mask`, broadcastable to `[B, Hq, L, S]` (rank 0 to 4).
#[derive(Debug, Clone)]
pub enum Mask<'a, T> {
    /// `true` = the key takes part.
    Bool(ArrayViewD<'a, bool>),
    /// Added to the scaled scores; `-inf` masks out. Same dtype as q.
    Additive(ArrayViewD<'a, T>),
}

/// Output of [`sdpa`].
#[derive(Debug, Clone, PartialEq)]
pub struct Output<T> {
    /// `[B, Hq, L, Ev]`, contiguous.
    pub out: Array4<T>,
    /// Natural log of the softmax denominator of each query row (scores scaled and
    /// masked, before dropout), `[B, Hq, L]`; `-inf` for a row with no key.
    pub lse: Array3<f32>,
}

/// Describes an ndarray view for `sdpa-core`.
pub fn describe<T: Element>(view: &ArrayView4<'_, T>) -> TensorDesc {
    let shape = view.shape();
    let strides = view.strides();
    TensorDesc {
        dtype: T::DTYPE,
        layout: sdpa_core::Layout {
            shape: [shape[0], shape[1], shape[2], shape[3]],
            strides: [strides[0], strides[1], strides[2], strides[3]],
        },
    }
}

fn describe_mask<T: Element>(mask: &Mask<'_, T>) -> MaskDesc {
    let (kind, shape, strides) = match mask {
        Mask::Bool(m) => (MaskKind::Bool, m.shape(), m.strides()),
        Mask::Additive(m) => (MaskKind::Additive(T::DTYPE), m.shape(), m.strides()),
    };
    MaskDesc {
        kind,
        shape: shape.to_vec(),
        strides: strides.to_vec(),
    }
}

/// Validates a call against the specification and returns the resolved problem.
pub fn problem<T: Element>(
    q: &ArrayView4<'_, T>,
    k: &ArrayView4<'_, T>,
    v: &ArrayView4<'_, T>,
    mask: Option<&Mask<'_, T>>,
    options: &SdpaOptions,
) -> Result<Problem> {
    let mask_desc = mask.map(describe_mask);
    Problem::new(
        &describe(q),
        &describe(k),
        &describe(v),
        mask_desc.as_ref(),
        options,
    )
}

/// The mask read as `[B, Hq, L, S]` through zero strides.
enum Broadcast<'a, T> {
    None,
    Bool(ArrayView4<'a, bool>),
    Additive(ArrayView4<'a, T>),
}

fn broadcast_mask<'a, 'm: 'a, T: Element>(
    mask: Option<&'a Mask<'m, T>>,
    shape: [usize; 4],
) -> Result<Broadcast<'a, T>> {
    let err = |m: &[usize]| {
        SdpaError::invalid(
            "attn_mask",
            format!(
                "a shape that broadcasts to {}",
                sdpa_core::shape_text(&shape)
            ),
            sdpa_core::shape_text(m),
        )
    };
    Ok(match mask {
        None => Broadcast::None,
        Some(Mask::Bool(m)) => Broadcast::Bool(
            m.broadcast(shape)
                .ok_or_else(|| err(m.shape()))?
                .into_dimensionality::<Ix4>()
                .map_err(|_| err(m.shape()))?,
        ),
        Some(Mask::Additive(m)) => Broadcast::Additive(
            m.broadcast(shape)
                .ok_or_else(|| err(m.shape()))?
                .into_dimensionality::<Ix4>()
                .map_err(|_| err(m.shape()))?,
        ),
    })
}

/// Where a call's elements sit in the dropout index space of DESIGN.md: element
/// `(b, h, i, j)` of the call draws the bit of flat index
/// `(((batch_offset + b) * heads_q + h) * len_q + i) * len_kv + j`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DropoutSpace {
    /// Batch index of the call's first batch element.
    pub batch_offset: usize,
    /// `Hq` of the space (must equal the call's).
    pub heads_q: usize,
    /// `L` of the space (at least the call's).
    pub len_q: usize,
    /// `S` of the space (at least the call's).
    pub len_kv: usize,
}

impl DropoutSpace {
    fn resolve(space: Option<DropoutSpace>, p: &Problem) -> Result<DropoutSpace> {
        let Some(space) = space else {
            return Ok(DropoutSpace {
                batch_offset: 0,
                heads_q: p.heads_q,
                len_q: p.len_q,
                len_kv: p.len_kv,
            });
        };
        if space.heads_q != p.heads_q || space.len_q < p.len_q || space.len_kv < p.len_kv {
            return Err(SdpaError::invalid(
                "dropout space",
                format!(
                    "{} heads, at least {} queries and {} keys (the problem's)",
                    p.heads_q, p.len_q, p.len_kv
                ),
                format!(
                    "{} heads, {} queries, {} keys",
                    space.heads_q, space.len_q, space.len_kv
                ),
            ));
        }
        let counters = space
            .batch_offset
            .checked_add(p.batch)
            .and_then(|batch| {
                sdpa_core::Dropout::checked_counters_used(
                    batch,
                    space.heads_q,
                    space.len_q,
                    space.len_kv,
                )
            })
            .and_then(|used| p.dropout.offset.checked_add(used));
        if counters.is_none() {
            return Err(SdpaError::invalid(
                "dropout space",
                "a space whose flat indices (batch_offset + B)*Hq*L*S and Philox counters \
                 from dropout_offset fit in u64",
                format!(
                    "batch_offset {}, B {}, {} heads, {} queries, {} keys, offset {}",
                    space.batch_offset,
                    p.batch,
                    space.heads_q,
                    space.len_q,
                    space.len_kv,
                    p.dropout.offset
                ),
            ));
        }
        Ok(space)
    }
}

/// Softcap `c` on scaled scores in place: `c * tanh(s / c)` (NaN stays NaN, +-inf
/// becomes +-c).
pub(crate) fn softcap_scores<A: Accum>(mut scores: ArrayViewMut2<'_, A>, c: A) {
    scores.mapv_inplace(|x| c * (x / c).tanh());
}

/// Everything a query block needs, shared by all tasks.
struct Context<'a, T: Element> {
    problem: &'a Problem,
    q: ArrayView4<'a, T>,
    /// `k` and `v` of each `(b, kv_head)`, widened to the accumulation type once; NaN
    /// entries of `v` are stored as 0 and listed in `value_nans`.
    keys: Vec<Array2<T::Acc>>,
    values: Vec<Array2<T::Acc>>,
    /// `(key, column)` of every NaN in `v` of each `(b, kv_head)`. A masked-out key's
    /// weight is 0, and `0 * NaN` in the GEMM would give NaN in a row that never reads
    /// that key; so the GEMM sees 0 there, and the rows that do read the key get their
    /// NaN back afterwards. Empty for NaN-free values, which take the GEMM path alone.
    value_nans: Vec<Vec<(usize, usize)>>,
    mask: Broadcast<'a, T>,
    space: DropoutSpace,
    /// ALiBi slopes broadcast to `[B, Hq]`, if any.
    alibi: Option<Array2<f64>>,
    /// Where the call's queries and keys sit in the problem causal, window, ALiBi and
    /// dropout are defined over (the call itself unless a block of a larger one).
    frame: Frame,
    /// Whether the call holds every key of its rows: the forward divides each row's
    /// weights by their sum, and the backward divides each row's `P` by its sum (which
    /// undoes the f32 rounding of `lse`). A block of a larger call does neither: its
    /// weights stay `exp(s - max)` (times the dropout factor), for the merge to scale.
    whole: bool,
}

impl<'a, T: Element> Context<'a, T> {
    fn new(
        problem: &'a Problem,
        q: ArrayView4<'a, T>,
        k: ArrayView4<'a, T>,
        v: ArrayView4<'a, T>,
        mask: Broadcast<'a, T>,
        space: DropoutSpace,
    ) -> Self {
        let widen = |x: &ArrayView4<'a, T>| -> Vec<Array2<T::Acc>> {
            (0..problem.batch * problem.heads_kv)
                .into_par_iter()
                .map(|bh| {
                    x.slice(s![bh / problem.heads_kv, bh % problem.heads_kv, .., ..])
                        .mapv(T::to_acc)
                })
                .collect()
        };
        let mut values = widen(&v);
        let value_nans = values
            .par_iter_mut()
            .map(|value| {
                let mut nans = Vec::new();
                for ((j, c), x) in value.indexed_iter_mut() {
                    if x.is_nan() {
                        nans.push((j, c));
                        *x = T::Acc::zero();
                    }
                }
                nans
            })
            .collect();
        Context {
            problem,
            keys: widen(&k),
            values,
            value_nans,
            q,
            mask,
            space,
            alibi: None,
            frame: Frame::whole(problem.len_q, problem.len_kv),
            whole: true,
        }
    }

    pub(crate) fn with_alibi(self, alibi: Option<Array2<f64>>) -> Self {
        Context { alibi, ..self }
    }

    /// The context of a block at `frame` of a larger call: positions and dropout
    /// indices are the frame's, and rows are not normalised.
    pub(crate) fn in_frame(self, frame: Frame) -> Self {
        Context {
            frame,
            whole: false,
            ..self
        }
    }

    /// Row `i`'s keys `lo..limit` (the window's and causal's range), in the call's key
    /// indices.
    fn key_range(&self, i: usize) -> (usize, usize) {
        let p = self.problem;
        let f = &self.frame;
        let (lo, limit) =
            blocks::visible_keys(p.causal, p.window, f.query_offset + i, f.len_q, f.len_kv);
        let local = |x: usize| x.saturating_sub(f.key_offset).min(p.len_kv);
        (local(lo), local(limit))
    }

    /// Adds row `i`'s ALiBi bias `-slope * |i + S - L - j|` of `(b, h)` to its scores.
    pub(crate) fn add_alibi(&self, b: usize, h: usize, i: usize, row: &mut [T::Acc]) {
        if let Some(slopes) = &self.alibi {
            let slope = T::Acc::from_f64(slopes[[b, h]]);
            let f = &self.frame;
            let diag = (f.query_offset + i) as i128 + f.len_kv as i128
                - f.len_q as i128
                - f.key_offset as i128;
            for (j, x) in row.iter_mut().enumerate() {
                let distance = T::Acc::from_f64((diag - j as i128).unsigned_abs() as f64);
                *x = *x - slope * distance;
            }
        }
    }

    /// Whether query `i` of `(b, h)` reads key `j`: causal and a bool mask allow it (an
    /// additive mask masks nothing out; its `-inf` is added like any value).
    fn reads_key(&self, b: usize, h: usize, i: usize, j: usize) -> bool {
        let (lo, limit) = self.key_range(i);
        lo <= j
            && j < limit
            && match &self.mask {
                Broadcast::Bool(m) => m[[b, h, i, j]],
                Broadcast::None | Broadcast::Additive(_) => true,
            }
    }

    /// Post-softmax, post-dropout weights of queries `i0 .. i0 + rows` of `(b, h)`,
    /// written into `weights [rows, S]`; each row's maximum score and `sum exp(s - max)`
    /// into `stats` (`(-inf, 0)` for a row with no key, NaN for a NaN row), whose
    /// log-sum-exp is `max + ln(sum)`. A block ([`Context::in_frame`]) leaves the
    /// weights `exp(s - max)`, undivided by the sum.
    fn block_weights(
        &self,
        b: usize,
        h: usize,
        i0: usize,
        mut weights: ArrayViewMut2<'_, T::Acc>,
        mut stats: ArrayViewMut1<'_, (T::Acc, T::Acc)>,
    ) {
        let p = self.problem;
        let rows = weights.nrows();
        let kv = b * p.heads_kv + p.kv_head(h);
        if p.head_dim == 0 {
            // An empty dot product is 0 whatever the scale (PyTorch's matmul of empty
            // factors); multiplying by an infinite default scale would give NaN.
            weights.fill(T::Acc::zero());
        } else {
            let q_block: Array2<T::Acc> = self.q.slice(s![b, h, i0..i0 + rows, ..]).mapv(T::to_acc);
            ndarray::linalg::general_mat_mul(
                T::Acc::from_f64(p.scale),
                &q_block,
                &self.keys[kv].t(),
                T::Acc::zero(),
                &mut weights,
            );
        }
        let neg_inf = T::Acc::neg_infinity();
        let keep_scale = T::Acc::from_f64(p.dropout.keep_scale());
        let mut keep = vec![true; p.len_kv];
        if let Some(c) = p.softcap {
            softcap_scores(weights.view_mut(), T::Acc::from_f64(c));
        }
        for (r, mut row) in weights.outer_iter_mut().enumerate() {
            let i = i0 + r;
            let row = row.as_slice_mut().expect("weights rows are contiguous");
            self.add_alibi(b, h, i, row);
            let (lo, limit) = self.key_range(i);
            row[..lo].fill(neg_inf);
            row[limit..].fill(neg_inf);
            match &self.mask {
                Broadcast::None => {}
                Broadcast::Bool(m) => {
                    for (x, &allowed) in row.iter_mut().zip(m.slice(s![b, h, i, ..])) {
                        if !allowed {
                            *x = neg_inf;
                        }
                    }
                }
                Broadcast::Additive(m) => {
                    // Keys outside the causal and window range are not read: an entry
                    // there (NaN, or +inf, which would meet the -inf) must not reach the
                    // row.
                    for (x, &add) in row[lo..limit]
                        .iter_mut()
                        .zip(m.slice(s![b, h, i, lo..limit]))
                    {
                        *x = *x + add.to_acc();
                    }
                }
            }
            // Float::max skips NaN, so a row of NaN scores (a NaN in its q row) has max
            // -inf like a fully masked row; the NaN is looked for before the safe
            // softmax's 0 can hide it.
            let max = row.iter().copied().fold(neg_inf, Float::max);
            if max == neg_inf {
                if row.iter().any(|x| x.is_nan()) {
                    row.fill(T::Acc::nan());
                    stats[r] = (T::Acc::nan(), T::Acc::nan());
                } else {
                    // Every key masked out: PyTorch's safe softmax gives 0, never NaN.
                    row.fill(T::Acc::zero());
                    stats[r] = (neg_inf, T::Acc::zero());
                }
                continue;
            }
            let sum = T::Acc::exp_shifted(row, max);
            if sum.is_nan() {
                // A NaN score (or +inf meeting +inf): NaN in every weight, dropped or
                // kept, as PyTorch's math backend multiplies the NaN by the keep mask.
                row.fill(T::Acc::nan());
                stats[r] = (T::Acc::nan(), T::Acc::nan());
                continue;
            }
            stats[r] = (max, sum);
            let inv = if self.whole {
                T::Acc::one() / sum
            } else {
                T::Acc::one()
            };
            if p.dropout.is_active() {
                p.dropout
                    .fill_keep_row(self.dropout_row(b, h, i), &mut keep);
                let kept = inv * keep_scale;
                for (x, &k) in row.iter_mut().zip(&keep) {
                    *x = if k { *x * kept } else { T::Acc::zero() };
                }
            } else {
                if self.whole {
                    row.iter_mut().for_each(|x| *x = *x * inv);
                }
            }
        }
    }

    /// `rows = weights . v` of `(b, h)`'s queries `i0 ..` (with `kv` its kv head's
    /// index), each element through `to`; NaN entries of `v` come back as NaN in the
    /// columns of the rows that read their key.
    fn weighted_values<X: Clone>(
        &self,
        [b, h, i0]: [usize; 3],
        kv: usize,
        weights: ArrayView2<'_, T::Acc>,
        mut rows: ArrayViewMut2<'_, X>,
        to: fn(T::Acc) -> X,
    ) {
        let values = &self.values[kv];
        if values.ncols() > 0 {
            rows.assign(&weights.dot(values).mapv(to));
            for &(j, c) in &self.value_nans[kv] {
                for (r, mut row) in rows.outer_iter_mut().enumerate() {
                    if self.reads_key(b, h, i0 + r, j) {
                        row[c] = to(T::Acc::nan());
                    }
                }
            }
        }
    }

    /// The flat dropout index of row `i`'s first key (DESIGN.md's stream): the row's
    /// keys are consecutive there.
    fn dropout_row(&self, b: usize, h: usize, i: usize) -> u64 {
        flat_index(
            self.space.batch_offset + b,
            h,
            self.frame.query_offset + i,
            self.frame.key_offset,
            self.space.heads_q,
            self.space.len_q,
            self.space.len_kv,
        )
    }

    /// For every query block, in parallel: computes its weights and hands them to
    /// `f([b, h, i0], kv, weights, rows)` with `rows` the block's slice (queries `i0 ..`)
    /// of `target [B, Hq, L, X]`.
    fn for_each_block<X, F>(
        &self,
        stats: &mut Array3<(T::Acc, T::Acc)>,
        target: &mut Array4<X>,
        f: F,
    ) where
        X: Send + Sync,
        F: Fn([usize; 3], usize, ArrayView2<'_, T::Acc>, ArrayViewMut2<'_, X>) + Sync,
    {
        let p = self.problem;
        stats
            .outer_iter_mut()
            .into_par_iter()
            .zip(target.outer_iter_mut().into_par_iter())
            .enumerate()
            .for_each(|(b, (mut stats_b, mut target_b))| {
                stats_b
                    .outer_iter_mut()
                    .into_par_iter()
                    .zip(target_b.outer_iter_mut().into_par_iter())
                    .enumerate()
                    .for_each(|(h, (mut stats_bh, mut target_bh))| {
                        stats_bh
                            .axis_chunks_iter_mut(Axis(0), QUERY_BLOCK)
                            .into_par_iter()
                            .zip(
                                target_bh
                                    .axis_chunks_iter_mut(Axis(0), QUERY_BLOCK)
                                    .into_par_iter(),
                            )
                            .enumerate()
                            .for_each(|(blk, (stats_rows, target_rows))| {
                                let mut weights = Array2::zeros((stats_rows.len(), p.len_kv));
                                self.block_weights(
                                    b,
                                    h,
                                    blk * QUERY_BLOCK,
                                    weights.view_mut(),
                                    stats_rows,
                                );
                                let kv = b * p.heads_kv + p.kv_head(h);
                                f([b, h, blk * QUERY_BLOCK], kv, weights.view(), target_rows);
                            });
                    });
            });
    }
}

/// Scaled dot-product attention, as `torch.nn.functional.scaled_dot_product_attention`
/// computes it with the math backend.
///
/// # Errors
/// Whatever [`Problem::new`] rejects: mismatched dtypes, batch, lengths or head dims;
/// heads that do not match (or divide under GQA); a mask that does not broadcast;
/// dropout `p` outside `[0, 1]`; a scale that is not finite.
pub fn sdpa<T: Element>(
    q: ArrayView4<'_, T>,
    k: ArrayView4<'_, T>,
    v: ArrayView4<'_, T>,
    mask: Option<Mask<'_, T>>,
    options: &SdpaOptions,
) -> Result<Output<T>> {
    sdpa_in_space(q, k, v, mask, options, None)
}

/// [`sdpa`] with the call's elements placed in a larger dropout index space: what a
/// nested batch needs so that sequence `b` draws the dropout bits of row `b` of the
/// padded `[B, Hq, Lmax, Smax]` problem. `None` is the call's own space.
///
/// # Errors
/// As [`sdpa`], and a `space` that does not contain the problem.
pub fn sdpa_in_space<T: Element>(
    q: ArrayView4<'_, T>,
    k: ArrayView4<'_, T>,
    v: ArrayView4<'_, T>,
    mask: Option<Mask<'_, T>>,
    options: &SdpaOptions,
    space: Option<DropoutSpace>,
) -> Result<Output<T>> {
    forward(q, k, v, mask, None, options, space)
}

/// [`sdpa`] with ALiBi: `-slope * |i + S - L - j|` added to the scores of head `h` (of
/// batch `b`) after the scale and softcap, before the mask. `alibi_slopes` is `[Hq]` or
/// `[B, Hq]`, finite.
///
/// # Errors
/// As [`sdpa`], and `alibi_slopes` of another shape or with a non-finite slope.
pub fn sdpa_with_alibi<T: Element>(
    q: ArrayView4<'_, T>,
    k: ArrayView4<'_, T>,
    v: ArrayView4<'_, T>,
    mask: Option<Mask<'_, T>>,
    alibi_slopes: ArrayViewD<'_, f32>,
    options: &SdpaOptions,
) -> Result<Output<T>> {
    forward(q, k, v, mask, Some(alibi_slopes), options, None)
}

/// The slopes `[Hq]` or `[B, Hq]` broadcast to `[B, Hq]` (f64), checked.
pub(crate) fn alibi_plan(
    slopes: Option<ArrayViewD<'_, f32>>,
    p: &Problem,
) -> Result<Option<Array2<f64>>> {
    slopes
        .map(|s| alibi_slopes(s, p.batch, p.heads_q))
        .transpose()
}

/// Slopes `[Hq]` or `[B, Hq]` broadcast to `[B, Hq]` (f64), checked.
pub(crate) fn alibi_slopes(
    slopes: ArrayViewD<'_, f32>,
    batch: usize,
    heads_q: usize,
) -> Result<Array2<f64>> {
    sdpa_core::check_alibi_slopes(slopes.shape(), slopes.iter(), batch, heads_q)?;
    let want = [batch, heads_q];
    let plan = slopes
        .broadcast(IxDyn(&want))
        .expect("[Hq] and [B, Hq] broadcast to [B, Hq]")
        .mapv(f64::from)
        .into_dimensionality::<ndarray::Ix2>()
        .expect("two dims");
    Ok(plan)
}

fn forward<T: Element>(
    q: ArrayView4<'_, T>,
    k: ArrayView4<'_, T>,
    v: ArrayView4<'_, T>,
    mask: Option<Mask<'_, T>>,
    alibi: Option<ArrayViewD<'_, f32>>,
    options: &SdpaOptions,
    space: Option<DropoutSpace>,
) -> Result<Output<T>> {
    let problem = problem(&q, &k, &v, mask.as_ref(), options)?;
    let alibi = alibi_plan(alibi, &problem)?;
    let space = DropoutSpace::resolve(space, &problem)?;
    let bmask = broadcast_mask(mask.as_ref(), problem.scores_shape())?;
    let [batch, heads_q, len_q, head_dim_v] = problem.out_shape();
    let mut stats = Array3::from_elem(
        (batch, heads_q, len_q),
        (T::Acc::neg_infinity(), T::Acc::zero()),
    );
    let mut out = Array4::from_elem(
        (batch, heads_q, len_q, head_dim_v),
        T::from_acc(T::Acc::zero()),
    );
    let ctx = Context::new(&problem, q.view(), k.view(), v.view(), bmask, space).with_alibi(alibi);
    ctx.for_each_block(&mut stats, &mut out, |at, kv, weights, rows| {
        ctx.weighted_values(at, kv, weights, rows, T::from_acc)
    });
    Ok(Output {
        out,
        lse: stats.mapv(|(max, sum)| (max + sum.ln()).to_f32()),
    })
}

/// The attention weights `[B, Hq, L, S]` the math backend multiplies `v` by: softmax of
/// the scaled, masked scores, with dropout applied (dropped weights 0, kept ones scaled
/// by `1/(1-p)`). What PyTorch's `_scaled_dot_product_attention_math` returns second.
///
/// # Errors
/// As [`sdpa`].
pub fn attention_weights<T: Element>(
    q: ArrayView4<'_, T>,
    k: ArrayView4<'_, T>,
    v: ArrayView4<'_, T>,
    mask: Option<Mask<'_, T>>,
    options: &SdpaOptions,
) -> Result<Array4<T::Acc>> {
    let problem = problem(&q, &k, &v, mask.as_ref(), options)?;
    let space = DropoutSpace::resolve(None, &problem)?;
    let bmask = broadcast_mask(mask.as_ref(), problem.scores_shape())?;
    let [batch, heads_q, len_q, len_kv] = problem.scores_shape();
    let mut stats = Array3::from_elem((batch, heads_q, len_q), (T::Acc::zero(), T::Acc::zero()));
    let mut all = Array4::zeros((batch, heads_q, len_q, len_kv));
    let ctx = Context::new(&problem, q.view(), k.view(), v.view(), bmask, space);
    ctx.for_each_block(&mut stats, &mut all, |_, _, weights, mut rows| {
        rows.assign(&weights)
    });
    Ok(all)
}

/// Merges the outputs of one query set over disjoint key sets (split-KV decoding's
/// partial results, a ring's per-step blocks) into the output over their union, by
/// their log-sum-exp, as [`blocks::merge`] does (which also says how masked rows, NaN
/// and dropout merge). Exact up to the f32 rounding of each part's lse: keep the parts
/// in the accumulation type ([`blocks::partial`]) where that matters.
///
/// # Errors
/// `partials` naming the first part whose shapes differ from the first part's, or an
/// empty list.
pub fn merge_partials(parts: &[&Output<f64>]) -> Result<Output<f64>> {
    let parts = parts
        .iter()
        .map(|p| blocks::Partial::from_normalised(p.out.clone(), p.lse.mapv(f64::from)))
        .collect::<Result<Vec<_>>>()?;
    let (out, lse) = blocks::merge(&parts.iter().collect::<Vec<_>>())?.finish();
    Ok(Output {
        out,
        lse: lse.mapv(|x| x as f32),
    })
}
