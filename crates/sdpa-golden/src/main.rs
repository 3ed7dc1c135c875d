//! `sdpa-golden`: regenerates `golden/` through libtorch 2.11 (tch 0.24).
//!
//! For every case of [`cases::all`] it draws the inputs from a fixed seed (in Rust,
//! byte-stable), runs libtorch's CPU `scaled_dot_product_attention` in the case dtype
//! (`out`, the peer result of the 2x rule), libtorch's math path on the inputs upcast to
//! f64 (`out_f64`, truth), the log-sum-exp where libtorch returns one (`lse`) and the f64
//! log-sum-exp of the masked scaled scores (`lse_f64`), and writes one safetensors file
//! per case plus `manifest.json`. Run it through `ci/golden.sh`, which pins what makes
//! libtorch reproducible (one thread, MKL's CNR mode, one CPU code path).
//!
//! ```text
//! sdpa-golden [--out DIR] [--device cpu|cuda] [--only SUBSTRING] [--list]
//! ```
//! `--device cuda` (a binary built with `SDPA_GOLDEN_CUDA=1`, on a machine with a GPU
//! and torch 2.11's CUDA libraries) writes `DIR/cuda/`: for every f32/f16/bf16 case,
//! the result of each PyTorch CUDA backend that accepts it.

mod cases;
mod cuda;
mod module;
mod write;

use cases::{Case, DType, Fill, MaskPattern};
use sdpa_core::Causal;
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

/// Seed of every input; each case mixes in its name, so cases do not depend on order.
const INPUT_SEED: u64 = 0x5d9a_2011_0024_0001;

type Result<T> = std::result::Result<T, String>;

struct Args {
    out: PathBuf,
    device: String,
    only: Option<String>,
    list: bool,
}

fn parse_args() -> Result<Args> {
    let mut args = Args {
        out: PathBuf::from("golden"),
        device: "cpu".into(),
        only: None,
        list: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = |name: &str| it.next().ok_or(format!("{name} needs a value"));
        match arg.as_str() {
            "--out" => args.out = PathBuf::from(value("--out")?),
            "--device" => args.device = value("--device")?,
            "--only" => args.only = Some(value("--only")?),
            "--list" => args.list = true,
            "-h" | "--help" => {
                println!("sdpa-golden [--out DIR] [--device cpu|cuda] [--only SUBSTRING] [--list]");
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other:?} (try --help)")),
        }
    }
    if args.device != "cpu" && args.device != "cuda" {
        return Err(format!(
            "--device: expected cpu or cuda, got {:?}",
            args.device
        ));
    }
    Ok(args)
}

/// The environment that pins libtorch's CPU arithmetic. Thread counts and the MKL and
/// oneDNN modes are read when the libraries load, before `main`, so they must come
/// from the caller (ci/golden.sh sets them).
const PINNED_ENV: [(&str, &str); 5] = [
    ("OMP_NUM_THREADS", "1"),
    ("MKL_NUM_THREADS", "1"),
    ("MKL_CBWR", "COMPATIBLE"),
    ("ATEN_CPU_CAPABILITY", "avx2"),
    ("ONEDNN_MAX_CPU_ISA", "AVX2"),
];

fn check_env() -> Result<()> {
    for (name, want) in PINNED_ENV {
        let have = std::env::var(name).unwrap_or_default();
        if have != want {
            return Err(format!(
                "{name}: expected {want:?}, got {have:?}; run through ci/golden.sh, which pins \
                 libtorch's threads and CPU code paths so the files come out byte for byte"
            ));
        }
    }
    Ok(())
}

/// `(version, git_version)` of the libtorch this process loaded, read from the wheel's
/// `torch/version.py` next to the mapped `libtorch_cpu.so`.
fn libtorch_version() -> Result<(String, String)> {
    let maps = std::fs::read_to_string("/proc/self/maps").map_err(|e| e.to_string())?;
    let lib = maps
        .lines()
        .filter_map(|line| line.split_whitespace().nth(5))
        .find(|path| path.ends_with("/libtorch_cpu.so"))
        .ok_or("libtorch_cpu.so is not mapped into this process")?;
    let torch_dir = Path::new(lib)
        .parent()
        .and_then(Path::parent)
        .ok_or("libtorch_cpu.so has no torch/ folder above it")?;
    let text = std::fs::read_to_string(torch_dir.join("version.py"))
        .map_err(|e| format!("{}: {e}", torch_dir.join("version.py").display()))?;
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.split('\'').nth(1))
            .map(str::to_owned)
            .ok_or(format!("version.py has no {name}"))
    };
    let version = field("__version__")?;
    if !version.starts_with("2.11.0") {
        return Err(format!(
            "libtorch: expected 2.11.0 (tch 0.24), got {version}"
        ));
    }
    Ok((version, field("git_version")?))
}

