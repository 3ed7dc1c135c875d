//! The ring on threads equals the one-device call: f64 within the f64 preset,
//! f16/bf16 by the tolerance policy (within twice the one-device call's own error
//! against f64 truth, plus one rounding), forward and backward, over 1-8 ranks, both
//! shardings, uneven shards, causal both ways, window, softcap, ALiBi, dropout, GQA.

use half::{bf16, f16};
use ndarray::{Array4, ArrayD, ArrayView4, ArrayViewD, IxDyn};
use proptest::prelude::*;
use sdpa_core::rng::SplitMix64;
use sdpa_core::{Causal, Dropout, SdpaOptions, Window};
use sdpa_dist::{
    backward, forward, simulate_backward, simulate_forward, InProcess, Plan, Ring, RingMessage,
    Segment, Sharding,
};
use sdpa_harness::compare::compare_with;
use sdpa_harness::tolerance;
use sdpa_ref::{sdpa_backward_with_alibi, sdpa_with_alibi, Element, Gradients, Output};

#[derive(Debug, Clone)]
struct Spec {
    ranks: usize,
    sharding: Sharding,
    batch: usize,
    heads_kv: usize,
    group: usize,
    len_q: usize,
    /// `None`: self-attention (one plan); `Some(S)`: keys sharded by their own plan.
    len_kv: Option<usize>,
    head_dim: usize,
    head_dim_v: usize,
    options: SdpaOptions,
    alibi: bool,
    seed: u64,
}

impl Spec {
    fn len_kv(&self) -> usize {
        self.len_kv.unwrap_or(self.len_q)
    }

    fn ring(&self) -> Ring {
        let plan = |len| Plan::new(self.sharding, len, self.ranks).unwrap();
        match self.len_kv {
            None => Ring::self_attention(plan(self.len_q)),
            Some(s) => Ring::new(plan(self.len_q), plan(s)).unwrap(),
        }
    }
}

fn spec() -> impl Strategy<Value = Spec> {
    (
        (
            1usize..=8,
            prop_oneof![Just(Sharding::Contiguous), Just(Sharding::Zigzag)],
        ),
        (1usize..=2, 1usize..=2, 1usize..=3),
        (1usize..=24, prop::option::of(1usize..=24)),
        (1usize..=6, 1usize..=6),
        (
            prop_oneof![
                Just(Causal::None),
                Just(Causal::TopLeft),
                Just(Causal::BottomRight)
            ],
            prop_oneof![Just(0.0), Just(0.25)],
            prop::option::of((0i64..6, -1i64..3)),
            prop::option::of(0.5f64..3.0),
            prop::option::of(-1.5f64..1.5),
        ),
        any::<bool>(),
        any::<u64>(),
    )
        .prop_map(
            |(
                (ranks, sharding),
                (batch, heads_kv, group),
                (len_q, len_kv),
                (head_dim, head_dim_v),
                (causal, p, window, softcap, scale),
                alibi,
                seed,
            )| Spec {
                ranks,
                sharding,
                batch,
                heads_kv,
                group,
                len_q,
                len_kv,
                head_dim,
                head_dim_v,
                options: SdpaOptions {
                    causal,
                    dropout: Dropout::new(p, seed ^ 0x9e37, seed % 1000),
                    scale,
                    enable_gqa: group > 1,
                    window: window.map_or(Window::NONE, |(left, right)| Window { left, right }),
                    softcap,
                },
                alibi,
                seed,
            },
        )
}

/// The spec's inputs, drawn in f64 and rounded to `T` (so truth and every run see the
/// same values): q, k, v, dout and the ALiBi slopes.
struct Inputs<T> {
    q: Array4<T>,
    k: Array4<T>,
    v: Array4<T>,
    dout: Array4<T>,
    slopes: Option<ArrayD<f32>>,
}

fn inputs<T: Element>(spec: &Spec) -> Inputs<T> {
    let mut rng = SplitMix64(spec.seed);
    let mut draw = |shape: [usize; 4]| {
        Array4::from_shape_simple_fn(shape, || {
            T::from_acc(<T::Acc as sdpa_ref::Accum>::from_f64(rng.symmetric() * 1.5))
        })
    };
    let hq = spec.heads_kv * spec.group;
    let (l, s) = (spec.len_q, spec.len_kv());
    Inputs {
        q: draw([spec.batch, hq, l, spec.head_dim]),
        k: draw([spec.batch, spec.heads_kv, s, spec.head_dim]),
        v: draw([spec.batch, spec.heads_kv, s, spec.head_dim_v]),
        dout: draw([spec.batch, hq, l, spec.head_dim_v]),
        slopes: spec.alibi.then(|| {
            ArrayD::from_shape_fn(IxDyn(&[spec.batch, hq]), |i| {
                0.05 * (1 + i[0] + 2 * i[1]) as f32
            })
        }),
    }
}

