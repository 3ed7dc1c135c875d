//! Ring attention on the CPU: each rank's share of the forward and the backward, and
//! the whole ring run on threads.
//!
//! Rank `r` holds its rows of `q` (and `out`, `lse`, `dout`) and of `k`, `v`. At step
//! `t` it holds the K/V shard of rank `r - t mod N`: it posts that shard to the next
//! rank, computes its queries against it block by block ([`sdpa_ref::blocks`], each
//! block at its global positions, blocks no query of which reads a key skipped), and
//! takes the next shard from the previous rank. The forward merges the blocks by their
//! row statistics (maximum and sum, [`sdpa_ref::blocks::merge`]);
//! the backward sends each shard's dK/dV accumulator after the shard (it is added to on
//! every rank) and, after `N` steps, each accumulator arrives back at its owner.

use crate::shard::Plan;
use crate::transport::{InProcess, Transport};
use crate::{DistError, Result};
use ndarray::{s, Array3, Array4, ArrayView3, ArrayView4, ArrayViewD, Zip};
use sdpa_core::{shape_text, SdpaError, SdpaOptions, TensorDesc};
use sdpa_ref::blocks::{self, Frame, Partial};
use sdpa_ref::{describe, Accum, Element, Gradients, Output};
use std::sync::Arc;

/// The sharding of a context-parallel call: `q` (with `out`, `lse`, `dout`, `dq`) by
/// one plan over `L`, `k` and `v` (with `dk`, `dv`) by another over `S`, over the same
/// ranks. Self-attention uses one plan for both.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ring {
    queries: Plan,
    keys: Plan,
}

impl Ring {
    /// Queries and keys sharded by the same plan.
    pub fn self_attention(plan: Plan) -> Self {
        Ring {
            queries: plan.clone(),
            keys: plan,
        }
    }

    /// Queries and keys by their own plans.
    ///
    /// # Errors
    /// Plans over different numbers of ranks.
    pub fn new(queries: Plan, keys: Plan) -> Result<Self> {
        if queries.ranks() != keys.ranks() {
            return Err(SdpaError::invalid(
                "keys",
                format!("a plan over {} ranks (the queries')", queries.ranks()),
                keys.ranks(),
            )
            .into());
        }
        Ok(Ring { queries, keys })
    }

    /// Ranks in the ring.
    pub fn ranks(&self) -> usize {
        self.queries.ranks()
    }

    /// The plan of `q`'s rows (and `out`'s, `lse`'s, `dout`'s, `dq`'s).
    pub fn queries(&self) -> &Plan {
        &self.queries
    }

    /// The plan of `k`'s and `v`'s rows (and `dk`'s, `dv`'s).
    pub fn keys(&self) -> &Plan {
        &self.keys
    }

    /// The blocks rank `rank` computes against rank `owner`'s K/V shard: each pair of
    /// a segment of its queries and one of `owner`'s keys that some query reads, with
    /// their rows in the two shards and their frame.
    fn blocks(&self, rank: usize, owner: usize, options: &SdpaOptions) -> Vec<Block> {
        let mut blocks = Vec::new();
        for (n, (seg, rows)) in self.queries.local_segments(rank).enumerate() {
            for (kseg, keys) in self.keys.local_segments(owner) {
                let frame = Frame {
                    query_offset: seg.start,
                    key_offset: kseg.start,
                    len_q: self.queries.len(),
                    len_kv: self.keys.len(),
                };
                if !frame.is_masked_out(seg.len, kseg.len, options) {
                    blocks.push(Block {
                        segment: n,
                        rows: rows.clone(),
                        keys,
                        frame,
                    });
                }
            }
        }
        blocks
    }
}

/// One block of a ring step: query segment `segment` of the rank (its `rows` in the
/// rank's shard) against the `keys` of the K/V shard it holds, at `frame`.
struct Block {
    segment: usize,
    rows: std::ops::Range<usize>,
    keys: std::ops::Range<usize>,
    frame: Frame,
}

/// A K/V shard travelling the ring, with the rank it belongs to.
#[derive(Debug)]
pub struct KvShard<T> {
    owner: usize,
    k: Array4<T>,
    v: Array4<T>,
}

