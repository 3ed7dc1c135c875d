//! The inputs of a case, drawn from [`INPUT_SEED`] through SplitMix64 in f64 and only
//! then rounded to the case dtype, so they are the same bytes on every machine.

use crate::cases::{Case, Fill, MaskPattern};
use crate::torch::kind;
use sdpa_core::hash::fnv1a;
use sdpa_core::rng::SplitMix64;
use sdpa_core::Causal;
use tch::{Device, Kind, Tensor};

/// Seed of every input; each case mixes in its name, so cases do not depend on order.
pub const INPUT_SEED: u64 = 0x5d9a_2011_0024_0001;

/// The generator of stream `stream` of the case named `name`: the FNV-1a of the name,
/// so each case has its own streams whatever the case order.
pub fn case_rng(name: &str, stream: u64) -> SplitMix64 {
    SplitMix64(INPUT_SEED ^ fnv1a(name.as_bytes()) ^ stream.wrapping_mul(0x9e37_79b9_7f4a_7c15))
}

/// Mean 0, variance 1 (Irwin-Hall of four uniforms): only +, -, *, so every machine
/// agrees, where a Box-Muller `ln`/`cos` could differ in the last bit.
pub fn normal(rng: &mut SplitMix64) -> f64 {
    let sum = rng.unit() + rng.unit() + rng.unit() + rng.unit();
    (sum - 2.0) * 1.732_050_807_568_877_2
}

pub fn tensor_f64(values: &[f64], shape: &[usize]) -> Tensor {
    let dims: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
    Tensor::from_slice(values).reshape(&dims)
}

/// The inputs of one case, in the case dtype, and what libtorch is handed.
pub struct Inputs {
    pub q: Tensor,
    pub k: Tensor,
    pub v: Tensor,
    /// The mask as stored in the case file (its broadcast shape).
    pub stored_mask: Option<Tensor>,
    /// The mask libtorch gets: the stored one combined with the causal mask, except
    /// top-left causal alone, which goes as `is_causal`.
    pub torch_mask: Option<Tensor>,
    pub is_causal_flag: bool,
    /// Keep-mask `[B, Hq, L, S]` of the spec's Philox stream, when dropout is active.
    pub dropout_mask: Option<Tensor>,
}

pub fn make_inputs(case: &Case) -> Inputs {
    let k_kind = kind(case.dtype);
    let mut rng = case_rng(&case.name, 0);
    // q and k of the large-value cases: 133120 everywhere (q, and k under `Large`) or
    // +-133120 at random (k under `LargeSigned`); v is always random.
    let mut draw = |n: usize, fill: Fill, is_key: bool| -> Vec<f64> {
        (0..n)
            .map(|_| match fill {
                Fill::Random => normal(&mut rng),
                Fill::LargeSigned if is_key && rng.next_u64() >> 63 == 1 => -133_120.0,
                Fill::Large | Fill::LargeSigned => 133_120.0,
            })
            .collect()
    };
    let q_shape = [case.b, case.hq, case.l, case.e];
    let k_shape = [case.b, case.hkv, case.s, case.e];
    let v_shape = [case.b, case.hkv, case.s, case.ev];
    let q = draw(q_shape.iter().product(), case.fill, false);
    let k = draw(k_shape.iter().product(), case.fill, true);
    let v = draw(v_shape.iter().product(), Fill::Random, false);
    let q = tensor_f64(&q, &q_shape).to_kind(k_kind);
    let k = tensor_f64(&k, &k_shape).to_kind(k_kind);
    let v = tensor_f64(&v, &v_shape).to_kind(k_kind);

    let stored_mask = case.mask.as_ref().map(|spec| {
        let shape = spec.shape(case.b, case.hq, case.l, case.s);
        let mut rng = case_rng(&case.name, 1);
        // Length per (b, h) for key padding, drawn before the elements.
        let n_rows_outer: usize = shape.iter().rev().skip(2).product::<usize>().max(1);
        let pad_len: Vec<usize> = (0..n_rows_outer * 2)
            .map(|_| 1 + (rng.next_u64() % case.s as u64) as usize)
            .collect();
        let rank = shape.len();
        let cols = shape[rank - 1];
        let rows = if rank >= 2 { shape[rank - 2] } else { 1 };
        let total: usize = shape.iter().product();
        let mut values = Vec::with_capacity(total);
        for flat in 0..total {
            let j = flat % cols;
            let i = (flat / cols) % rows;
            let outer = flat / (cols * rows);
            let keep: Option<f64> = match spec.pattern {
                // None = masked out, Some(bias) = takes part with that additive bias.
                MaskPattern::Random { keep } => {
                    let u = rng.unit();
                    let bias = rng.unit() * 4.0 - 2.0;
                    (u < keep).then_some(bias)
                }
                MaskPattern::Bands => {
                    let bias = rng.unit() * 4.0 - 2.0;
                    let band = (j + 2 * case.s - (i % case.s)) % 9;
                    (band >= 3).then_some(bias)
                }
                MaskPattern::FullyMaskedRows => {
                    let bias = rng.unit() * 4.0 - 2.0;
                    let u = rng.unit();
                    (i % 3 != 1 && u < 0.8).then_some(bias)
                }
                MaskPattern::NegInfRow => {
                    let bias = rng.unit() * 4.0 - 2.0;
                    (i != 0).then_some(bias)
                }
                MaskPattern::KeyPadding => {
                    let len = pad_len[outer % pad_len.len()];
                    (j < len).then_some(0.0)
                }
            };
            values.push(match (spec.bool_mask, keep) {
                (true, Some(_)) => 1.0,
                (true, None) => 0.0,
                (false, Some(bias)) => bias,
                (false, None) => f64::NEG_INFINITY,
            });
        }
        let t = tensor_f64(&values, &shape);
        if spec.bool_mask {
            t.ne(0.0)
        } else {
            t.to_kind(k_kind)
        }
    });

    let (torch_mask, is_causal_flag) = torch_mask(case, stored_mask.as_ref());
    let dropout_mask = case.dropout.is_active().then(|| {
        let (b, hq, l, s) = (case.b, case.hq, case.l, case.s);
        let mut keep = vec![false; b * hq * l * s];
        for (row, chunk) in keep.chunks_mut(s).enumerate() {
            case.dropout.fill_keep_row((row * s) as u64, chunk);
        }
        Tensor::from_slice(&keep).reshape([b as i64, hq as i64, l as i64, s as i64])
    });

    Inputs {
        q,
        k,
        v,
        stored_mask,
        torch_mask,
        is_causal_flag,
        dropout_mask,
    }
}

