//! The backward of [`sdpa`](crate::sdpa): gradients of q, k, v and an additive mask,
//! as DESIGN.md's "Backward" defines them.
//!
//! With `s = scale * q k^T` (then the mask), `P = exp(s - lse)` from the forward's
//! log-sum-exp, keep bits `Z` replayed from the forward's Philox stream and
//! `W = P * Z / (1 - p)`:
//! `dv = W^T dout`, `dW = dout v^T`, `dP = dW * Z / (1 - p)`, `D = rowsum(P * dP)` (which is `rowsum(dout * out)`),
//! `dS = P * (dP - D)`, `dq = scale * dS k`, `dk = scale * dS^T q`, and `dmask = dS`
//! summed over the axes the mask broadcasts along. Keys a row does not read (causal,
//! bool mask false) have `P = dS = 0` there, so a row with no key has zero gradients.
//!
//! # Shapes
//! As [`sdpa`](crate::sdpa), plus `out [B, Hq, L, Ev]`, `lse [B, Hq, L]` (f32) and
//! `dout [B, Hq, L, Ev]` -> `dq [B, Hq, L, E]`, `dk [B, Hkv, S, E]`,
//! `dv [B, Hkv, S, Ev]`, `dmask` in the additive mask's own shape.
//!
//! ```
//! use ndarray::Array4;
//! use sdpa_core::SdpaOptions;
//!
//! let q = Array4::<f64>::from_shape_fn((1, 1, 3, 2), |(_, _, i, e)| (i + e) as f64 * 0.3);
//! let options = SdpaOptions::default();
//! let fwd = sdpa_ref::sdpa(q.view(), q.view(), q.view(), None, &options)?;
//! let dout = Array4::<f64>::ones((1, 1, 3, 2));
//! let grads = sdpa_ref::bwd::sdpa_backward(
//!     q.view(), q.view(), q.view(), fwd.out.view(), fwd.lse.view(), dout.view(), None, &options,
//! )?;
//! assert_eq!(grads.dk.shape(), &[1, 1, 3, 2]);
//! // Each query's weights sum to 1, so a dout of ones puts 1 per query (3) into dv,
//! // spread over the keys.
//! let per_column = grads.dv.sum_axis(ndarray::Axis(2));
//! assert!(per_column.iter().all(|&x| (x - 3.0).abs() < 1e-12));
//! # Ok::<(), sdpa_core::SdpaError>(())
//! ```

use crate::{
    broadcast_mask, problem, Accum, Broadcast, Context, DropoutSpace, Element, Mask, QUERY_BLOCK,
};
use ndarray::linalg::general_mat_mul;
use ndarray::{
    s, Array2, Array4, ArrayD, ArrayView2, ArrayView3, ArrayView4, ArrayViewD, IxDyn, Zip,
};
use num_traits::{Float, One, Zero};
use rayon::prelude::*;
use sdpa_core::{shape_text, Result, SdpaError, SdpaOptions};

/// Output of [`sdpa_backward`], in the inputs' dtype.
#[derive(Debug, Clone, PartialEq)]
pub struct Gradients<T> {
    /// `[B, Hq, L, E]`.
    pub dq: Array4<T>,
    /// `[B, Hkv, S, E]`, summed over the query heads of each group under GQA.
    pub dk: Array4<T>,
    /// `[B, Hkv, S, Ev]`, summed over the query heads of each group under GQA.
    pub dv: Array4<T>,
    /// Gradient of an additive mask, in its own (broadcast) shape; `None` for a bool
    /// mask or none.
    pub dmask: Option<ArrayD<T>>,
}