impl<T> KvShard<T> {
    /// Rank `owner`'s K/V shard (for a transport that rebuilds what it received).
    pub fn new(owner: usize, k: Array4<T>, v: Array4<T>) -> Self {
        KvShard { owner, k, v }
    }

    /// The rank it belongs to.
    pub fn owner(&self) -> usize {
        self.owner
    }

    /// Its keys, `[B, Hkv, S_owner, E]`.
    pub fn k(&self) -> &Array4<T> {
        &self.k
    }

    /// Its values, `[B, Hkv, S_owner, Ev]`.
    pub fn v(&self) -> &Array4<T> {
        &self.v
    }
}

/// A K/V shard's gradient accumulators travelling the ring after it.
#[derive(Debug)]
pub struct GradShard<A> {
    owner: usize,
    dk: Array4<A>,
    dv: Array4<A>,
}

impl<A> GradShard<A> {
    /// The accumulators of rank `owner`'s K/V shard.
    pub fn new(owner: usize, dk: Array4<A>, dv: Array4<A>) -> Self {
        GradShard { owner, dk, dv }
    }

    /// The rank whose shard they belong to.
    pub fn owner(&self) -> usize {
        self.owner
    }

    /// `dk` so far, `[B, Hkv, S_owner, E]`.
    pub fn dk(&self) -> &Array4<A> {
        &self.dk
    }

    /// `dv` so far, `[B, Hkv, S_owner, Ev]`.
    pub fn dv(&self) -> &Array4<A> {
        &self.dv
    }
}

/// What ranks send each other: a K/V shard (shared, it is only read), or the dK/dV of
/// one (owned, each rank adds to it).
#[derive(Debug)]
pub enum Message<T, A> {
    /// A K/V shard.
    Kv(Arc<KvShard<T>>),
    /// The gradients of a K/V shard.
    Grads(Box<GradShard<A>>),
}

/// What a rank's transport must carry for inputs of type `T`.
pub type RingMessage<T> = Message<T, <T as Element>::Acc>;

/// The whole call's problem, checked from a rank's shards: the errors of the one-device
/// call (dtypes, heads, GQA, head dims, dropout, scale, window, softcap) and a shard of
/// another length than the plan gives this rank.
fn check_call<T: Element>(
    ring: &Ring,
    rank: usize,
    q: &ArrayView4<'_, T>,
    k: &ArrayView4<'_, T>,
    v: &ArrayView4<'_, T>,
    alibi: Option<&ArrayViewD<'_, f32>>,
    options: &SdpaOptions,
) -> Result<()> {
    ring.queries.check_rank(rank)?;
    for (arg, len, plan) in [
        ("query", q.dim().2, &ring.queries),
        ("key", k.dim().2, &ring.keys),
        ("value", v.dim().2, &ring.keys),
    ] {
        if len != plan.local_len(rank) {
            return Err(SdpaError::invalid(
                arg,
                format!(
                    "{} rows along the sequence (rank {rank}'s share of the plan)",
                    plan.local_len(rank)
                ),
                len,
            )
            .into());
        }
    }
    let whole = |view: &ArrayView4<'_, T>, len: usize| {
        let mut desc: TensorDesc = describe(view);
        desc.layout = sdpa_core::Layout::contiguous([
            desc.layout.shape[0],
            desc.layout.shape[1],
            len,
            desc.layout.shape[3],
        ]);
        desc
    };
    let problem = sdpa_core::Problem::new(
        &whole(q, ring.queries.len()),
        &whole(k, ring.keys.len()),
        &whole(v, ring.keys.len()),
        None,
        options,
    )?;
    if let Some(slopes) = alibi {
        sdpa_core::check_alibi_slopes(
            slopes.shape(),
            slopes.iter(),
            problem.batch,
            problem.heads_q,
        )?;
    }
    Ok(())
}