/// SplitMix64: tiny, and its output depends only on integer arithmetic.
struct SplitMix64(u64);

impl SplitMix64 {
    fn for_case(name: &str, stream: u64) -> Self {
        // FNV-1a of the name, so each case has its own stream whatever the case order.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for byte in name.bytes() {
            h = (h ^ byte as u64).wrapping_mul(0x0100_0000_01b3);
        }
        SplitMix64(INPUT_SEED ^ h ^ stream.wrapping_mul(0x9e37_79b9_7f4a_7c15))
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1), exactly a multiple of 2^-53.
    fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / 9_007_199_254_740_992.0)
    }

    /// Mean 0, variance 1, from four uniforms: only +, -, * so every machine agrees.
    fn normal(&mut self) -> f64 {
        let sum = self.uniform() + self.uniform() + self.uniform() + self.uniform();
        (sum - 2.0) * 1.732_050_807_568_877_2
    }
}

pub fn kind(dtype: DType) -> Kind {
    match dtype {
        DType::F64 => Kind::Double,
        DType::F32 => Kind::Float,
        DType::F16 => Kind::Half,
        DType::Bf16 => Kind::BFloat16,
    }
}

fn tensor_f64(values: &[f64], shape: &[usize]) -> Tensor {
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

fn make_inputs(case: &Case) -> Inputs {
    let k_kind = kind(case.dtype);
    let mut rng = SplitMix64::for_case(&case.name, 0);
    // q and k of the large-value cases: 133120 everywhere (q, and k under `Large`) or
    // +-133120 at random (k under `LargeSigned`); v is always random.
    let mut draw = |n: usize, fill: Fill, is_key: bool| -> Vec<f64> {
        (0..n)
            .map(|_| match fill {
                Fill::Random => rng.normal(),
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
        let mut rng = SplitMix64::for_case(&case.name, 1);
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
                    let u = rng.uniform();
                    let bias = rng.uniform() * 4.0 - 2.0;
                    (u < keep).then_some(bias)
                }
                MaskPattern::Bands => {
                    let bias = rng.uniform() * 4.0 - 2.0;
                    let band = (j + 2 * case.s - (i % case.s)) % 9;
                    (band >= 3).then_some(bias)
                }
                MaskPattern::FullyMaskedRows => {
                    let bias = rng.uniform() * 4.0 - 2.0;
                    let u = rng.uniform();
                    (i % 3 != 1 && u < 0.8).then_some(bias)
                }
                MaskPattern::NegInfRow => {
                    let bias = rng.uniform() * 4.0 - 2.0;
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

    let (l, s) = (case.l as i64, case.s as i64);
    let tril = |diagonal: i64| Tensor::ones([l, s], (Kind::Bool, Device::Cpu)).tril(diagonal);
    let causal_mask = match case.causal {
        Causal::None => None,
        Causal::TopLeft if stored_mask.is_none() => None,
        Causal::TopLeft => Some(tril(0)),
        Causal::BottomRight => Some(tril(s - l)),
    };
    let is_causal_flag = case.causal == Causal::TopLeft && stored_mask.is_none();
    let torch_mask = match (&stored_mask, causal_mask) {
        (None, None) => None,
        (None, Some(c)) => Some(c),
        (Some(m), None) => Some(m.shallow_clone()),
        (Some(m), Some(c)) if m.kind() == Kind::Bool => Some(m.logical_and(&c)),
        (Some(m), Some(c)) => {
            let bias = Tensor::zeros([l, s], (k_kind, Device::Cpu))
                .masked_fill(&c.logical_not(), f64::NEG_INFINITY);
            Some(m + bias)
        }
    };

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

impl Inputs {
    /// The same inputs (and masks) upcast to f64, on `device`.
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

/// libtorch's math path, with the explicit dropout mask when dropout is active.
/// `_scaled_dot_product_attention_math` adds its `attn_mask` to the scores as it is (a
/// bool mask would add 1 and 0); `scaled_dot_product_attention` converts a bool mask to
/// 0 / -inf in the query dtype first, and so does this.
pub fn torch_math(case: &Case, x: &Inputs) -> std::result::Result<Tensor, tch::TchError> {
    let p = if case.dropout.is_active() {
        case.dropout.p
    } else {
        0.0
    };
    Tensor::f_internal_scaled_dot_product_attention_math(
        &x.q,
        &x.k,
        &x.v,
        x.additive_mask().as_ref(),
        p,
        x.is_causal_flag,
        x.dropout_mask.as_ref(),
        case.scale,
        case.enable_gqa,
    )
    .map(|(out, _attn)| out)
}

/// k or v with each kv head repeated for its query heads (GQA as PyTorch defines it).
fn expand_heads(case: &Case, t: &Tensor) -> Tensor {
    if case.hq == case.hkv {
        t.shallow_clone()
    } else {
        t.repeat_interleave_self_int((case.hq / case.hkv) as i64, 1, None)
    }
}

fn scale_of(case: &Case) -> f64 {
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

fn max_abs(t: &Tensor) -> f64 {
    t.abs().max().double_value(&[])
}

/// What one case produced on the CPU.
struct CpuResult {
    out: Tensor,
    out_f64: Tensor,
    lse: Option<Tensor>,
    lse_f64: Tensor,
    torch_backend: String,
}

fn run_cpu(case: &Case, x: &Inputs) -> Result<CpuResult> {
    let fail = |what: &str, e: tch::TchError| format!("{}: {what}: {e}", case.name);
    let x64 = x.to_f64();
    let out_f64 = torch_math(case, &x64).map_err(|e| fail("math f64", e))?;

    let (out, torch_backend) = if case.dropout.is_active() {
        let out = torch_math(case, x).map_err(|e| fail("math", e))?;
        (out, "math_dropout_mask".to_owned())
    } else {
        let choice = Tensor::f_internal_fused_sdp_choice(
            &x.q,
            &x.k,
            &x.v,
            x.torch_mask.as_ref(),
            0.0,
            x.is_causal_flag,
            case.scale,
            case.enable_gqa,
        )
        .map_err(|e| fail("_fused_sdp_choice", e))?;
        let out = Tensor::f_scaled_dot_product_attention(
            &x.q,
            &x.k,
            &x.v,
            x.torch_mask.as_ref(),
            0.0,
            x.is_causal_flag,
            case.scale,
            case.enable_gqa,
        )
        .map_err(|e| fail("scaled_dot_product_attention", e))?;
        let backend = match choice {
            0 => "math",
            1 => "flash_attention_cpu",
            other => return Err(format!("{}: unexpected CPU sdp choice {other}", case.name)),
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

fn metadata(case: &Case, torch_backend: &str) -> Vec<(String, String)> {
    let mut m = vec![
        ("name".to_owned(), case.name.clone()),
        (
            "is_causal".to_owned(),
            (case.causal == Causal::TopLeft).to_string(),
        ),
        ("causal".to_owned(), case.causal.name().to_owned()),
        ("dropout_p".to_owned(), format!("{}", case.dropout.p)),
        ("seed".to_owned(), case.dropout.seed.to_string()),
        ("offset".to_owned(), case.dropout.offset.to_string()),
        ("enable_gqa".to_owned(), case.enable_gqa.to_string()),
        ("torch_backend".to_owned(), torch_backend.to_owned()),
    ];
    if let Some(scale) = case.scale {
        m.push(("scale".to_owned(), format!("{scale:?}")));
    }
    m
}

fn manifest_entry(case: &Case, r: &CpuResult, file: &str, bytes: usize) -> serde_json::Value {
    let mask = case.mask.as_ref().map(|m| {
        serde_json::json!({
            "kind": if m.bool_mask { "bool" } else { "additive" },
            "axes": m.axes,
            "shape": m.shape(case.b, case.hq, case.l, case.s),
            "pattern": format!("{:?}", m.pattern),
        })
    });
    serde_json::json!({
        "name": case.name,
        "file": file,
        "bytes": bytes,
        "group": case.group,
        "dtype": case.dtype.name(),
        "b": case.b, "hq": case.hq, "hkv": case.hkv,
        "l": case.l, "s": case.s, "e": case.e, "ev": case.ev,
        "mask": mask,
        "causal": case.causal.name(),
        "is_causal": case.causal == Causal::TopLeft,
        "dropout_p": case.dropout.p,
        "seed": case.dropout.seed.to_string(),
        "offset": case.dropout.offset.to_string(),
        "scale": case.scale,
        "enable_gqa": case.enable_gqa,
        "fill": format!("{:?}", case.fill),
        "torch_backend": r.torch_backend,
        "has_lse": r.lse.is_some(),
    })
}

fn run() -> Result<()> {
    let args = parse_args()?;
    let mut cases = cases::all();
    let mut names = std::collections::BTreeSet::new();
    for c in &cases {
        if !names.insert(c.name.clone()) {
            return Err(format!("two cases are named {}", c.name));
        }
    }
    if let Some(only) = &args.only {
        cases.retain(|c| c.name.contains(only.as_str()));
    }
    let mut module_cases = module::all();
    if let Some(only) = &args.only {
        module_cases.retain(|c| c.name.contains(only.as_str()));
    }
    if args.list {
        for c in &cases {
            println!("{}", c.name);
        }
        for c in &module_cases {
            println!("module/{}", c.name);
        }
        return Ok(());
    }
    check_env()?;
    tch::set_num_threads(1);
    tch::set_num_interop_threads(1);
    let (version, git_version) = libtorch_version()?;

    if args.device == "cuda" {
        return cuda::generate(&cases, &args.out.join("cuda"), &version);
    }

    std::fs::create_dir_all(&args.out).map_err(|e| format!("{}: {e}", args.out.display()))?;
    let mut entries = Vec::new();
    let mut total = 0usize;
    for case in &cases {
        let x = make_inputs(case);
        let r = run_cpu(case, &x)?;
        let mut tensors: Vec<(&str, &Tensor)> = vec![("q", &x.q), ("k", &x.k), ("v", &x.v)];
        if let Some(m) = &x.stored_mask {
            tensors.push(("attn_mask", m));
        }
        tensors.push(("out", &r.out));
        tensors.push(("out_f64", &r.out_f64));
        if let Some(lse) = &r.lse {
            tensors.push(("lse", lse));
        }
        tensors.push(("lse_f64", &r.lse_f64));
        let file = format!("{}.safetensors", case.name);
        let bytes = write::case_file(
            &args.out.join(&file),
            &tensors,
            &metadata(case, &r.torch_backend),
        )?;
        total += bytes;
        entries.push(manifest_entry(case, &r, &file, bytes));
    }
    let manifest = serde_json::json!({
        "libtorch": version,
        "libtorch_git": git_version,
        "tch": "0.24.0",
        "produced_by": "ci/golden.sh -> crates/sdpa-golden (tch 0.24 on the torch==2.11.0 wheel's libtorch, CPU)",
        "pinned_env": PINNED_ENV.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>(),
        "threads": 1,
        "input_seed": format!("{INPUT_SEED:#x}"),
        "inputs": "SplitMix64 per case (seed ^ FNV-1a(name)); q, k, v ~ Irwin-Hall(4) normal in f64, rounded to the case dtype",
        "tensors": {
            "q, k, v": "[B, H, L, E] / [B, Hkv, S, E] / [B, Hkv, S, Ev] in the case dtype",
            "attn_mask": "bool (true = takes part) or additive in the case dtype, in its broadcast shape",
            "out": "libtorch CPU in the case dtype: scaled_dot_product_attention (torch_backend says which path), or _scaled_dot_product_attention_math with dropout_mask for dropout cases",
            "out_f64": "truth: _scaled_dot_product_attention_math on the inputs upcast to f64 (same masks and dropout mask)",
            "lse": "f32 [B, Hq, L] from _scaled_dot_product_flash_attention_for_cpu (without dropout), where libtorch accepts the case",
            "lse_f64": "f64 [B, Hq, L]: logsumexp of the masked scaled f64 scores; -inf for rows with no key",
        },
        "dropout": "keep-mask from sdpa_core::dropout (Philox4x32-10); libtorch's math path zeroes dropped weights and scales v by 1/(1-p)",
        "case_count": entries.len(),
        "total_bytes": total,
        "cases": entries,
    });
    let text = serde_json::to_string_pretty(&manifest).map_err(|e| e.to_string())? + "\n";
    std::fs::write(args.out.join("manifest.json"), text).map_err(|e| e.to_string())?;
    eprintln!(
        "sdpa-golden: {} cases, {:.2} MB, libtorch {version}, into {}",
        cases.len(),
        total as f64 / 1e6,
        args.out.display()
    );
    if !module_cases.is_empty() {
        module::generate(&module_cases, &args.out.join("module"), &version)?;
    }
    Ok(())
}

fn main() {
    if let Err(e) = run() {
        eprintln!("sdpa-golden: {e}");
        std::process::exit(1);
    }
}
