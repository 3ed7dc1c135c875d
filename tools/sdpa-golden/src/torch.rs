//! The libtorch calls: `scaled_dot_product_attention` and its siblings, and the CPU
//! results of a case.

use crate::cases::{Case, DType};
use crate::inputs::Inputs;
use crate::Result;
use tch::{Device, Kind, TchError, Tensor};

pub fn kind(dtype: DType) -> Kind {
    match dtype {
        DType::F64 => Kind::Double,
        DType::F32 => Kind::Float,
        DType::F16 => Kind::Half,
        DType::Bf16 => Kind::BFloat16,
    }
}

/// The arguments `scaled_dot_product_attention`, `_fused_sdp_choice` and
/// `_scaled_dot_product_attention_math` share, so each call site names them once.
pub struct Sdpa<'a> {
    pub q: &'a Tensor,
    pub k: &'a Tensor,
    pub v: &'a Tensor,
    pub mask: Option<&'a Tensor>,
    pub is_causal: bool,
    pub scale: Option<f64>,
    pub enable_gqa: bool,
}

impl<'a> Sdpa<'a> {
    /// A case's inputs with the mask libtorch's public entry point takes.
    pub fn of(case: &Case, x: &'a Inputs) -> Self {
        Sdpa {
            q: &x.q,
            k: &x.k,
            v: &x.v,
            mask: x.torch_mask.as_ref(),
            is_causal: x.is_causal_flag,
            scale: case.scale,
            enable_gqa: case.enable_gqa,
        }
    }

    /// `scaled_dot_product_attention` without dropout: the fused kernels' dropout uses
    /// libtorch's own RNG, which the spec's Philox stream cannot match.
    pub fn run(&self) -> std::result::Result<Tensor, TchError> {
        Tensor::f_scaled_dot_product_attention(
            self.q,
            self.k,
            self.v,
            self.mask,
            0.0,
            self.is_causal,
            self.scale,
            self.enable_gqa,
        )
    }

    /// Which backend [`Sdpa::run`] takes (`0` math, `1` flash on the CPU).
    pub fn fused_choice(&self) -> std::result::Result<i64, TchError> {
        Tensor::f_internal_fused_sdp_choice(
            self.q,
            self.k,
            self.v,
            self.mask,
            0.0,
            self.is_causal,
            self.scale,
            self.enable_gqa,
        )
    }

    /// `_scaled_dot_product_attention_math`, with an explicit keep-mask when `p > 0`.
    pub fn math(
        &self,
        p: f64,
        dropout_mask: Option<&Tensor>,
    ) -> std::result::Result<Tensor, TchError> {
        Tensor::f_internal_scaled_dot_product_attention_math(
            self.q,
            self.k,
            self.v,
            self.mask,
            p,
            self.is_causal,
            dropout_mask,
            self.scale,
            self.enable_gqa,
        )
        .map(|(out, _attn)| out)
    }
}

/// libtorch's math path, with the explicit dropout mask when dropout is active.
/// `_scaled_dot_product_attention_math` adds its `attn_mask` to the scores as it is (a
/// bool mask would add 1 and 0); `scaled_dot_product_attention` converts a bool mask to
/// 0 / -inf in the query dtype first, and so does this.
pub fn torch_math(case: &Case, x: &Inputs) -> std::result::Result<Tensor, TchError> {
    let p = if case.dropout.is_active() {
        case.dropout.p
    } else {
        0.0
    };
    let additive = x.additive_mask();
    let call = Sdpa {
        mask: additive.as_ref(),
        ..Sdpa::of(case, x)
    };
    call.math(p, x.dropout_mask.as_ref())
}

/// k or v with each kv head repeated for its query heads (GQA as PyTorch defines it).
pub fn expand_heads(case: &Case, t: &Tensor) -> Tensor {
    if case.hq == case.hkv {
        t.shallow_clone()
    } else {
        t.repeat_interleave_self_int((case.hq / case.hkv) as i64, 1, None)
    }
}

pub fn scale_of(case: &Case) -> f64 {
    case.scale.unwrap_or(1.0 / (case.e as f64).sqrt())
}

