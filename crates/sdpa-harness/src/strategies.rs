//! proptest strategies for SDPA problems whose shapes, masks and options agree.
//!
//! Dimensions are drawn first; `prop_flat_map` then draws a mask whose shape
//! broadcasts to exactly those dimensions, and options that fit them (GQA only when
//! the head counts allow it). Tensor contents come from a seeded generator, so a
//! failing case shrinks over its dimensions and replays exactly from its seed.

use crate::case::Case;
use crate::tensor::Tensor;
use ndarray::{Array4, ArrayD, IxDyn};
use proptest::prelude::*;
use sdpa_core::{Causal, DType, Dropout, SdpaOptions};

/// The proptest configuration of every property suite: `PROPTEST_CASES` cases (64 when
/// unset), proptest's defaults otherwise.
pub fn proptest_config() -> ProptestConfig {
    ProptestConfig {
        cases: proptest_cases(64),
        ..ProptestConfig::default()
    }
}

/// `PROPTEST_CASES` when set to a number, else `default` (the GPU suites, whose cases
/// cost device launches, pick their own defaults).
pub fn proptest_cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(default)
}

/// The workspace's one generator of tensor contents, re-exported so strategies and
/// their callers name it from here.
pub use sdpa_core::rng::SplitMix64;

/// The explicit mask of a generated problem.
#[derive(Debug, Clone, PartialEq)]
pub enum MaskSpec {
    /// No mask.
    None,
    /// Bool mask of `shape` (broadcastable), each element true with probability `keep`.
    Bool {
        /// Broadcastable shape, rank 0 to 4.
        shape: Vec<usize>,
        /// Probability of `true`.
        keep: f64,
    },
    /// Additive mask of `shape`, uniform in `[-2, 2)`, `-inf` with probability `neg_inf`.
    Additive {
        /// Broadcastable shape, rank 0 to 4.
        shape: Vec<usize>,
        /// Probability of `-inf`.
        neg_inf: f64,
    },
}

/// A generated SDPA problem: dimensions, mask, options and the seed of its contents.
#[derive(Debug, Clone, PartialEq)]
pub struct ProblemSpec {
    /// `B`.
    pub batch: usize,
    /// `Hkv`.
    pub heads_kv: usize,
    /// `Hq / Hkv` (1 unless GQA).
    pub group: usize,
    /// `L`.
    pub len_q: usize,
    /// `S`.
    pub len_kv: usize,
    /// `E`.
    pub head_dim: usize,
    /// `Ev`.
    pub head_dim_v: usize,
    /// Explicit mask.
    pub mask: MaskSpec,
    /// Causal, dropout, scale, GQA.
    pub options: SdpaOptions,
    /// Seed of q, k, v and mask contents.
    pub data_seed: u64,
}

/// q, k, v (f64, in `[-1, 1)`) and the mask of a spec.
#[derive(Debug, Clone)]
pub struct Inputs {
    /// `[B, Hq, L, E]`.
    pub q: Array4<f64>,
    /// `[B, Hkv, S, E]`.
    pub k: Array4<f64>,
    /// `[B, Hkv, S, Ev]`.
    pub v: Array4<f64>,
    /// Bool mask, if the spec has one.
    pub bool_mask: Option<ArrayD<bool>>,
    /// Additive mask, if the spec has one.
    pub additive_mask: Option<ArrayD<f64>>,
}

impl ProblemSpec {
    /// `Hq`.
    pub fn heads_q(&self) -> usize {
        self.heads_kv * self.group
    }

    /// A fixed small example: causal GQA (4 query heads on 2 kv heads) with a bool mask.
    pub fn small_example() -> Self {
        ProblemSpec {
            batch: 2,
            heads_kv: 2,
            group: 2,
            len_q: 17,
            len_kv: 23,
            head_dim: 16,
            head_dim_v: 8,
            mask: MaskSpec::Bool {
                shape: vec![2, 1, 17, 23],
                keep: 0.8,
            },
            options: SdpaOptions {
                causal: Causal::BottomRight,
                enable_gqa: true,
                ..Default::default()
            },
            data_seed: 42,
        }
    }

    /// Generates the contents (deterministic in `data_seed`).
    pub fn inputs(&self) -> Inputs {
        let mut rng = SplitMix64(self.data_seed);
        let mut fill = |shape: [usize; 4]| Array4::from_shape_simple_fn(shape, || rng.symmetric());
        let q = fill([self.batch, self.heads_q(), self.len_q, self.head_dim]);
        let k = fill([self.batch, self.heads_kv, self.len_kv, self.head_dim]);
        let v = fill([self.batch, self.heads_kv, self.len_kv, self.head_dim_v]);
        let (bool_mask, additive_mask) = match &self.mask {
            MaskSpec::None => (None, None),
            MaskSpec::Bool { shape, keep } => (
                Some(ArrayD::from_shape_simple_fn(IxDyn(shape), || {
                    rng.unit() < *keep
                })),
                None,
            ),
            MaskSpec::Additive { shape, neg_inf } => (
                None,
                Some(ArrayD::from_shape_simple_fn(IxDyn(shape), || {
                    if rng.unit() < *neg_inf {
                        f64::NEG_INFINITY
                    } else {
                        rng.symmetric() * 2.0
                    }
                })),
            ),
        };
        Inputs {
            q,
            k,
            v,
            bool_mask,
            additive_mask,
        }
    }

