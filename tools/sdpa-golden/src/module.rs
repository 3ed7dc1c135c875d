//! Module goldens (`golden/module/`): the tutorial's `CausalSelfAttention` computed in
//! libtorch, `linear -> split -> view/transpose -> sdpa -> transpose/view -> linear`,
//! as the PyTorch module's `forward` does it, with random weights saved under the
//! state_dict names (`c_attn.weight`, `c_attn.bias`, `c_proj.weight`, `c_proj.bias`).
//!
//! Each case is `eval` or `train` with dropout 0 (so the result is deterministic), the
//! module's `is_causal` on or off: training applies the causal mask as configured, eval
//! applies none (the tutorial's module passes `is_causal=False` in eval). `out` is
//! libtorch's CPU result in the case dtype (every op in that dtype, as the module runs),
//! `out_f64` the truth: the same ops on the weights and input upcast to f64, attention
//! through libtorch's math path.
//!
//! Nested module cases are not made here (tch has no jagged nested tensors):
//! ci/golden_nested.py writes them into `golden/nested/` from torch.nested.

use crate::cases::DType;
use crate::inputs::{case_rng, normal};
use crate::torch::{kind, Sdpa};
use crate::{manifest, write, Result};
use sdpa_manifest::Manifest;
use std::path::Path;
use tch::{Kind, Tensor};

/// One module case.
pub struct ModuleCase {
    pub name: String,
    pub dtype: DType,
    pub b: usize,
    pub t: usize,
    pub e: usize,
    pub heads: usize,
    /// The module's `is_causal` flag.
    pub is_causal: bool,
    /// `train()` (true) or `eval()`.
    pub training: bool,
}

impl ModuleCase {
    /// Whether attention is causal in this mode.
    fn causal_applied(&self) -> bool {
        self.training && self.is_causal
    }
}

/// Every module case, in a fixed order: E = 32 over 4 heads (head dim 8), T = 13 (not
/// a tile multiple), in each dtype, mode and causal setting; and a wider one (E = 64
/// over 2 heads, head dim 32, T = 33) per dtype, trained causal.
pub fn all() -> Vec<ModuleCase> {
    let mut cases = Vec::new();
    for dtype in [DType::F32, DType::F16, DType::Bf16] {
        for training in [false, true] {
            for is_causal in [false, true] {
                let mode = if training { "train" } else { "eval" };
                let causal = if is_causal { "causal" } else { "noncausal" };
                cases.push(ModuleCase {
                    name: format!("module_{mode}_{causal}_b2_t13_e32_h4_{}", dtype.name()),
                    dtype,
                    b: 2,
                    t: 13,
                    e: 32,
                    heads: 4,
                    is_causal,
                    training,
                });
            }
        }
        cases.push(ModuleCase {
            name: format!("module_train_causal_b1_t33_e64_h2_{}", dtype.name()),
            dtype,
            b: 1,
            t: 33,
            e: 64,
            heads: 2,
            is_causal: true,
            training: true,
        });
    }
    cases
}

/// The module's weights and input, in f64 before rounding.
struct Drawn {
    x: Tensor,
    c_attn_weight: Tensor,
    c_attn_bias: Tensor,
    c_proj_weight: Tensor,
    c_proj_bias: Tensor,
}

fn draw(case: &ModuleCase) -> Drawn {
    let mut rng = case_rng(&case.name, 0);
    let (b, t, e) = (case.b, case.t, case.e);
    // Weights ~ N(0, 1/E) (nn.Linear's scale), biases ~ N(0, 0.1^2): q.k stays O(1).
    let w_scale = 1.0 / (e as f64).sqrt();
    let mut tensor = |shape: &[usize], scale: f64| {
        let n: usize = shape.iter().product();
        let values: Vec<f64> = (0..n).map(|_| normal(&mut rng) * scale).collect();
        let dims: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
        Tensor::from_slice(&values).reshape(&dims)
    };
    Drawn {
        x: tensor(&[b, t, e], 1.0),
        c_attn_weight: tensor(&[3 * e, e], w_scale),
        c_attn_bias: tensor(&[3 * e], 0.1),
        c_proj_weight: tensor(&[e, e], w_scale),
        c_proj_bias: tensor(&[e], 0.1),
    }
}