/// Gradients of `sum(out * dout)` for the attention [`sdpa`](crate::sdpa) computes from
/// `q`, `k`, `v`, `mask` and `options`, given that call's `out` and `lse`.
///
/// Intermediates and accumulators are `T::Acc` (f64 for f64, f32 otherwise); each
/// gradient is rounded to `T` once. Dropout replays the forward's keep bits from
/// `options.dropout` (same seed and offset), so pass the options of the forward call.
/// `out` is checked against the problem but not read: `D = rowsum(dout * out)` is
/// computed as `rowsum(P * dP)`, its exact equal, so it carries no rounding of `out`.
///
/// # Errors
/// Whatever [`sdpa`](crate::sdpa) rejects, and `out`, `lse` or `grad_out` (`dout`) of a
/// shape other than the problem's.
// The argument list is PyTorch's `_scaled_dot_product_*_backward`'s: the forward's
// inputs and outputs and the incoming gradient, each a tensor of its own.
#[allow(clippy::too_many_arguments)]
pub fn sdpa_backward<T: Element>(
    q: ArrayView4<'_, T>,
    k: ArrayView4<'_, T>,
    v: ArrayView4<'_, T>,
    out: ArrayView4<'_, T>,
    lse: ArrayView3<'_, f32>,
    dout: ArrayView4<'_, T>,
    mask: Option<Mask<'_, T>>,
    options: &SdpaOptions,
) -> Result<Gradients<T>> {
    backward(q, k, v, out, lse, dout, mask, None, options)
}

/// [`sdpa_backward`] of [`sdpa_with_alibi`](crate::sdpa_with_alibi)'s attention (the
/// slopes are constants: no gradient).
///
/// # Errors
/// As [`sdpa_backward`], and `alibi_slopes` as [`sdpa_with_alibi`](crate::sdpa_with_alibi).
#[allow(clippy::too_many_arguments)]
pub fn sdpa_backward_with_alibi<T: Element>(
    q: ArrayView4<'_, T>,
    k: ArrayView4<'_, T>,
    v: ArrayView4<'_, T>,
    out: ArrayView4<'_, T>,
    lse: ArrayView3<'_, f32>,
    dout: ArrayView4<'_, T>,
    mask: Option<Mask<'_, T>>,
    alibi_slopes: ArrayViewD<'_, f32>,
    options: &SdpaOptions,
) -> Result<Gradients<T>> {
    backward(q, k, v, out, lse, dout, mask, Some(alibi_slopes), options)
}

#[allow(clippy::too_many_arguments)]
fn backward<T: Element>(
    q: ArrayView4<'_, T>,
    k: ArrayView4<'_, T>,
    v: ArrayView4<'_, T>,
    out: ArrayView4<'_, T>,
    lse: ArrayView3<'_, f32>,
    dout: ArrayView4<'_, T>,
    mask: Option<Mask<'_, T>>,
    alibi: Option<ArrayViewD<'_, f32>>,
    options: &SdpaOptions,
) -> Result<Gradients<T>> {
    let problem = problem(&q, &k, &v, mask.as_ref(), options)?;
    let alibi = crate::alibi_plan(alibi, &problem)?;
    let shape_check = |arg: &'static str, want: &[usize], got: &[usize]| {
        if want == got {
            Ok(())
        } else {
            Err(SdpaError::invalid(
                arg,
                format!("shape {} (the problem's)", shape_text(want)),
                shape_text(got),
            ))
        }
    };
    shape_check("out", &problem.out_shape(), out.shape())?;
    shape_check("lse", &problem.lse_shape(), lse.shape())?;
    shape_check("grad_out", &problem.out_shape(), dout.shape())?;
    let space = DropoutSpace::resolve(None, &problem)?;
    let bmask = broadcast_mask(mask.as_ref(), problem.scores_shape())?;
    let additive_shape = match &mask {
        Some(Mask::Additive(m)) => Some(m.shape().to_vec()),
        _ => None,
    };
    let ctx = Context::new(&problem, q.view(), k.view(), v.view(), bmask, space).with_alibi(alibi);
    // NaN in a key is zeroed for dq's GEMM only: a row that reads it already has NaN
    // scores, hence NaN dS, and a row that does not read it must not see `0 * NaN`.
    let keys_nan_free: Vec<Array2<T::Acc>> = ctx.keys.iter().map(nan_to_zero).collect();
    let heads: Vec<HeadGrads<T::Acc>> = (0..problem.batch * problem.heads_q)
        .into_par_iter()
        .map(|bh| {
            let (b, h) = (bh / problem.heads_q, bh % problem.heads_q);
            let inputs = HeadInputs {
                lse: lse.slice(s![b, h, ..]).mapv(|x| T::Acc::from_f64(x as f64)),
                dout: dout.slice(s![b, h, .., ..]).mapv(T::to_acc),
                delta: None,
                sum: None,
            };
            head_grads(
                &ctx,
                &keys_nan_free,
                b,
                h,
                &inputs,
                additive_shape.is_some(),
            )
        })
        .collect();

    let p = &problem;
    let mut dq = Array4::from_elem(
        (p.batch, p.heads_q, p.len_q, p.head_dim),
        T::from_acc(T::Acc::zero()),
    );
    let mut dk_acc = Array4::<T::Acc>::zeros((p.batch, p.heads_kv, p.len_kv, p.head_dim));
    let mut dv_acc = Array4::<T::Acc>::zeros((p.batch, p.heads_kv, p.len_kv, p.head_dim_v));
    let mut dmask_acc = additive_shape
        .as_ref()
        .map(|m| ArrayD::<T::Acc>::zeros(IxDyn(m)));
    let add = |x: &mut T::Acc, &y: &T::Acc| *x = *x + y;
    // In head order, so the group sums (and the result) do not depend on scheduling.
    for (bh, grads) in heads.into_iter().enumerate() {
        let (b, h) = (bh / p.heads_q, bh % p.heads_q);
        let kv = p.kv_head(h);
        dq.slice_mut(s![b, h, .., ..])
            .assign(&grads.dq.mapv(T::from_acc));
        Zip::from(dk_acc.slice_mut(s![b, kv, .., ..]))
            .and(&grads.dk)
            .for_each(add);
        Zip::from(dv_acc.slice_mut(s![b, kv, .., ..]))
            .and(&grads.dv)
            .for_each(add);
        if let (Some(dmask), Some(ds)) = (dmask_acc.as_mut(), grads.ds.as_ref()) {
            reduce_into_mask(dmask, ds.view(), [b, h]);
        }
    }
    Ok(Gradients {
        dq,
        dk: dk_acc.mapv(T::from_acc),
        dv: dv_acc.mapv(T::from_acc),
        dmask: dmask_acc.map(|m| m.mapv(T::from_acc)),
    })
}