fn wrong_message<T, A>(rank: usize, want: &str, got: &Message<T, A>) -> DistError {
    let got = match got {
        Message::Kv(kv) => format!("rank {}'s K/V shard", kv.owner),
        Message::Grads(g) => format!("rank {}'s dK/dV", g.owner),
    };
    DistError::Transport {
        rank,
        what: format!("expected {want} from the previous rank, got {got}"),
    }
}

/// Checks what arrived against the ring: the owner this step's shard must have, and
/// the shape its keys must have (the plan's rows of that owner, this rank's own B,
/// Hkv, E and Ev), so that a transport delivering something else is an error, not a
/// broadcast or a panic.
fn check_shard<X>(
    rank: usize,
    what: &str,
    owner: usize,
    want_owner: usize,
    [k, v]: [&Array4<X>; 2],
    [k_want, v_want]: [[usize; 4]; 2],
) -> Result<()> {
    if owner != want_owner {
        return Err(DistError::Transport {
            rank,
            what: format!("expected the {what} of rank {want_owner}, got rank {owner}'s"),
        });
    }
    for (arg, got, want) in [("key", k.shape(), k_want), ("value", v.shape(), v_want)] {
        if got != want {
            return Err(DistError::Transport {
                rank,
                what: format!(
                    "expected rank {owner}'s {what} with {arg} rows of shape {}, got {}",
                    shape_text(&want),
                    shape_text(got)
                ),
            });
        }
    }
    Ok(())
}

/// The shapes rank `owner`'s K/V shard (or its dK/dV) has: the plan's rows of that
/// owner, and B, Hkv, E, Ev of this rank's own `k` `[B, Hkv, _, E]` and `v`.
fn shard_shapes(ring: &Ring, owner: usize, k: &[usize], v: &[usize]) -> [[usize; 4]; 2] {
    let len = ring.keys.local_len(owner);
    [[k[0], k[1], len, k[3]], [v[0], v[1], len, v[3]]]
}

/// One pass of K/V round the ring: this rank's queries against every shard, merged, a
/// partial result per segment of its queries.
fn forward_pass<T: Element, Tr: Transport<RingMessage<T>>>(
    transport: &mut Tr,
    ring: &Ring,
    q: ArrayView4<'_, T>,
    own: Arc<KvShard<T>>,
    alibi: Option<ArrayViewD<'_, f32>>,
    options: &SdpaOptions,
) -> Result<Vec<Option<Partial<T::Acc>>>> {
    let (rank, n) = (transport.rank(), ring.ranks());
    let mut merged: Vec<Option<Partial<T::Acc>>> = vec![None; ring.queries.segments(rank).len()];
    let (k_dims, v_dims) = (own.k.shape().to_vec(), own.v.shape().to_vec());
    let mut current = own;
    for step in 0..n {
        let owner = (rank + n - step) % n;
        let want = shard_shapes(ring, owner, &k_dims, &v_dims);
        check_shard(
            rank,
            "K/V shard",
            current.owner,
            owner,
            [&current.k, &current.v],
            want,
        )?;
        if step + 1 < n {
            transport.send_next(Message::Kv(Arc::clone(&current)))?;
        }
        for block in ring.blocks(rank, owner, options) {
            let part = blocks::partial(
                q.slice(s![.., .., block.rows.clone(), ..]),
                current.k.slice(s![.., .., block.keys.clone(), ..]),
                current.v.slice(s![.., .., block.keys, ..]),
                alibi.clone(),
                options,
                block.frame,
            )?;
            let acc = &mut merged[block.segment];
            *acc = Some(match acc.take() {
                None => part,
                Some(prev) => blocks::merge(&[&prev, &part])?,
            });
        }
        if step + 1 < n {
            current = match transport.recv_prev()? {
                Message::Kv(kv) => kv,
                other => return Err(wrong_message(rank, "a K/V shard", &other)),
            };
        }
    }
    Ok(merged)
}