fn widen<T: Element>(x: &Array4<T>) -> Array4<f64> {
    x.mapv(|v| num_traits::ToPrimitive::to_f64(&v.to_acc()).expect("a float widens"))
}

fn slopes(x: &Inputs<impl Element>) -> Option<ArrayViewD<'_, f32>> {
    x.slopes.as_ref().map(|s| s.view())
}

/// The one-device call, forward and backward.
fn one_device<T: Element>(x: &Inputs<T>, options: &SdpaOptions) -> (Output<T>, Gradients<T>) {
    let alibi = x
        .slopes
        .clone()
        .unwrap_or_else(|| ArrayD::zeros(IxDyn(&[x.q.dim().1])));
    let fwd = sdpa_with_alibi(
        x.q.view(),
        x.k.view(),
        x.v.view(),
        None,
        alibi.view(),
        options,
    )
    .unwrap();
    let grads = sdpa_backward_with_alibi(
        x.q.view(),
        x.k.view(),
        x.v.view(),
        fwd.out.view(),
        fwd.lse.view(),
        x.dout.view(),
        None,
        alibi.view(),
        options,
    )
    .unwrap();
    (fwd, grads)
}

/// The ring on threads, forward and backward (the backward from the ring's own out and
/// lse).
fn ring_run<T: Element>(
    ring: &Ring,
    x: &Inputs<T>,
    options: &SdpaOptions,
) -> (Output<T>, Gradients<T>) {
    let fwd =
        simulate_forward(ring, x.q.view(), x.k.view(), x.v.view(), slopes(x), options).unwrap();
    let grads = simulate_backward(
        ring,
        x.q.view(),
        x.k.view(),
        x.v.view(),
        fwd.out.view(),
        fwd.lse.view(),
        x.dout.view(),
        slopes(x),
        options,
    )
    .unwrap();
    (fwd, grads)
}

