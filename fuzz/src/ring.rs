//! `ring`: arbitrary sharding plans and small context-parallel calls through
//! `sdpa_dist`.
//!
//! Properties:
//! - `Plan::from_segments` never panics, and accepts exactly the segment lists an
//!   independent statement accepts (at least one rank; the non-empty segments hold each
//!   row of `0..len` once); an accepted plan shards and gathers a tensor back to itself;
//! - `Plan::new` (contiguous, zigzag) gives a valid plan for any length and 1-8 ranks;
//! - a ring call on a valid plan equals the one-device reference in f64 (forward and
//!   backward, within `tolerance::F64`), with causal, window, ALiBi, dropout, GQA,
//!   empty sequences and cross-attention (keys on their own plan) drawn at random; a call the one-device reference refuses is refused by the ring
//!   with the same error, and no rank waits for ever.

use arbitrary::{Arbitrary, Unstructured};
use ndarray::{Array4, ArrayD, IxDyn};
use sdpa_core::{Causal, Dropout, SdpaOptions, Window};
use sdpa_dist::{simulate_backward, simulate_forward, Plan, Ring, Segment, Sharding};
use sdpa_harness::compare::compare_with;
use sdpa_harness::tolerance;

#[derive(Debug, Clone, Arbitrary)]
struct Input {
    /// Sequence length (0 to 40) and ranks (1 to 8).
    len: u8,
    ranks: u8,
    /// 0: contiguous; 1: zigzag; otherwise the explicit segments below.
    mode: u8,
    /// (rank, start, len) of explicit segments.
    segments: Vec<(u8, u8, u8)>,
    /// Cross-attention: keys of this length (0 to 40), zigzag-sharded on their own plan.
    key_len: Option<u8>,
    /// B, Hkv, group, E, Ev (each small); query heads not divisible when `bad_heads`.
    dims: [u8; 5],
    bad_heads: bool,
    causal: u8,
    window: Option<(i8, i8)>,
    dropout: Option<(u8, u64)>,
    alibi: bool,
    seed: u64,
}

/// Whether `ranks` of segments form a plan of `0..len`, stated without `Plan`.
fn valid(len: usize, ranks: &[Vec<Segment>]) -> bool {
    if ranks.is_empty() {
        return false;
    }
    let mut held = vec![0u32; len];
    for seg in ranks.iter().flatten().filter(|s| s.len > 0) {
        for row in seg.start..seg.start + seg.len {
            match held.get_mut(row) {
                Some(h) => *h += 1,
                None => return false,
            }
        }
    }
    held.iter().all(|&h| h == 1)
}

fn values(seed: u64, shape: [usize; 4]) -> Array4<f64> {
    let mut rng = sdpa_core::rng::SplitMix64(seed);
    Array4::from_shape_simple_fn(shape, || rng.symmetric())
}