/// This rank's queries' partial result over every key (`[B, Hq, L_r, Ev]` and the row
/// statistics), from that of each of its segments (a segment that read no key stays
/// empty).
fn assemble<A: Accum>(
    ring: &Ring,
    rank: usize,
    dims: [usize; 3],
    merged: Vec<Option<Partial<A>>>,
) -> Partial<A> {
    let [batch, heads, width] = dims;
    let len = ring.queries.local_len(rank);
    let mut out = Array4::<A>::zeros((batch, heads, len, width));
    let mut max = Array3::<A>::from_elem((batch, heads, len), A::neg_infinity());
    let mut sum = Array3::<A>::zeros((batch, heads, len));
    for ((_, local), part) in ring.queries.local_segments(rank).zip(merged) {
        if let Some(part) = part {
            let (o, m, s_) = part.into_parts();
            out.slice_mut(s![.., .., local.clone(), ..]).assign(&o);
            max.slice_mut(s![.., .., local.clone()]).assign(&m);
            sum.slice_mut(s![.., .., local]).assign(&s_);
        }
    }
    Partial::new(out, max, sum).expect("one row statistic a row of out")
}

/// Rank `transport.rank()`'s share of the context-parallel forward: its rows of `out`
/// (in `T`, rounded once) and `lse` (f32), given its shards of `q`, `k`, `v`. Every
/// rank calls it at once with the same `ring`, `alibi_slopes` and `options`.
///
/// The result equals the one-device [`sdpa_ref::sdpa_with_alibi`] on the whole tensors:
/// causal (either alignment), window, softcap, ALiBi and dropout are taken at each
/// element's global position, dropout included (the same keep bits). No `attn_mask`:
/// a mask would have to be sharded in two dimensions; varlen and key padding are ways
/// round that this crate does not offer yet.
///
/// # Errors
/// What the one-device call rejects (named as there), a shard whose length is not the
/// plan's, and a broken ring.
pub fn forward<T: Element, Tr: Transport<RingMessage<T>>>(
    transport: &mut Tr,
    ring: &Ring,
    q: ArrayView4<'_, T>,
    k: ArrayView4<'_, T>,
    v: ArrayView4<'_, T>,
    alibi_slopes: Option<ArrayViewD<'_, f32>>,
    options: &SdpaOptions,
) -> Result<Output<T>> {
    let (rank, own) = start(
        transport,
        ring,
        [&q.view(), &k.view(), &v.view()],
        alibi_slopes.as_ref(),
        options,
    )?;
    let merged = forward_pass(transport, ring, q.view(), own, alibi_slopes, options)?;
    let (batch, heads, _, _) = q.dim();
    let (out, lse) = assemble(ring, rank, [batch, heads, v.dim().3], merged).finish();
    Ok(Output {
        out: out.mapv(T::from_acc),
        lse: lse.mapv(Accum::to_f32),
    })
}