fn named<T: Element>(o: &Output<T>, g: &Gradients<T>) -> [(&'static str, Array4<f64>); 4] {
    [
        ("out", widen(&o.out)),
        ("dq", widen(&g.dq)),
        ("dk", widen(&g.dk)),
        ("dv", widen(&g.dv)),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn f64_ring_equals_the_one_device_call(spec in spec()) {
        let x = inputs::<f64>(&spec);
        let (fwd, grads) = one_device(&x, &spec.options);
        let (rfwd, rgrads) = ring_run(&spec.ring(), &x, &spec.options);
        for ((name, got), (_, want)) in named(&rfwd, &rgrads).iter().zip(named(&fwd, &grads).iter()) {
            let r = compare_with(got.view().into_dyn(), want.view().into_dyn(), Some(&tolerance::F64));
            prop_assert!(r.passes(), "{spec:?}: {name}: {r:?}");
        }
        for (g, w) in rfwd.lse.iter().zip(fwd.lse.iter()) {
            // Both are the f64 lse rounded to f32: equal, or one f32 ulp apart where the
            // f64 sums' orders straddle a rounding boundary.
            prop_assert!(g == w || (g - w).abs() <= f32::EPSILON * w.abs(), "{spec:?}: lse {g} vs {w}");
        }
    }

    #[test]
    fn half_ring_is_within_the_policy_of_the_one_device_call(spec in spec(), bf in any::<bool>()) {
        if bf {
            half_case::<bf16>(&spec)?;
        } else {
            half_case::<f16>(&spec)?;
        }
    }
}

/// Ring and one-device call in `T` against f64 truth on the same rounded inputs: the
/// ring's max error within twice the one-device call's plus one rounding at the
/// result's magnitude (the peer rule, with the one-device call as the peer).
fn half_case<T: Element>(spec: &Spec) -> Result<(), TestCaseError> {
    let x = inputs::<T>(spec);
    let truth_inputs = Inputs::<f64> {
        q: widen(&x.q),
        k: widen(&x.k),
        v: widen(&x.v),
        dout: widen(&x.dout),
        slopes: x.slopes.clone(),
    };
    let (tf, tg) = one_device(&truth_inputs, &spec.options);
    let (pf, pg) = one_device(&x, &spec.options);
    let (rf, rg) = ring_run(&spec.ring(), &x, &spec.options);
    let truth = named(&tf, &tg);
    for (((name, ring), (_, peer)), (_, truth)) in named(&rf, &rg)
        .iter()
        .zip(named(&pf, &pg).iter())
        .zip(truth.iter())
    {
        let ours = compare_with(ring.view().into_dyn(), truth.view().into_dyn(), None);
        let theirs = compare_with(peer.view().into_dyn(), truth.view().into_dyn(), None);
        let magnitude = if *name == "out" {
            1.0
        } else {
            truth.iter().fold(1.0f64, |m, x| m.max(x.abs()))
        };
        let bound =
            tolerance::PEER_FACTOR * theirs.max_abs + tolerance::peer_floor(T::DTYPE) * magnitude;
        prop_assert!(
            ours.max_abs <= bound,
            "{spec:?} {}: {name}: ring {} vs bound {bound} (one-device {})",
            T::DTYPE.name(),
            ours.max_abs,
            theirs.max_abs
        );
    }
    Ok(())
}

/// Eight ranks over a causal sequence with GQA and dropout, in every dtype: the case a
/// user of context parallel runs, beyond proptest's small shapes.
#[test]
fn eight_ranks_causal_zigzag_gqa_dropout() {
    let spec = Spec {
        ranks: 8,
        sharding: Sharding::Zigzag,
        batch: 1,
        heads_kv: 2,
        group: 2,
        len_q: 100,
        len_kv: None,
        head_dim: 16,
        head_dim_v: 16,
        options: SdpaOptions {
            causal: Causal::TopLeft,
            dropout: Dropout::new(0.1, 1234, 77),
            enable_gqa: true,
            ..Default::default()
        },
        alibi: false,
        seed: 42,
    };
    let x = inputs::<f64>(&spec);
    let (fwd, grads) = one_device(&x, &spec.options);
    let (rfwd, rgrads) = ring_run(&spec.ring(), &x, &spec.options);
    for ((name, got), (_, want)) in named(&rfwd, &rgrads).iter().zip(named(&fwd, &grads).iter()) {
        let r = compare_with(
            got.view().into_dyn(),
            want.view().into_dyn(),
            Some(&tolerance::F64),
        );
        assert!(r.passes(), "{name}: {r:?}");
    }
    // Dropout took effect (the same keep bits on every rank as on one device, or the
    // comparison above would fail): the result differs from the call without it.
    let plain = SdpaOptions {
        dropout: Dropout::NONE,
        ..spec.options
    };
    let (nodrop, _) = one_device(&x, &plain);
    assert!((&nodrop.out - &fwd.out).iter().any(|d| d.abs() > 1e-3));
    half_case::<bf16>(&spec).unwrap();
    half_case::<f16>(&spec).unwrap();
}

/// The work of each rank under causal masking: rows times keys of the blocks it does not
/// skip. Zigzag balances it; contiguous leaves the last rank with most of it.
#[test]
fn zigzag_balances_causal_work_and_skips_masked_blocks() {
    let options = SdpaOptions {
        causal: Causal::TopLeft,
        ..Default::default()
    };
    let work = |sharding| -> Vec<usize> {
        let ring = Ring::self_attention(Plan::new(sharding, 1024, 4).unwrap());
        (0..4)
            .map(|r| {
                let mut total = 0;
                for step in 0..4 {
                    let owner = (r + 4 - step) % 4;
                    for q in ring.queries().segments(r) {
                        for k in ring.keys().segments(owner) {
                            let frame = sdpa_ref::Frame {
                                query_offset: q.start,
                                key_offset: k.start,
                                len_q: 1024,
                                len_kv: 1024,
                            };
                            if !frame.is_masked_out(q.len, k.len, &options) {
                                total += q.len * k.len;
                            }
                        }
                    }
                }
                total
            })
            .collect()
    };
    let zigzag = work(Sharding::Zigzag);
    let contiguous = work(Sharding::Contiguous);
    let spread = |w: &[usize]| *w.iter().max().unwrap() as f64 / *w.iter().min().unwrap() as f64;
    assert!(spread(&zigzag) < 1.2, "zigzag {zigzag:?}");
    assert!(spread(&contiguous) > 3.0, "contiguous {contiguous:?}");
    // Skipping: contiguous rank 0 computes only its diagonal block.
    assert_eq!(contiguous[0], 256 * 256);
}

/// Explicit, uneven segments (a rank holding three pieces, one holding none).
#[test]
fn uneven_explicit_segments_equal_the_one_device_call() {
    let seg = |start, len| Segment { start, len };
    let plan = Plan::from_segments(
        30,
        vec![
            vec![seg(20, 10), seg(0, 3)],
            vec![],
            vec![seg(3, 1), seg(4, 9), seg(13, 7)],
        ],
    )
    .unwrap();
    let ring = Ring::self_attention(plan);
    let options = SdpaOptions {
        causal: Causal::BottomRight,
        window: Window { left: 7, right: 0 },
        enable_gqa: true,
        ..Default::default()
    };
    let spec = Spec {
        ranks: 3,
        sharding: Sharding::Zigzag,
        batch: 2,
        heads_kv: 1,
        group: 3,
        len_q: 30,
        len_kv: None,
        head_dim: 5,
        head_dim_v: 3,
        options,
        alibi: true,
        seed: 9,
    };
    let x = inputs::<f64>(&spec);
    let (fwd, grads) = one_device(&x, &options);
    let (rfwd, rgrads) = ring_run(&ring, &x, &options);
    for ((name, got), (_, want)) in named(&rfwd, &rgrads).iter().zip(named(&fwd, &grads).iter()) {
        let r = compare_with(
            got.view().into_dyn(),
            want.view().into_dyn(),
            Some(&tolerance::F64),
        );
        assert!(r.passes(), "{name}: {r:?}");
    }
}

#[test]
fn bad_calls_are_refused_by_name_and_a_failing_rank_ends_the_ring() {
    let ring = Ring::self_attention(Plan::new(Sharding::Zigzag, 12, 3).unwrap());
    let x = Array4::<f64>::from_elem((1, 4, 12, 8), 0.5);
    let kv = Array4::<f64>::from_elem((1, 3, 12, 8), 0.5);
    let options = SdpaOptions {
        enable_gqa: true,
        ..Default::default()
    };
    // What the one-device call says: 4 query heads over 3 kv heads.
    let e = simulate_forward(&ring, x.view(), kv.view(), kv.view(), None, &options)
        .unwrap_err()
        .to_string();
    let one = sdpa_ref::sdpa(x.view(), kv.view(), kv.view(), None, &options)
        .unwrap_err()
        .to_string();
    assert_eq!(e, one);
    // Whole tensors of another length than the plan's.
    let short = Array4::<f64>::zeros((1, 4, 11, 8));
    let e = simulate_forward(&ring, short.view(), x.view(), x.view(), None, &options)
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("query: expected 12 rows"), "{e}");
    // Plans over different rank counts.
    let e = Ring::new(
        Plan::new(Sharding::Zigzag, 12, 3).unwrap(),
        Plan::new(Sharding::Zigzag, 12, 2).unwrap(),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("keys") && e.contains("3 ranks"), "{e}");
    // One rank handed a shard of the wrong length: it names itself and the argument;
    // its neighbours report it leaving instead of waiting for ever.
    let shards: Vec<Array4<f64>> = (0..3)
        .map(|r| ring.queries().shard("query", x.view(), r).unwrap())
        .collect();
    let ends = InProcess::<RingMessage<f64>>::ring(3);
    let short = short.view();
    let results: Vec<String> = std::thread::scope(|scope| {
        let handles: Vec<_> = ends
            .into_iter()
            .enumerate()
            .map(|(rank, mut end)| {
                let ring = &ring;
                let shards = &shards;
                scope.spawn(move || {
                    let q: ArrayView4<'_, f64> = if rank == 1 {
                        short.slice(ndarray::s![.., .., ..3, ..])
                    } else {
                        shards[rank].view()
                    };
                    let kv = &shards[rank];
                    forward(
                        &mut end,
                        ring,
                        q,
                        kv.view(),
                        kv.view(),
                        None,
                        &SdpaOptions::default(),
                    )
                    .map(|_| ())
                    .unwrap_err()
                    .to_string()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(results[1].contains("rank 1's share"), "{results:?}");
    // Which neighbour each of the others saw leave first depends on timing.
    for r in [0, 2] {
        assert!(
            results[r].starts_with(&format!("rank {r}: rank ")),
            "{results:?}"
        );
        assert!(results[r].ends_with("hung up"), "{results:?}");
    }
    // A transport of another size than the plan.
    let mut alone = InProcess::<RingMessage<f64>>::ring(1).pop().unwrap();
    let e = forward(
        &mut alone,
        &ring,
        shards[0].view(),
        shards[0].view(),
        shards[0].view(),
        None,
        &SdpaOptions::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.starts_with("transport: expected a ring of 3 ranks"),
        "{e}"
    );
    // The backward's own arguments.
    let mut alone = InProcess::<RingMessage<f64>>::ring(1).pop().unwrap();
    let one = Ring::self_attention(Plan::new(Sharding::Zigzag, 12, 1).unwrap());
    let lse = ndarray::Array3::<f32>::zeros((1, 4, 11));
    let e = backward(
        &mut alone,
        &one,
        x.view(),
        x.view(),
        x.view(),
        x.view(),
        lse.view(),
        x.view(),
        None,
        &SdpaOptions::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(e.starts_with("lse: expected shape [1, 4, 12]"), "{e}");
}

/// What a neighbour delivers is checked, not trusted: a K/V shard of another shape than
/// this rank's own dims and the plan give is an error naming it, not a broadcast.
#[test]
fn a_shard_of_another_shape_from_a_neighbour_is_refused() {
    let ring = Ring::self_attention(Plan::new(Sharding::Contiguous, 8, 2).unwrap());
    let q = Array4::<f64>::from_elem((1, 1, 4, 3), 0.25);
    let v_wide = Array4::<f64>::from_elem((1, 1, 4, 5), 0.5);
    let v_one = Array4::<f64>::from_elem((1, 1, 4, 1), 0.5);
    let ends = InProcess::<RingMessage<f64>>::ring(2);
    let results: Vec<String> = std::thread::scope(|scope| {
        let handles: Vec<_> = ends
            .into_iter()
            .enumerate()
            .map(|(rank, mut end)| {
                let (ring, q) = (&ring, q.view());
                // Rank 1's values have Ev = 1: they would broadcast into rank 0's Ev = 5.
                let v = if rank == 0 {
                    v_wide.view()
                } else {
                    v_one.view()
                };
                scope.spawn(move || {
                    match forward(&mut end, ring, q, q, v, None, &SdpaOptions::default()) {
                        Ok(_) => "ok".to_string(),
                        Err(e) => e.to_string(),
                    }
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(
        results[0]
            .contains("rank 1's K/V shard with value rows of shape [1, 1, 4, 5], got [1, 1, 4, 1]"),
        "{results:?}"
    );
    assert!(
        results[1].contains("value rows of shape [1, 1, 4, 1], got [1, 1, 4, 5]"),
        "{results:?}"
    );
}

#[test]
fn slopes_sizes_and_frames_are_checked_before_anything_runs() {
    // Bad ALiBi slopes are the one-device call's error, also where no block would run.
    let ring = Ring::self_attention(Plan::new(Sharding::Zigzag, 0, 2).unwrap());
    let empty = Array4::<f64>::zeros((1, 2, 0, 4));
    let bad = ArrayD::<f32>::zeros(IxDyn(&[3]));
    let e = simulate_forward(
        &ring,
        empty.view(),
        empty.view(),
        empty.view(),
        Some(bad.view()),
        &SdpaOptions::default(),
    )
    .unwrap_err()
    .to_string();
    let one = sdpa_with_alibi(
        empty.view(),
        empty.view(),
        empty.view(),
        None,
        bad.view(),
        &SdpaOptions::default(),
    )
    .unwrap_err()
    .to_string();
    assert_eq!(e, one);
    // Rank counts a plan cannot hold.
    for ranks in [0, sdpa_dist::shard::MAX_RANKS + 1, usize::MAX] {
        let e = Plan::new(Sharding::Zigzag, 4, ranks)
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("ranks: expected 1 to 65536"), "{e}");
    }
    // A frame that cannot hold the call skips nothing (and does not overflow).
    let frame = sdpa_ref::Frame {
        query_offset: usize::MAX,
        key_offset: usize::MAX,
        len_q: 4,
        len_kv: 4,
    };
    let causal = SdpaOptions {
        causal: Causal::TopLeft,
        ..Default::default()
    };
    assert!(!frame.is_masked_out(usize::MAX, 2, &causal));
}