/// `(lse_f64, out_explicit)`: the f64 log-sum-exp of the masked scaled scores, and the
/// output composed step by step in f64 (softmax, rows with no key -> 0, keep-mask times
/// 1/(1-p), times v), which checks what the goldens rely on about libtorch's math path.
fn explicit_f64(case: &Case, x64: &Inputs) -> (Tensor, Tensor) {
    let k = expand_heads(case, &x64.k);
    let v = expand_heads(case, &x64.v);
    let mut scores = x64.q.matmul(&k.transpose(-2, -1)) * scale_of(case);
    if x64.is_causal_flag {
        let allowed =
            Tensor::ones([case.l as i64, case.s as i64], (Kind::Bool, Device::Cpu)).tril(0);
        scores = scores.masked_fill(&allowed.logical_not(), f64::NEG_INFINITY);
    }
    if let Some(m) = &x64.torch_mask {
        scores = if m.kind() == Kind::Bool {
            scores.masked_fill(&m.logical_not(), f64::NEG_INFINITY)
        } else {
            scores + m
        };
    }
    let lse = scores.logsumexp([-1], false);
    let mut attn = scores.softmax(-1, Kind::Double).nan_to_num(0.0, None, None);
    if let Some(keep) = &x64.dropout_mask {
        attn = attn.masked_fill(&keep.logical_not(), 0.0) * case.dropout.keep_scale();
    }
    (lse, attn.matmul(&v))
}

pub fn max_abs(t: &Tensor) -> f64 {
    t.abs().max().double_value(&[])
}

/// What one case produced on the CPU.
pub struct CpuResult {
    pub out: Tensor,
    pub out_f64: Tensor,
    pub lse: Option<Tensor>,
    pub lse_f64: Tensor,
    pub torch_backend: String,
}

pub fn run_cpu(case: &Case, x: &Inputs) -> Result<CpuResult> {
    let fail = |what: &str, e: TchError| format!("{}: {what}: {e}", case.name);
    let x64 = x.to_f64();
    let out_f64 = torch_math(case, &x64).map_err(|e| fail("math f64", e))?;

    let (out, torch_backend) = if case.dropout.is_active() {
        let out = torch_math(case, x).map_err(|e| fail("math", e))?;
        (out, "math_dropout_mask".to_owned())
    } else {
        let call = Sdpa::of(case, x);
        let choice = call
            .fused_choice()
            .map_err(|e| fail("_fused_sdp_choice", e))?;
        let out = call
            .run()
            .map_err(|e| fail("scaled_dot_product_attention", e))?;
        let backend = match choice {
            0 => "math",
            1 => "flash_attention_cpu",
            other => {
                return Err(format!(
                    "{}: CPU sdp choice: expected 0 (math) or 1 (flash), got {other}",
                    case.name
                ))
            }
        };
        (out, backend.to_owned())
    };

    // The CPU flash kernel returns the log-sum-exp; it has no GQA, so kv heads are
    // expanded first. Dropout does not change the log-sum-exp, so it runs without.
    let lse = Tensor::f_internal_scaled_dot_product_flash_attention_for_cpu(
        &x.q,
        &expand_heads(case, &x.k),
        &expand_heads(case, &x.v),
        0.0,
        x.is_causal_flag,
        x.additive_mask().as_ref(),
        case.scale,
    )
    .ok()
    .map(|(_, lse)| lse.to_kind(Kind::Float));

    let (lse_f64, out_explicit) = explicit_f64(case, &x64);
    // out_f64 is truth only if libtorch's math path means what the spec means: zero rows
    // where every key is masked, and dropout as keep * 1/(1-p) with our keep-mask.
    // Both round each score to within a few ulps of |score|; softmax turns that into a
    // relative error of the weights of the same size (it matters only for huge scores).
    let v_max = max_abs(&x64.v).max(1.0);
    let score_max = max_abs(&lse_f64.nan_to_num(0.0, 0.0, 0.0)).max(1.0);
    let gap = max_abs(&(&out_f64 - &out_explicit));
    let bound =
        v_max * case.dropout.keep_scale().max(1.0) * (1e-9 + 64.0 * f64::EPSILON * score_max);
    if gap.is_nan() || gap > bound {
        return Err(format!(
            "{}: libtorch's f64 math result differs from the explicit f64 composition by {gap:e} \
             (bound {bound:e}): the semantics the goldens rely on do not hold",
            case.name
        ));
    }
    Ok(CpuResult {
        out,
        out_f64,
        lse,
        lse_f64,
        torch_backend,
    })
}