    /// The problem as a case with inputs rounded to `dtype`.
    pub fn to_case(&self, dtype: DType) -> Case {
        let x = self.inputs();
        let mask = match (x.bool_mask, x.additive_mask) {
            (Some(b), _) => Some(Tensor::Bool(b)),
            (_, Some(a)) => Some(Tensor::from_f64(&a, dtype)),
            _ => None,
        };
        Case::new(
            Tensor::from_f64(&x.q.into_dyn(), dtype),
            Tensor::from_f64(&x.k.into_dyn(), dtype),
            Tensor::from_f64(&x.v.into_dyn(), dtype),
            mask,
            self.options,
        )
    }
}

/// A mask shape that broadcasts to `[b, h, l, s]`: each axis full or 1, leading 1s
/// possibly dropped (rank 0 to 4), as PyTorch accepts.
pub fn broadcast_shape(target: [usize; 4]) -> impl Strategy<Value = Vec<usize>> {
    (proptest::array::uniform4(any::<bool>()), 0usize..=4).prop_map(move |(full, rank)| {
        let shape: Vec<usize> = (0..4)
            .map(|axis| if full[axis] { target[axis] } else { 1 })
            .collect();
        // Only leading axes of extent 1 may be dropped.
        let mut drop = 4 - rank;
        let mut start = 0;
        while drop > 0 && start < 4 && shape[start] == 1 {
            start += 1;
            drop -= 1;
        }
        shape[start..].to_vec()
    })
}

/// Options: causal alignment, dropout (p in `[0, 0.9]`), scale (default or in `[-2, 2]`).
pub fn options(enable_gqa: bool, with_dropout: bool) -> impl Strategy<Value = SdpaOptions> {
    let causal = prop_oneof![
        Just(Causal::None),
        Just(Causal::TopLeft),
        Just(Causal::BottomRight)
    ];
    let dropout = if with_dropout {
        prop_oneof![
            2 => Just(Dropout::NONE),
            1 => (0.0f64..0.9, any::<u64>(), any::<u64>()).prop_map(|(p, s, o)| Dropout::new(p, s, o)),
        ]
        .boxed()
    } else {
        Just(Dropout::NONE).boxed()
    };
    let scale = prop_oneof![Just(None), (-2.0f64..2.0).prop_map(Some)];
    (causal, dropout, scale).prop_map(move |(causal, dropout, scale)| SdpaOptions {
        causal,
        dropout,
        scale,
        enable_gqa,
        ..Default::default()
    })
}

/// Limits of generated problems.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest `L` and `S` (odd lengths and `L != S` are drawn freely below it).
    pub max_len: usize,
    /// Largest `E` and `Ev`.
    pub max_head_dim: usize,
    /// Whether to draw dropout.
    pub dropout: bool,
    /// Whether to draw explicit masks.
    pub masks: bool,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_len: 130,
            max_head_dim: 64,
            dropout: true,
            masks: true,
        }
    }
}

/// Consistent SDPA problems within `limits`.
pub fn problem_spec(limits: Limits) -> impl Strategy<Value = ProblemSpec> {
    let dims = (
        1usize..=2,
        1usize..=3,
        prop_oneof![3 => Just(1usize), 1 => 2usize..=4],
        1..=limits.max_len,
        1..=limits.max_len,
        1..=limits.max_head_dim,
        1..=limits.max_head_dim,
    );
    dims.prop_flat_map(
        move |(batch, heads_kv, group, len_q, len_kv, head_dim, head_dim_v)| {
            let target = [batch, heads_kv * group, len_q, len_kv];
            let mask = if limits.masks {
                prop_oneof![
                    Just(MaskSpec::None),
                    (broadcast_shape(target), 0.3f64..1.0)
                        .prop_map(|(shape, keep)| MaskSpec::Bool { shape, keep }),
                    (broadcast_shape(target), 0.0f64..0.5)
                        .prop_map(|(shape, neg_inf)| MaskSpec::Additive { shape, neg_inf }),
                ]
                .boxed()
            } else {
                Just(MaskSpec::None).boxed()
            };
            (mask, options(group > 1, limits.dropout), any::<u64>()).prop_map(
                move |(mask, options, data_seed)| ProblemSpec {
                    batch,
                    heads_kv,
                    group,
                    len_q,
                    len_kv,
                    head_dim,
                    head_dim_v,
                    mask,
                    options,
                    data_seed,
                },
            )
        },
    )
}