/// The fuzz target: panics when a property fails.
pub fn run(data: &[u8]) {
    let Ok(input) = Input::arbitrary(&mut Unstructured::new(data)) else {
        return;
    };
    let len = usize::from(input.len % 41);
    let ranks = usize::from(input.ranks % 8) + 1;
    let plan = match input.mode {
        0 | 1 => {
            let sharding = if input.mode == 0 {
                Sharding::Contiguous
            } else {
                Sharding::Zigzag
            };
            let plan = Plan::new(sharding, len, ranks)
                .unwrap_or_else(|e| panic!("Plan::new({sharding:?}, {len}, {ranks}): {e}"));
            assert_eq!(plan.ranks(), ranks);
            plan
        }
        _ => {
            let mut lists = vec![Vec::new(); ranks];
            for &(r, start, n) in &input.segments {
                lists[usize::from(r) % ranks].push(Segment {
                    start: usize::from(start),
                    len: usize::from(n),
                });
            }
            let want = valid(len, &lists);
            match Plan::from_segments(len, lists.clone()) {
                Ok(plan) => {
                    assert!(want, "accepted {lists:?} over {len} rows");
                    plan
                }
                Err(e) => {
                    assert!(!want, "refused {lists:?} over {len} rows: {e}");
                    return;
                }
            }
        }
    };
    assert_eq!(
        (0..plan.ranks()).map(|r| plan.local_len(r)).sum::<usize>(),
        len
    );
    let [b, hkv, group, e, ev] = input.dims.map(|d| usize::from(d % 3) + 1);
    let hq = hkv * group + usize::from(input.bad_heads && hkv > 1);
    let q = values(input.seed, [b, hq, len, e]);
    let len_kv = input.key_len.map_or(len, |n| usize::from(n % 41));
    let k = values(input.seed ^ 1, [b, hkv, len_kv, e]);
    let v = values(input.seed ^ 2, [b, hkv, len_kv, ev]);
    let dout = values(input.seed ^ 3, [b, hq, len, ev]);
    for (arg, x) in [("query", &q), ("grad_out", &dout)] {
        let shards: Vec<_> = (0..plan.ranks())
            .map(|r| {
                plan.shard(arg, x.view(), r)
                    .expect("shards of the plan's length")
            })
            .collect();
        let views: Vec<_> = shards.iter().map(|s| s.view()).collect();
        assert_eq!(&plan.gather(arg, &views).expect("gather"), x);
    }
    let options = SdpaOptions {
        causal: match input.causal % 3 {
            0 => Causal::None,
            1 => Causal::TopLeft,
            _ => Causal::BottomRight,
        },
        window: input.window.map_or(Window::NONE, |(l, r)| Window {
            left: i64::from(l % 8).max(-1),
            right: i64::from(r % 8).max(-1),
        }),
        dropout: input.dropout.map_or(Dropout::NONE, |(p, seed)| {
            Dropout::new(f64::from(p % 10) / 10.0, seed, seed >> 40)
        }),
        enable_gqa: true,
        ..Default::default()
    };
    let slopes = ArrayD::from_shape_fn(IxDyn(&[hq]), |i| 0.25 * (i[0] + 1) as f32);
    let alibi = input.alibi.then(|| slopes.view());
    let zero = ArrayD::<f32>::zeros(IxDyn(&[hq]));
    let one_slopes = alibi.clone().unwrap_or(zero.view());
    let ring = match input.key_len {
        None => Ring::self_attention(plan),
        Some(_) => Ring::new(
            plan,
            Plan::new(Sharding::Zigzag, len_kv, ranks).expect("1 to 8 ranks"),
        )
        .expect("plans over the same ranks"),
    };
    let one = sdpa_ref::sdpa_with_alibi(
        q.view(),
        k.view(),
        v.view(),
        None,
        one_slopes.clone(),
        &options,
    );
    let cp = simulate_forward(&ring, q.view(), k.view(), v.view(), alibi.clone(), &options);
    let (one, cp) = match (one, cp) {
        (Ok(one), Ok(cp)) => (one, cp),
        (Err(a), Err(b)) => {
            assert_eq!(b.to_string(), a.to_string());
            return;
        }
        (one, cp) => panic!("one device {:?}, ring {:?}", one.err(), cp.err()),
    };
    let check = |what: &str, got: &Array4<f64>, want: &Array4<f64>| {
        let r = compare_with(
            got.view().into_dyn(),
            want.view().into_dyn(),
            Some(&tolerance::F64),
        );
        assert!(r.passes(), "{what}: {r:?} ({options:?}, {ring:?})");
    };
    check("out", &cp.out, &one.out);
    let grads = sdpa_ref::sdpa_backward_with_alibi(
        q.view(),
        k.view(),
        v.view(),
        one.out.view(),
        one.lse.view(),
        dout.view(),
        None,
        one_slopes,
        &options,
    )
    .expect("the forward's call");
    let cp_grads = simulate_backward(
        &ring,
        q.view(),
        k.view(),
        v.view(),
        cp.out.view(),
        cp.lse.view(),
        dout.view(),
        alibi,
        &options,
    )
    .expect("the forward's call");
    check("dq", &cp_grads.dq, &grads.dq);
    check("dk", &cp_grads.dk, &grads.dk);
    check("dv", &cp_grads.dv, &grads.dv);
}