/// What every rank does first: the transport and the call checked against the ring,
/// and this rank's K/V shard made the ring's first message.
fn start<T: Element, M, Tr: Transport<M>>(
    transport: &Tr,
    ring: &Ring,
    [q, k, v]: [&ArrayView4<'_, T>; 3],
    alibi: Option<&ArrayViewD<'_, f32>>,
    options: &SdpaOptions,
) -> Result<(usize, Arc<KvShard<T>>)> {
    check_transport(transport, ring)?;
    let rank = transport.rank();
    check_call(ring, rank, q, k, v, alibi, options)?;
    Ok((
        rank,
        Arc::new(KvShard::new(rank, k.to_owned(), v.to_owned())),
    ))
}

fn check_transport<M, Tr: Transport<M>>(transport: &Tr, ring: &Ring) -> Result<()> {
    if transport.ranks() != ring.ranks() {
        return Err(SdpaError::invalid(
            "transport",
            format!("a ring of {} ranks (the plan's)", ring.ranks()),
            transport.ranks(),
        )
        .into());
    }
    Ok(())
}

/// Rank `transport.rank()`'s share of the context-parallel backward: its rows of `dq`
/// and its shard's `dk`, `dv`, given its shards of `q`, `k`, `v`, of the forward's
/// `out` and `lse`, and of `dout`. Every rank calls it at once with the forward's
/// `ring`, `alibi_slopes` and `options` (dropout replays the forward's keep bits).
///
/// An infinite entry of `q` or `k` gives NaN in `dq` wherever a block multiplies it by
/// 0 (PyTorch's `dS k`, which the one-device reference follows, is NaN in every row of
/// `dq` then); the ring skips blocks no query reads, so there the NaN reaches only the
/// rows of the blocks it computes. Finite inputs, and NaN (which the reference keeps
/// out of rows that do not read it), give the one-device result.
///
/// Like the one-device reference, which takes `D = rowsum(dout * out)` as
/// `rowsum(P * dP)` and renormalises `P` rather than trust the f32 `lse`, the ring does
/// not read `out` and `lse` (it checks their shapes): it first runs the forward's pass
/// round the ring again, keeping `out` and `lse` in the accumulation type, and takes
/// `D` and `P` from those. Without that, an f64 call's gradients would carry the f32
/// rounding of `lse` (~1e-8) and a half call's the rounding of `out` in `D`. A fused
/// GPU ring would take both from its arguments, as FlashAttention's backward does.
///
/// # Errors
/// As [`forward`], and `out`, `lse` or `dout` of a shape other than this rank's share.
#[allow(clippy::too_many_arguments)]
pub fn backward<T: Element, Tr: Transport<RingMessage<T>>>(
    transport: &mut Tr,
    ring: &Ring,
    q: ArrayView4<'_, T>,
    k: ArrayView4<'_, T>,
    v: ArrayView4<'_, T>,
    out: ArrayView4<'_, T>,
    lse: ArrayView3<'_, f32>,
    dout: ArrayView4<'_, T>,
    alibi_slopes: Option<ArrayViewD<'_, f32>>,
    options: &SdpaOptions,
) -> Result<Gradients<T>> {
    let (rank, own) = start(
        transport,
        ring,
        [&q.view(), &k.view(), &v.view()],
        alibi_slopes.as_ref(),
        options,
    )?;
    let (batch, heads, len, _) = q.dim();
    let out_shape = [batch, heads, len, v.dim().3];
    for (arg, want, got) in [
        ("out", &out_shape[..], out.shape()),
        ("grad_out", &out_shape[..], dout.shape()),
        ("lse", &out_shape[..3], lse.shape()),
    ] {
        if want != got {
            return Err(SdpaError::invalid(
                arg,
                format!("shape {} (rank {rank}'s share)", shape_text(want)),
                shape_text(got),
            )
            .into());
        }
    }
    // The forward again, unrounded: each row's max and sum (an f32 `lse` is too coarse
    // to take P from without renormalising, which a block cannot do) and
    // D = rowsum(dout * out) from the unrounded out, as the one-device reference takes
    // D from P.
    let merged = forward_pass(
        transport,
        ring,
        q.view(),
        Arc::clone(&own),
        alibi_slopes.clone(),
        options,
    )?;
    let exact = assemble(ring, rank, [batch, heads, v.dim().3], merged);
    let delta = blocks::delta::<T>(exact.finish().0.view(), dout)?;
    let (max, sum) = (exact.max(), exact.sum());
    let n = ring.ranks();
    let mut dq = Array4::<T::Acc>::zeros(q.raw_dim());
    let mut current = own;
    let mut grads = Box::new(GradShard::new(
        rank,
        Array4::zeros(k.raw_dim()),
        Array4::zeros(v.raw_dim()),
    ));
    let add = |x: &mut T::Acc, &y: &T::Acc| *x = *x + y;
    for step in 0..n {
        let owner = (rank + n - step) % n;
        let want = shard_shapes(ring, owner, k.shape(), v.shape());
        check_shard(
            rank,
            "K/V shard",
            current.owner,
            owner,
            [&current.k, &current.v],
            want,
        )?;
        check_shard(
            rank,
            "dK/dV",
            grads.owner,
            owner,
            [&grads.dk, &grads.dv],
            want,
        )?;
        if step + 1 < n {
            transport.send_next(Message::Kv(Arc::clone(&current)))?;
        }
        for block in ring.blocks(rank, owner, options) {
            let rows = s![.., .., block.rows.clone(), ..];
            let keys = s![.., .., block.keys.clone(), ..];
            let stats = s![.., .., block.rows.clone()];
            let g = blocks::partial_backward(
                q.slice(rows),
                current.k.slice(keys),
                current.v.slice(keys),
                dout.slice(rows),
                max.slice(stats),
                sum.slice(stats),
                delta.slice(stats),
                alibi_slopes.clone(),
                options,
                block.frame,
            )?;
            Zip::from(dq.slice_mut(rows)).and(&g.dq).for_each(add);
            Zip::from(grads.dk.slice_mut(keys)).and(&g.dk).for_each(add);
            Zip::from(grads.dv.slice_mut(keys)).and(&g.dv).for_each(add);
        }
        transport.send_next(Message::Grads(grads))?;
        if step + 1 < n {
            current = match transport.recv_prev()? {
                Message::Kv(kv) => kv,
                other => return Err(wrong_message(rank, "a K/V shard", &other)),
            };
        }
        grads = match transport.recv_prev()? {
            Message::Grads(g) => g,
            other => return Err(wrong_message(rank, "dK/dV", &other)),
        };
    }
    // After N steps each accumulator has visited every rank and come home.
    let want = shard_shapes(ring, rank, k.shape(), v.shape());
    check_shard(
        rank,
        "dK/dV",
        grads.owner,
        rank,
        [&grads.dk, &grads.dv],
        want,
    )?;
    Ok(Gradients {
        dq: dq.mapv(T::from_acc),
        dk: grads.dk.mapv(T::from_acc),
        dv: grads.dv.mapv(T::from_acc),
        dmask: None,
    })
}

/// Runs `f(rank, transport)` on one thread a rank over an [`InProcess`] ring and
/// returns each rank's result, or the error that stopped the ring (a rank's own error
/// rather than its neighbours' reports of it leaving).
fn on_threads<R: Send, M: Send>(
    ranks: usize,
    f: impl Fn(usize, &mut InProcess<M>) -> Result<R> + Sync,
) -> Result<Vec<R>> {
    let ends = InProcess::<M>::ring(ranks);
    let results: Vec<Result<R>> = std::thread::scope(|scope| {
        let handles: Vec<_> = ends
            .into_iter()
            .enumerate()
            .map(|(rank, mut end)| {
                let f = &f;
                scope.spawn(move || f(rank, &mut end))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
            })
            .collect()
    });
    if let Some(cause) = results
        .iter()
        .find_map(|r| r.as_ref().err().filter(|e| !e.is_hang_up()))
    {
        return Err(cause.clone());
    }
    results.into_iter().collect()
}

/// The whole context-parallel forward on `ring.ranks()` threads of this process (an
/// [`InProcess`] ring): `q`, `k`, `v` whole, sharded by `ring`, each rank's share run,
/// and `out`, `lse` gathered back. What CI checks the ring with, against the one-device
/// call.
///
/// # Errors
/// As [`forward`], and whole tensors whose lengths are not the plans'.
pub fn simulate_forward<T: Element>(
    ring: &Ring,
    q: ArrayView4<'_, T>,
    k: ArrayView4<'_, T>,
    v: ArrayView4<'_, T>,
    alibi_slopes: Option<ArrayViewD<'_, f32>>,
    options: &SdpaOptions,
) -> Result<Output<T>> {
    let shards = Shards::new(
        ring,
        &[("query", q.view())],
        &[("key", k.view()), ("value", v.view())],
    )?;
    let outputs = on_threads::<_, RingMessage<T>>(ring.ranks(), |rank, transport| {
        let [q] = shards.queries(rank);
        let [k, v] = shards.keys(rank);
        forward(transport, ring, q, k, v, alibi_slopes.clone(), options)
    })?;
    let outs: Vec<_> = outputs.iter().map(|o| o.out.view()).collect();
    let lses: Vec<_> = outputs
        .iter()
        .map(|o| o.lse.view().insert_axis(ndarray::Axis(3)))
        .collect();
    Ok(Output {
        out: ring.queries.gather("out", &outs)?,
        lse: ring
            .queries
            .gather("lse", &lses)?
            .remove_axis(ndarray::Axis(3)),
    })
}

/// The whole context-parallel backward on threads, as [`simulate_forward`] runs the
/// forward: whole tensors in (`out`, `lse` of the forward), whole `dq`, `dk`, `dv` out.
///
/// # Errors
/// As [`backward`], and whole tensors whose lengths are not the plans'.
#[allow(clippy::too_many_arguments)]
pub fn simulate_backward<T: Element>(
    ring: &Ring,
    q: ArrayView4<'_, T>,
    k: ArrayView4<'_, T>,
    v: ArrayView4<'_, T>,
    out: ArrayView4<'_, T>,
    lse: ArrayView3<'_, f32>,
    dout: ArrayView4<'_, T>,
    alibi_slopes: Option<ArrayViewD<'_, f32>>,
    options: &SdpaOptions,
) -> Result<Gradients<T>> {
    let shards = Shards::new(
        ring,
        &[
            ("query", q.view()),
            ("out", out.view()),
            ("grad_out", dout.view()),
        ],
        &[("key", k.view()), ("value", v.view())],
    )?;
    let lse = lse.insert_axis(ndarray::Axis(3));
    let lse_shards = (0..ring.ranks())
        .map(|r| ring.queries.shard("lse", lse.view(), r))
        .collect::<Result<Vec<_>>>()?;
    let grads = on_threads::<_, RingMessage<T>>(ring.ranks(), |rank, transport| {
        let [q, out, dout] = shards.queries(rank);
        let [k, v] = shards.keys(rank);
        let lse = lse_shards[rank].view().remove_axis(ndarray::Axis(3));
        backward(
            transport,
            ring,
            q,
            k,
            v,
            out,
            lse,
            dout,
            alibi_slopes.clone(),
            options,
        )
    })?;
    let gather = |arg, plan: &Plan, pick: fn(&Gradients<T>) -> &Array4<T>| {
        plan.gather(
            arg,
            &grads.iter().map(|g| pick(g).view()).collect::<Vec<_>>(),
        )
    };
    Ok(Gradients {
        dq: gather("dq", &ring.queries, |g| &g.dq)?,
        dk: gather("dk", &ring.keys, |g| &g.dk)?,
        dv: gather("dv", &ring.keys, |g| &g.dv)?,
        dmask: None,
    })
}

/// Every rank's shards of whole tensors: `Q` sharded by the query plan, `K` by the key
/// plan.
struct Shards<T, const Q: usize, const K: usize> {
    queries: Vec<[Array4<T>; Q]>,
    keys: Vec<[Array4<T>; K]>,
}

impl<T: Clone, const Q: usize, const K: usize> Shards<T, Q, K> {
    fn new(
        ring: &Ring,
        queries: &[(&'static str, ArrayView4<'_, T>); Q],
        keys: &[(&'static str, ArrayView4<'_, T>); K],
    ) -> Result<Self> {
        let cut = |plan: &Plan, rank: usize, (arg, x): &(&'static str, ArrayView4<'_, T>)| {
            plan.shard(arg, x.view(), rank)
        };
        let mut shards = Shards {
            queries: Vec::new(),
            keys: Vec::new(),
        };
        for rank in 0..ring.ranks() {
            let q: Vec<_> = queries
                .iter()
                .map(|x| cut(&ring.queries, rank, x))
                .collect::<Result<_>>()?;
            let k: Vec<_> = keys
                .iter()
                .map(|x| cut(&ring.keys, rank, x))
                .collect::<Result<_>>()?;
            shards
                .queries
                .push(q.try_into().map_err(|_| unreachable_len())?);
            shards
                .keys
                .push(k.try_into().map_err(|_| unreachable_len())?);
        }
        Ok(shards)
    }

    fn queries(&self, rank: usize) -> [ArrayView4<'_, T>; Q] {
        std::array::from_fn(|i| self.queries[rank][i].view())
    }

    fn keys(&self, rank: usize) -> [ArrayView4<'_, T>; K] {
        std::array::from_fn(|i| self.keys[rank][i].view())
    }
}

fn unreachable_len() -> DistError {
    SdpaError::invalid("shards", "one shard a tensor", "another count").into()
}
