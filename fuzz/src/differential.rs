//! `differential`: small consistent problems (the proptest strategies' ranges, lengths
//! and head dims up to 16), each run through the reference in f32, f16 or bf16 and
//! compared with the f64 reference on the same rounded inputs, within the dtype's
//! tolerance preset (`sdpa_harness::tolerance`); the lse within `judge::LSE`.

use arbitrary::{Arbitrary, Unstructured};
use sdpa_core::{Causal, DType, Dropout, SdpaOptions};
use sdpa_harness::compare::compare_with;
use sdpa_harness::strategies::{MaskSpec, ProblemSpec};
use sdpa_harness::{judge, run, tolerance};

#[derive(Debug, Clone, Arbitrary)]
struct Input {
    /// f32, f16 or bf16.
    dtype: u8,
    /// `B` (1-2), `Hkv` (1-2), group (1-3), `L`, `S`, `E`, `Ev` (1-16).
    dims: [u8; 7],
    /// 0 none, 1 bool, 2 additive.
    mask_kind: u8,
    /// Axes of the mask at full extent (others 1), and how many leading 1s to drop.
    mask_full: u8,
    mask_rank: u8,
    /// Bool: probability (/256) of `true`, from 0.3; additive: of `-inf`, below 0.5.
    mask_probability: u8,
    causal: u8,
    /// `p = x / 65536 * 0.9`, seed, offset.
    dropout: Option<(u16, u64, u64)>,
    /// `x / 16384`, in `[-2, 2)`.
    scale: Option<i16>,
    data_seed: u64,
}

impl Input {
    fn spec(&self) -> ProblemSpec {
        let d = self.dims.map(|x| x as usize);
        let group = 1 + d[2] % 3;
        let spec_dims = [
            1 + d[0] % 2,
            (1 + d[1] % 2) * group,
            1 + d[3] % 16,
            1 + d[4] % 16,
        ];
        let prob = self.mask_probability as f64 / 256.0;
        let shape = || {
            // A shape that broadcasts to [B, Hq, L, S], as strategies::broadcast_shape.
            let full: Vec<usize> = (0..4)
                .map(|axis| {
                    if self.mask_full >> axis & 1 == 1 {
                        spec_dims[axis]
                    } else {
                        1
                    }
                })
                .collect();
            let mut drop = 4 - self.mask_rank as usize % 5;
            let mut start = 0;
            while drop > 0 && start < 4 && full[start] == 1 {
                start += 1;
                drop -= 1;
            }
            full[start..].to_vec()
        };
        let mask = match self.mask_kind % 3 {
            0 => MaskSpec::None,
            1 => MaskSpec::Bool {
                shape: shape(),
                keep: 0.3 + 0.7 * prob,
            },
            _ => MaskSpec::Additive {
                shape: shape(),
                neg_inf: 0.5 * prob,
            },
        };
        ProblemSpec {
            batch: spec_dims[0],
            heads_kv: 1 + d[1] % 2,
            group,
            len_q: spec_dims[2],
            len_kv: spec_dims[3],
            head_dim: 1 + d[5] % 16,
            head_dim_v: 1 + d[6] % 16,
            mask,
            options: SdpaOptions {
                causal: match self.causal % 3 {
                    0 => Causal::None,
                    1 => Causal::TopLeft,
                    _ => Causal::BottomRight,
                },
                dropout: self.dropout.map_or(Dropout::NONE, |(p, seed, offset)| {
                    Dropout::new(p as f64 / 65536.0 * 0.9, seed, offset)
                }),
                scale: self.scale.map(|s| s as f64 / 16384.0),
                enable_gqa: group > 1,
            },
            data_seed: self.data_seed,
        }
    }
}

/// One fuzz input; panics on a violated property.
pub fn run(data: &[u8]) {
    let Ok(input) = Input::arbitrary_take_rest(Unstructured::new(data)) else {
        return;
    };
    let spec = input.spec();
    let dtype = [DType::F32, DType::F16, DType::BF16][input.dtype as usize % 3];
    let case = spec.to_case(dtype);
    let got = run::run_reference(&case).expect("generated problems are valid");
    let truth = run::run_reference_f64(&case).expect("generated problems are valid");
    let tol = tolerance::for_dtype(dtype);
    let out = compare_with(
        got.out.to_f64().view(),
        truth.out.to_f64().view(),
        Some(&tol),
    );
    assert!(out.passes(), "{dtype} out vs f64: {out}\n{spec:?}");
    let lse = compare_with(
        got.lse.mapv(f64::from).view(),
        truth.lse.mapv(f64::from).view(),
        Some(&judge::LSE),
    );
    assert!(lse.passes(), "{dtype} lse vs f64: {lse}\n{spec:?}");
}