/// The forward's results and the incoming gradient of one `(b, h)`, widened once.
pub(crate) struct HeadInputs<A> {
    pub(crate) lse: ndarray::Array1<A>,
    pub(crate) dout: Array2<A>,
    /// `D = rowsum(dout * out)` of each row when the caller has it (a block of a larger
    /// call, whose rows read keys outside the block); `None` takes `rowsum(P * dP)`
    /// over the call's keys.
    pub(crate) delta: Option<ndarray::Array1<A>>,
    /// For a block of a larger call: `lse` holds each row's maximum score and this its
    /// `sum exp(s - max)` over the whole call, so `P = exp(s - max) / sum` (exact where
    /// an f32 `max + ln(sum)` of large scores is not). `None`: `P = exp(s - lse)`.
    pub(crate) sum: Option<ndarray::Array1<A>>,
}

/// One query head's share: its `dq` rows, its contributions to its kv head's `dk` and
/// `dv` (summed over the group afterwards), and `dS` when an additive mask wants it.
pub(crate) struct HeadGrads<A> {
    pub(crate) dq: Array2<A>,
    pub(crate) dk: Array2<A>,
    pub(crate) dv: Array2<A>,
    pub(crate) ds: Option<Array2<A>>,
}

pub(crate) fn nan_to_zero<A: Accum>(x: &Array2<A>) -> Array2<A> {
    x.mapv(|x| if x.is_nan() { A::zero() } else { x })
}