/// `(torch_mask, is_causal_flag)`: the mask libtorch gets for a case whose stored mask
/// is `stored_mask` (the stored one combined with the causal mask, except top-left
/// causal alone, which goes as `is_causal`). An additive result is built from
/// `stored_mask` by tensor ops, so a gradient reaches it when it is a leaf.
pub fn torch_mask(case: &Case, stored_mask: Option<&Tensor>) -> (Option<Tensor>, bool) {
    let (l, s) = (case.l as i64, case.s as i64);
    let tril = |diagonal: i64| Tensor::ones([l, s], (Kind::Bool, Device::Cpu)).tril(diagonal);
    let causal_mask = match case.causal {
        Causal::None => None,
        Causal::TopLeft if stored_mask.is_none() => None,
        Causal::TopLeft => Some(tril(0)),
        Causal::BottomRight => Some(tril(s - l)),
    };
    let is_causal_flag = case.causal == Causal::TopLeft && stored_mask.is_none();
    let torch_mask = match (stored_mask, causal_mask) {
        (None, None) => None,
        (None, Some(c)) => Some(c),
        (Some(m), None) => Some(m.shallow_clone()),
        (Some(m), Some(c)) if m.kind() == Kind::Bool => Some(m.logical_and(&c)),
        (Some(m), Some(c)) => {
            let bias = Tensor::zeros([l, s], (m.kind(), Device::Cpu))
                .masked_fill(&c.logical_not(), f64::NEG_INFINITY);
            Some(m + bias)
        }
    };

    (torch_mask, is_causal_flag)
}

impl Inputs {
    /// The same inputs (and masks) upcast to f64.
    pub fn to_f64(&self) -> Inputs {
        let up = |t: &Tensor| t.to_kind(Kind::Double);
        let up_mask = |t: &Tensor| {
            if t.kind() == Kind::Bool {
                t.shallow_clone()
            } else {
                up(t)
            }
        };
        Inputs {
            q: up(&self.q),
            k: up(&self.k),
            v: up(&self.v),
            stored_mask: self.stored_mask.as_ref().map(up_mask),
            torch_mask: self.torch_mask.as_ref().map(up_mask),
            is_causal_flag: self.is_causal_flag,
            dropout_mask: self.dropout_mask.as_ref().map(Tensor::shallow_clone),
        }
    }

    /// `torch_mask` as an additive mask in the query dtype (bool false -> -inf), as
    /// `scaled_dot_product_attention` hands it to its math and CPU flash kernels.
    pub fn additive_mask(&self) -> Option<Tensor> {
        self.torch_mask.as_ref().map(|m| {
            if m.kind() == Kind::Bool {
                Tensor::zeros(m.size(), (self.q.kind(), m.device()))
                    .masked_fill(&m.logical_not(), f64::NEG_INFINITY)
            } else {
                m.shallow_clone()
            }
        })
    }

    pub fn to_device(&self, device: Device) -> Inputs {
        let mv = |t: &Tensor| t.to_device(device);
        Inputs {
            q: mv(&self.q),
            k: mv(&self.k),
            v: mv(&self.v),
            stored_mask: self.stored_mask.as_ref().map(mv),
            torch_mask: self.torch_mask.as_ref().map(mv),
            is_causal_flag: self.is_causal_flag,
            dropout_mask: self.dropout_mask.as_ref().map(mv),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The seeds and first words the committed goldens were drawn from (the first case
    /// of golden/manifest.json): a change here changes every golden byte.
    #[test]
    fn case_streams_are_the_committed_ones() {
        let name = "dtype_b2_h3_l17_s23_e32_f64";
        let mut inputs = case_rng(name, 0);
        assert_eq!(inputs.0, 0x385f_e05f_0011_236d);
        assert_eq!(inputs.next_u64(), 0x61af_6ac4_5e7b_8b5a);
        let mut mask = case_rng(name, 1);
        assert_eq!(mask.0, 0xa668_99e6_7f5b_5f78);
        assert_eq!(mask.next_u64(), 0x15b1_6990_1bef_4a99);
    }
}