/// `CausalSelfAttention.forward` of the tutorial, in the weights' dtype; `math` sends
/// attention through libtorch's math path (for the f64 truth).
fn forward(case: &ModuleCase, w: &Drawn, math: bool) -> std::result::Result<Tensor, tch::TchError> {
    let (b, t, e, h) = (
        case.b as i64,
        case.t as i64,
        case.e as i64,
        case.heads as i64,
    );
    // tch has no fallible `view`; `reshape` of these tensors is the same view.
    let qkv = w.x.f_linear(&w.c_attn_weight, Some(&w.c_attn_bias))?;
    let parts = qkv.f_split(e, 2)?;
    let heads = |x: &Tensor| x.f_reshape([b, t, h, e / h])?.f_transpose(1, 2);
    let (q, k, v) = (heads(&parts[0])?, heads(&parts[1])?, heads(&parts[2])?);
    let call = Sdpa {
        q: &q,
        k: &k,
        v: &v,
        mask: None,
        is_causal: case.causal_applied(),
        scale: None,
        enable_gqa: false,
    };
    let y = if math {
        call.math(0.0, None)?
    } else {
        call.run()?
    };
    let y = y.f_transpose(1, 2)?.f_contiguous()?.f_reshape([b, t, e])?;
    y.f_linear(&w.c_proj_weight, Some(&w.c_proj_bias))
}

/// The gradients of `sum(forward(w) * dout)` with respect to `x` and the four weights
/// (libtorch's autograd through the module's ops; `math` as in [`forward`]), in the
/// order of [`GRADS`].
fn gradients(
    case: &ModuleCase,
    w: &Drawn,
    dout: &Tensor,
    math: bool,
) -> std::result::Result<Vec<Tensor>, tch::TchError> {
    let leaf = |t: &Tensor| t.detach().copy().set_requires_grad(true);
    let leaves = Drawn {
        x: leaf(&w.x),
        c_attn_weight: leaf(&w.c_attn_weight),
        c_attn_bias: leaf(&w.c_attn_bias),
        c_proj_weight: leaf(&w.c_proj_weight),
        c_proj_bias: leaf(&w.c_proj_bias),
    };
    let out = forward(case, &leaves, math)?;
    // d(sum(out * dout))/d(out) = dout exactly.
    let loss = (&out * dout).sum(None::<Kind>);
    Tensor::f_run_backward(
        &[&loss],
        &[
            &leaves.x,
            &leaves.c_attn_weight,
            &leaves.c_attn_bias,
            &leaves.c_proj_weight,
            &leaves.c_proj_bias,
        ],
        false,
        false,
    )
}

/// The stored names of the gradients (`dout` is the incoming one), and of their truths
/// with `_f64` appended.
const GRADS: [&str; 5] = [
    "dx",
    "c_attn.weight.grad",
    "c_attn.bias.grad",
    "c_proj.weight.grad",
    "c_proj.bias.grad",
];

fn metadata(case: &ModuleCase) -> Vec<(String, String)> {
    vec![
        ("name".to_owned(), case.name.clone()),
        ("heads".to_owned(), case.heads.to_string()),
        ("dropout".to_owned(), "0".to_owned()),
        ("is_causal".to_owned(), case.is_causal.to_string()),
        (
            "mode".to_owned(),
            if case.training { "train" } else { "eval" }.to_owned(),
        ),
        ("torch_backend".to_owned(), "cpu_module".to_owned()),
    ]
}