pub(crate) fn head_grads<T: Element>(
    ctx: &Context<'_, T>,
    keys_nan_free: &[Array2<T::Acc>],
    b: usize,
    h: usize,
    inputs: &HeadInputs<T::Acc>,
    want_ds: bool,
) -> HeadGrads<T::Acc> {
    let p = ctx.problem;
    let (len_q, len_kv, e, ev) = (p.len_q, p.len_kv, p.head_dim, p.head_dim_v);
    let kv = b * p.heads_kv + p.kv_head(h);
    let zero = T::Acc::zero();
    let scale = T::Acc::from_f64(p.scale);
    let q_head = ctx.q.slice(s![b, h, .., ..]).mapv(T::to_acc);
    // As for keys: a NaN query row has NaN dS wherever it reads, which carries the NaN
    // into dk; the zero keeps it out of keys the row does not read.
    let q_nan_free = nan_to_zero(&q_head);
    let dout_nan_free = nan_to_zero(&inputs.dout);
    let mut grads = HeadGrads {
        dq: Array2::zeros((len_q, e)),
        dk: Array2::zeros((len_kv, e)),
        dv: Array2::zeros((len_kv, ev)),
        ds: want_ds.then(|| Array2::zeros((len_q, len_kv))),
    };
    let keep_scale = T::Acc::from_f64(p.dropout.keep_scale());
    let mut keep = vec![true; len_kv];
    for i0 in (0..len_q).step_by(QUERY_BLOCK) {
        let rows = QUERY_BLOCK.min(len_q - i0);
        let block = i0..i0 + rows;
        // `probs` becomes P, `dscores` dW then dS, `weights` W.
        let mut probs = Array2::<T::Acc>::zeros((rows, len_kv));
        if e > 0 {
            // An empty dot product is 0 whatever the (possibly infinite) default scale.
            general_mat_mul(
                scale,
                &q_head.slice(s![block.clone(), ..]),
                &ctx.keys[kv].t(),
                zero,
                &mut probs,
            );
        }
        // Softcap: s' = c tanh(s / c) is what the mask and softmax see; ds/ds' = 1 - tanh^2
        // scales dS on its way to dq and dk (not dmask, added after the softcap).
        let capped = p.softcap.map(|c| {
            let c = T::Acc::from_f64(c);
            let slope = probs.mapv(|x| {
                let t = (x / c).tanh();
                T::Acc::one() - t * t
            });
            crate::softcap_scores(probs.view_mut(), c);
            slope
        });
        for (r, mut row) in probs.outer_iter_mut().enumerate() {
            ctx.add_alibi(
                b,
                h,
                i0 + r,
                row.as_slice_mut().expect("probs rows are contiguous"),
            );
        }
        let mut dscores = Array2::<T::Acc>::zeros((rows, len_kv));
        // (Ev = 0 makes an empty, finite product: 0.)
        general_mat_mul(
            T::Acc::one(),
            &inputs.dout.slice(s![block.clone(), ..]),
            &ctx.values[kv].t(),
            zero,
            &mut dscores,
        );
        // The forward's values hold 0 for NaN; `dout . v_j` is NaN for such a key.
        for &(j, _) in &ctx.value_nans[kv] {
            dscores.column_mut(j).fill(T::Acc::nan());
        }
        let mut weights = Array2::<T::Acc>::zeros((rows, len_kv));
        for r in 0..rows {
            let i = i0 + r;
            let mut prob = probs.row_mut(r);
            let prob = prob.as_slice_mut().expect("probs rows are contiguous");
            let sum = inputs.sum.as_ref().map(|s| s[i]);
            row_probabilities(ctx, b, h, i, inputs.lse[i], sum, prob);
            if p.dropout.is_active() {
                p.dropout.fill_keep_row(ctx.dropout_row(b, h, i), &mut keep);
            }
            let mut dscore = dscores.row_mut(r);
            let mut weight = weights.row_mut(r);
            // D = rowsum(P * dP) over the keys the row reads: equal to rowsum(dout * out)
            // in exact arithmetic, and taken from P rather than from the rounded `out`,
            // so that dP - D does not inherit out's rounding (libtorch's math backward
            // does the same; its f32 gradients are what the goldens hold ours to).
            let mut delta = zero;
            for j in 0..len_kv {
                // Dropped keys multiply by 0, not skip, so a NaN dW still shows (as in
                // the math backend's `dW * mask`).
                let z = if keep[j] { keep_scale } else { zero };
                weight[j] = prob[j] * z;
                dscore[j] = dscore[j] * z;
                if ctx.reads_key(b, h, i, j) {
                    delta = delta + prob[j] * dscore[j];
                }
            }
            if let Some(given) = &inputs.delta {
                delta = given[i];
            }
            for j in 0..len_kv {
                dscore[j] = if ctx.reads_key(b, h, i, j) {
                    prob[j] * (dscore[j] - delta)
                } else {
                    zero
                };
            }
        }
        if let Some(ds) = grads.ds.as_mut() {
            ds.slice_mut(s![block.clone(), ..]).assign(&dscores);
        }
        if let Some(slope) = &capped {
            dscores.zip_mut_with(slope, |d, &g| *d = *d * g);
        }
        // With E = 0 (an infinite default scale) or Ev = 0 these outputs are empty.
        general_mat_mul(
            scale,
            &dscores,
            &keys_nan_free[kv],
            zero,
            &mut grads.dq.slice_mut(s![block.clone(), ..]),
        );
        general_mat_mul(
            scale,
            &dscores.t(),
            &q_nan_free.slice(s![block.clone(), ..]),
            T::Acc::one(),
            &mut grads.dk,
        );
        general_mat_mul(
            T::Acc::one(),
            &weights.t(),
            &dout_nan_free.slice(s![block.clone(), ..]),
            T::Acc::one(),
            &mut grads.dv,
        );
    }
    // A NaN in dout reaches `dv` of every key its row reads (kept or dropped, as the
    // math backend's `W^T dout`), and no other key.
    for ((i, c), x) in inputs.dout.indexed_iter() {
        if x.is_nan() {
            for j in 0..len_kv {
                if ctx.reads_key(b, h, i, j) {
                    grads.dv[[j, c]] = T::Acc::nan();
                }
            }
        }
    }
    grads
}