/// Writes `dir/NAME.safetensors` for every module case plus `dir/manifest.json`.
pub fn generate(cases: &[ModuleCase], dir: &Path, libtorch: &str) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let mut entries = Vec::new();
    let mut total = 0usize;
    for case in cases {
        crate::tick(&case.name);
        let fail = |what: &str, e: tch::TchError| format!("{}: {what}: {e}", case.name);
        let drawn = draw(case);
        let to = |t: &Tensor, k: Kind| t.to_kind(k);
        let k = kind(case.dtype);
        // The stored tensors are the f64 draws rounded to the case dtype; the truth runs
        // on those rounded values, upcast exactly.
        let rounded = Drawn {
            x: to(&drawn.x, k),
            c_attn_weight: to(&drawn.c_attn_weight, k),
            c_attn_bias: to(&drawn.c_attn_bias, k),
            c_proj_weight: to(&drawn.c_proj_weight, k),
            c_proj_bias: to(&drawn.c_proj_bias, k),
        };
        let up = Drawn {
            x: to(&rounded.x, Kind::Double),
            c_attn_weight: to(&rounded.c_attn_weight, Kind::Double),
            c_attn_bias: to(&rounded.c_attn_bias, Kind::Double),
            c_proj_weight: to(&rounded.c_proj_weight, Kind::Double),
            c_proj_bias: to(&rounded.c_proj_bias, Kind::Double),
        };
        let out = forward(case, &rounded, false).map_err(|e| fail("forward", e))?;
        let out_f64 = forward(case, &up, true).map_err(|e| fail("forward f64", e))?;
        // The incoming gradient, drawn from its own stream, rounded to the case dtype;
        // the truth's backward takes it upcast exactly.
        let dout = {
            let mut rng = case_rng(&case.name, 1);
            let n = case.b * case.t * case.e;
            let values: Vec<f64> = (0..n).map(|_| normal(&mut rng)).collect();
            Tensor::from_slice(&values)
                .reshape([case.b as i64, case.t as i64, case.e as i64])
                .to_kind(k)
        };
        let grads = gradients(case, &rounded, &dout, false).map_err(|e| fail("backward", e))?;
        let grads_f64 = gradients(case, &up, &to(&dout, Kind::Double), true)
            .map_err(|e| fail("backward f64", e))?;
        let truth_names: Vec<String> = GRADS.iter().map(|g| format!("{g}_f64")).collect();
        let mut tensors: Vec<(&str, &Tensor)> = vec![
            ("x", &rounded.x),
            ("c_attn.weight", &rounded.c_attn_weight),
            ("c_attn.bias", &rounded.c_attn_bias),
            ("c_proj.weight", &rounded.c_proj_weight),
            ("c_proj.bias", &rounded.c_proj_bias),
            ("out", &out),
            ("out_f64", &out_f64),
            ("dout", &dout),
        ];
        for (i, name) in GRADS.iter().enumerate() {
            tensors.push((name, &grads[i]));
            tensors.push((&truth_names[i], &grads_f64[i]));
        }
        let file = format!("{}.safetensors", case.name);
        let bytes = write::case_file(&dir.join(&file), &tensors, &metadata(case))?;
        total += bytes;
        entries.push(sdpa_manifest::Case::Module(sdpa_manifest::ModuleCase {
            b: case.b,
            bytes,
            causal_applied: case.causal_applied(),
            dropout: 0.0,
            dtype: case.dtype.name().to_owned(),
            e: case.e,
            file,
            heads: case.heads,
            is_causal: case.is_causal,
            mode: if case.training { "train" } else { "eval" }.to_owned(),
            name: case.name.clone(),
            t: case.t,
        }));
    }
    let count = entries.len();
    manifest::write(
        dir,
        &Manifest {
            case_count: Some(count),
            cases: Some(entries),
            metadata: Some(
                "name, heads, dropout (0), is_causal (the module's flag), mode (train or eval)"
                    .into(),
            ),
            module: Some(
                "the tutorial's CausalSelfAttention: c_attn = Linear(E, 3E), split into q, k, v, \
                 view [B, T, H, E/H] and transpose to [B, H, T, E/H], scaled_dot_product_attention \
                 (is_causal = training and is_causal; dropout 0), transpose back, view [B, T, E], \
                 c_proj = Linear(E, E)"
                    .into(),
            ),
            tensors: Some(manifest::tensors(&[
                ("x", "[B, T, E] in the case dtype"),
                ("c_attn.weight, c_attn.bias, c_proj.weight, c_proj.bias", "the state_dict, in the case dtype ([3E, E], [3E], [E, E], [E])"),
                ("out", "libtorch CPU, every op in the case dtype"),
                ("out_f64", "truth: the same ops on the stored tensors upcast to f64, attention through _scaled_dot_product_attention_math"),
                ("dout", "the incoming gradient [B, T, E] in the case dtype"),
                ("dx, c_attn.weight.grad, c_attn.bias.grad, c_proj.weight.grad, c_proj.bias.grad", "libtorch CPU autograd of sum(out * dout), every op in the case dtype"),
                ("dx_f64, c_attn.weight.grad_f64, ...", "truth: the same autograd on the upcast tensors (math attention), f64"),
            ])),
            total_bytes: Some(total),
            // As the committed manifest has it (byte for byte), though the crate moved.
            ..manifest::base(
                libtorch,
                "ci/golden.sh -> crates/sdpa-golden (src/module.rs), libtorch CPU",
            )
        },
    )?;
    eprintln!(
        "sdpa-golden: {count} module cases, {:.2} MB, into {}",
        total as f64 / 1e6,
        dir.display()
    );
    Ok(())
}