/// Turns row `i`'s scaled scores `row` into `P = exp(s + mask - lse)`, 0 at keys the
/// row does not read and everywhere for `lse = -inf` (a row with no key). With
/// `whole_sum` (a block of a larger call), `lse` is the row's maximum and
/// `P = exp(s + mask - max) / whole_sum`.
fn row_probabilities<T: Element>(
    ctx: &Context<'_, T>,
    b: usize,
    h: usize,
    i: usize,
    lse: T::Acc,
    whole_sum: Option<T::Acc>,
    row: &mut [T::Acc],
) {
    let zero = T::Acc::zero();
    let mut sum = zero;
    for (j, x) in row.iter_mut().enumerate() {
        *x = if lse == T::Acc::neg_infinity() || !ctx.reads_key(b, h, i, j) {
            zero
        } else {
            let add = match &ctx.mask {
                Broadcast::Additive(m) => m[[b, h, i, j]].to_acc(),
                Broadcast::None | Broadcast::Bool(_) => zero,
            };
            (*x + add - lse).exp()
        };
        sum = sum + *x;
    }
    if sum.is_nan() {
        // A NaN the row reads (or a NaN lse): NaN in every weight it reads, as the
        // forward fills the whole row.
        for (j, x) in row.iter_mut().enumerate() {
            if ctx.reads_key(b, h, i, j) {
                *x = T::Acc::nan();
            }
        }
    } else if let Some(whole) = whole_sum {
        // A row with no key anywhere (sum 0) keeps its zeros.
        if whole > zero {
            row.iter_mut().for_each(|x| *x = *x / whole);
        }
    } else if ctx.whole && sum > zero && sum.is_finite() {
        // lse arrives rounded to f32, which multiplies the whole row by `exp(error)`:
        // up to ~1e-7 relative, an f32 error in an f64 reference. The row sum is that
        // factor, so dividing by it leaves exactly softmax(s) in the accumulator type.
        row.iter_mut().for_each(|x| *x = *x / sum);
    }
}

/// Adds `ds [L, S]` of `(b, h)` into `dmask` at the entries it broadcasts from: the
/// mask's dims align with the trailing dims of `[B, Hq, L, S]`, and a dim of 1 there
/// collects every index of that axis.
fn reduce_into_mask<A: Accum>(dmask: &mut ArrayD<A>, ds: ArrayView2<'_, A>, [b, h]: [usize; 2]) {
    let rank = dmask.ndim();
    let shape = dmask.shape().to_vec();
    let lead = 4 - rank;
    let mut index = [0usize; 4];
    for ((i, j), &x) in ds.indexed_iter() {
        let full = [b, h, i, j];
        for d in 0..rank {
            index[d] = if shape[d] == 1 { 0 } else { full[lead + d] };
        }
        let slot = &mut dmask[&index[..rank]];
        *slot = *slot + x;
    }
}
