//! `sdpa bench`: times every backend on any problem (GQA/MQA, L != S, Ev != E, causal
//! alignment, dropout, masks, varlen on CUDA) or on the default set: warm-up, then the
//! median of repeats. Sizes are validated, and checked against the memory there is,
//! before anything is allocated.

use crate::engine::{BackendArg, DeviceArg, Engine};
use crate::error::CliError;
use half::{bf16, f16};
use ndarray::{Array4, ArrayD};
use sdpa_core::rng::SplitMix64;
use sdpa_core::{shape_text, Backend, BackendSet, Causal, DType, Device, Dropout, SdpaOptions};
use sdpa_cuda::bench::{BenchMask, BenchProblem, VarlenLens};
use sdpa_cuda::{GpuContext, KernelConfig};
use sdpa_harness::case::Case;
use sdpa_harness::strategies::{MaskSpec, ProblemSpec};
use std::process::ExitCode;
use std::time::Instant;

/// How FLOPs are counted, printed under the table and in `--help`.
pub const FLOP_RULE: &str = "FLOPs = 2*B*Hq*L*S*(E+Ev) (= 4*B*H*L*S*E when Ev = E), halved \
     under either causal alignment, summed per sequence under varlen; masks and dropout do \
     not change the count";

/// `--causal`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum CausalArg {
    /// No causal mask.
    None,
    /// PyTorch's `is_causal`: row i sees keys 0..=i.
    TopLeft,
    /// FlashAttention's alignment: row i sees keys 0..=i + S - L.
    BottomRight,
}

/// `--mask`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum MaskArg {
    /// No attn_mask.
    None,
    /// Bool [B, 1, 1, S]: sequence b keeps its first S - (b % 4) * S / 8 keys.
    KeyPadding,
    /// Bool [B, Hq, L, S], each element kept with probability 0.9.
    Bool,
    /// Additive [B, Hq, L, S] in the dtype, uniform in [-1, 0).
    Additive,
}

/// The arguments of `sdpa bench`.
#[derive(Debug, Clone, clap::Args)]
#[command(after_help = "\
Without problem flags: the default set (CPU: f32 [4,8,512,64], the same causal, the \
tutorial's problem with batch 2; CUDA: the five issue shapes). Any problem flag selects one \
problem; flags not given default to B=4 Hq=8 Hkv=Hq L=512 S=L E=64 Ev=E f16, or to \
--shape's values. Examples:
  sdpa bench --shape 2,16,1024,64 --kv-heads 2 --len-kv 4096 --causal bottom-right
  sdpa bench --heads 8 --head-dim 128 --head-dim-v 64 --mask key-padding --dropout 0.1
  sdpa bench --device cuda --varlen-q 512,1024,77 --varlen-k 512,2048,300 --heads 16

Every backend that supports the problem here is timed; the others show why they cannot \
run. CPU: wall time of each call, GFLOP/s. CUDA: CUDA events around each call on resident \
inputs rotating past 2x the L2 cache, TFLOP/s.
FLOPs = 2*B*Hq*L*S*(E+Ev) (4*B*H*L*S*E when Ev = E), halved under causal, summed per \
sequence under varlen; masks and dropout do not change the count.

Memory: the problem is refused (exit 2) before anything is allocated when its inputs \
(times the input sets on CUDA) + outputs (+ the [B,Hq,L,S] scores for math) exceed 90% of \
MemAvailable (CPU, /proc/meminfo) or of the device's free memory (CUDA).")]
pub struct BenchArgs {
    /// Where to run.
    #[arg(long, value_enum, default_value_t = DeviceArg::Auto)]
    pub device: DeviceArg,
    /// Shorthand for --batch B --heads H --len-q L --head-dim E (the other flags
    /// override it).
    #[arg(long, value_name = "B,H,L,E", value_parser = parse_shape)]
    pub shape: Option<[usize; 4]>,
    /// Batch size B.
    #[arg(long, value_name = "B")]
    pub batch: Option<usize>,
    /// Query heads Hq.
    #[arg(long, value_name = "HQ")]
    pub heads: Option<usize>,
    /// Key/value heads Hkv (default Hq); fewer than Hq is GQA (1: MQA) and must divide Hq.
    #[arg(long, value_name = "HKV")]
    pub kv_heads: Option<usize>,
    /// Query length L.
    #[arg(long, value_name = "L", visible_alias = "len")]
    pub len_q: Option<usize>,
    /// Key/value length S (default L).
    #[arg(long, value_name = "S")]
    pub len_kv: Option<usize>,
    /// Head dim E of q and k.
    #[arg(long, value_name = "E")]
    pub head_dim: Option<usize>,
    /// Head dim Ev of v and the output (default E).
    #[arg(long, value_name = "EV")]
    pub head_dim_v: Option<usize>,
    /// Element type: f64, f32, f16, bf16 (default f16).
    #[arg(long)]
    pub dtype: Option<DType>,
    /// Causal alignment; a bare --causal is top-left (PyTorch's is_causal).
    #[arg(long, value_enum, num_args = 0..=1, default_missing_value = "top-left")]
    pub causal: Option<CausalArg>,
    /// Attention dropout probability p in [0, 1] (fixed seed 0x5d9a2024, offset 0).
    #[arg(long, value_name = "P")]
    pub dropout: Option<f64>,
    /// attn_mask: key-padding is bool [B,1,1,S]; bool and additive are dense [B,Hq,L,S].
    #[arg(long, value_enum)]
    pub mask: Option<MaskArg>,
    /// Sliding window: keys before the row's diagonal it sees (-1, the default: all).
    #[arg(long, value_name = "N", allow_negative_numbers = true)]
    pub window_left: Option<i64>,
    /// Sliding window: keys after the row's diagonal it sees (-1, the default: all).
    #[arg(long, value_name = "N", allow_negative_numbers = true)]
    pub window_right: Option<i64>,
    /// Softcap c > 0: scores become c tanh(score / c).
    #[arg(long, value_name = "C")]
    pub softcap: Option<f64>,
    /// ALiBi slopes [Hq] (2^(-8 (h + 1) / Hq)) added after the softcap (CUDA only).
    #[arg(long)]
    pub alibi: bool,
    /// Varlen (CUDA only, through the fused kernels' varlen mode): comma-separated query
    /// lengths, one per sequence; B is their count and L their maximum. No mask.
    #[arg(long, value_name = "L0,L1,..", value_delimiter = ',')]
    pub varlen_q: Option<Vec<usize>>,
    /// Varlen key/value lengths, as many as --varlen-q (default: the same).
    #[arg(
        long,
        value_name = "S0,S1,..",
        value_delimiter = ',',
        requires = "varlen_q"
    )]
    pub varlen_k: Option<Vec<usize>>,
    /// Timed calls per backend (CUDA: ten times as many, within a time budget).
    #[arg(long, default_value_t = 10)]
    pub repeats: usize,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Time the backward instead (dq, dk, dv from one forward's out and lse and a random
    /// dout; the forward is not timed): math (CPU: the reference) and, on CUDA, flash's
    /// tensor-core backward and the efficient backend's fused one. FLOPs: 2.5x the
    /// forward's.
    #[arg(long)]
    pub backward: bool,
    /// Sweep sequence length and head dim as FlashAttention's benchmarks do: B*L fixed
    /// (--sweep-tokens), H*E fixed (--sweep-hidden), L over --sweep-lens, E over
    /// --sweep-head-dims, causal off and on (only --causal's alignment when given),
    /// --dtype (default bf16); every backend at every point, as JSON (to --out, else
    /// stdout) for `sdpa chart`. A progress bar shows on a terminal.
    #[arg(long, conflicts_with_all = ["shape", "batch", "heads", "kv_heads", "len_q", "len_kv",
        "head_dim", "head_dim_v", "varlen_q", "mask", "alibi", "dropout", "window_left",
        "window_right", "softcap"])]
    pub sweep: bool,
    /// Sequence lengths of the sweep (CUDA default 512,1024,..,16384; CPU 64,..,512).
    #[arg(long, value_name = "L,..", value_delimiter = ',', requires = "sweep")]
    pub sweep_lens: Option<Vec<usize>>,
    /// Head dims of the sweep (default 64,128).
    #[arg(long, value_name = "E,..", value_delimiter = ',', requires = "sweep")]
    pub sweep_head_dims: Option<Vec<usize>>,
    /// B*L of every sweep point (CUDA default 16384, CPU 1024).
    #[arg(long, value_name = "N", requires = "sweep")]
    pub sweep_tokens: Option<usize>,
    /// H*E of every sweep point (CUDA default 2048, CPU 256).
    #[arg(long, value_name = "N", requires = "sweep")]
    pub sweep_hidden: Option<usize>,
    /// The backends a sweep times (default all; e.g. flash,efficient to leave out math,
    /// whose L x S scores make long sequences slow).
    #[arg(
        long,
        value_name = "NAME,..",
        value_delimiter = ',',
        requires = "sweep"
    )]
    pub sweep_backends: Option<Vec<BackendArg>>,
    /// Write the sweep's JSON to FILE (replaced atomically, complete or not at all).
    #[arg(long, value_name = "FILE", requires = "sweep")]
    pub out: Option<std::path::PathBuf>,
}

fn parse_shape(s: &str) -> Result<[usize; 4], String> {
    let dims: Vec<usize> = s
        .split(',')
        .map(|p| p.trim().parse::<usize>())
        .collect::<Result<_, _>>()
        .map_err(|_| format!("expected B,H,L,E (four positive integers), got {s:?}"))?;
    match dims[..] {
        [b, h, l, e] if dims.iter().all(|d| *d > 0) => Ok([b, h, l, e]),
        _ => Err(format!(
            "expected B,H,L,E (four positive integers), got {s:?}"
        )),
    }
}

/// A dense square benchmark problem: `q, k, v [B, H, L, E]` (the tutorial's kind).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Shape {
    /// `B`.
    pub batch: usize,
    /// `H`.
    pub heads: usize,
    /// `L = S`.
    pub len: usize,
    /// `E = Ev`.
    pub head_dim: usize,
    /// Element type.
    pub dtype: DType,
    /// Causal (top-left).
    pub causal: bool,
}

impl Shape {
    /// The problem as a case with random inputs in `[-1, 1)`.
    pub fn case(&self, seed: u64) -> Case {
        ProblemSpec {
            batch: self.batch,
            heads_kv: self.heads,
            group: 1,
            len_q: self.len,
            len_kv: self.len,
            head_dim: self.head_dim,
            head_dim_v: self.head_dim,
            mask: MaskSpec::None,
            options: self.problem().options,
            data_seed: seed,
        }
        .to_case(self.dtype)
    }

    /// The shape as a general problem (sdpa-cuda's square shapes make the same one).
    pub fn problem(&self) -> BenchProblem {
        sdpa_cuda::bench::BenchShape {
            batch: self.batch,
            heads: self.heads,
            len: self.len,
            head_dim: self.head_dim,
            dtype: self.dtype.name(),
            causal: self.causal,
        }
        .problem()
    }
}

/// `B=.. Hq=.. [Hkv=..] L=.. [S=..] E=.. [Ev=..] dtype [causal] [mask] [dropout] [varlen]`.
pub fn label(p: &BenchProblem) -> String {
    let mut s = format!("B={} Hq={}", p.batch, p.heads_q);
    if p.heads_kv != p.heads_q {
        s += &format!(" Hkv={}", p.heads_kv);
    }
    s += &format!(" L={}", p.len_q);
    if p.len_kv != p.len_q {
        s += &format!(" S={}", p.len_kv);
    }
    s += &format!(" E={}", p.head_dim);
    if p.head_dim_v != p.head_dim {
        s += &format!(" Ev={}", p.head_dim_v);
    }
    s += &format!(" {}", p.dtype);
    if p.options.causal != Causal::None {
        s += &format!(" causal={}", p.options.causal.name());
    }
    match p.mask {
        BenchMask::None => {}
        BenchMask::KeyPadding => s += " mask=key-padding",
        BenchMask::DenseBool => s += " mask=bool",
        BenchMask::DenseAdditive => s += " mask=additive",
    }
    if p.options.dropout.p > 0.0 {
        s += &format!(" dropout={}", p.options.dropout.p);
    }
    if p.varlen.is_some() {
        s += " varlen";
    }
    if p.options.window.is_active() {
        s += &format!(
            " window=({},{})",
            p.options.window.left, p.options.window.right
        );
    }
    if let Some(c) = p.options.softcap {
        s += &format!(" softcap={c}");
    }
    if p.alibi {
        s += " alibi";
    }
    s
}

/// One backend on one problem.
#[derive(Debug, Clone)]
pub struct Row {
    /// `auto` resolves to a backend; kept as the label shown.
    pub label: String,
    /// The backend that ran (or would have).
    pub backend: Backend,
    /// Where.
    pub device: Device,
    /// The problem.
    pub problem: BenchProblem,
    /// Median seconds and runs, or why it could not run.
    pub result: Result<Timing, String>,
    /// The backward was timed (`--backward`), not the forward.
    pub backward: bool,
}

/// Measured time of one backend.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// Median time of one call, seconds.
    pub median_s: f64,
    /// Fastest call, seconds.
    pub min_s: f64,
    /// Timed calls (after warm-up).
    pub runs: usize,
    /// Floating-point operations of one call ([`FLOP_RULE`]).
    pub flops: f64,
}

impl Timing {
    /// FLOP/s at the median.
    pub fn flop_rate(&self) -> f64 {
        self.flops / self.median_s
    }
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    let n = xs.len();
    if n % 2 == 1 {
        xs[n / 2]
    } else {
        (xs[n / 2 - 1] + xs[n / 2]) / 2.0
    }
}

/// An element the CPU bench makes random inputs of.
trait BenchElem: sdpa_ref::Element {
    fn from_f64(x: f64) -> Self;
}
impl BenchElem for f64 {
    fn from_f64(x: f64) -> Self {
        x
    }
}
impl BenchElem for f32 {
    fn from_f64(x: f64) -> Self {
        x as f32
    }
}
impl BenchElem for f16 {
    fn from_f64(x: f64) -> Self {
        f16::from_f64(x)
    }
}
impl BenchElem for bf16 {
    fn from_f64(x: f64) -> Self {
        bf16::from_f64(x)
    }
}

/// The CPU bench's inputs of `p` in `T`: q, k, v, the mask's contents, from fixed seeds.
struct CpuInputs<T> {
    q: Array4<T>,
    k: Array4<T>,
    v: Array4<T>,
    bool_mask: Option<ArrayD<bool>>,
    additive: Option<ArrayD<T>>,
}

impl<T: BenchElem> CpuInputs<T> {
    fn new(p: &BenchProblem) -> Self {
        let mut rng = SplitMix64(0x5d9a_2024);
        let mut random = |[a, b, c, d]: [usize; 4]| {
            Array4::from_shape_simple_fn((a, b, c, d), || T::from_f64(rng.symmetric()))
        };
        let [qs, ks, vs] = p.shapes();
        CpuInputs {
            q: random(qs),
            k: random(ks),
            v: random(vs),
            bool_mask: p
                .mask_shape()
                .and_then(|s| p.mask.bool_values(&s, 0x6d61_736b)),
            additive: p
                .mask_shape()
                .and_then(|s| p.mask.additive_values(&s, 0x6d61_736b))
                .map(|a| a.mapv(T::from_f64)),
        }
    }

    fn mask(&self) -> Option<sdpa::Mask<'_, T>> {
        match (&self.bool_mask, &self.additive) {
            (Some(b), _) => Some(sdpa::Mask::Bool(b.view())),
            (_, Some(a)) => Some(sdpa::Mask::Additive(a.view())),
            _ => None,
        }
    }
}

/// One warm-up call, then `repeats` calls with wall time around each.
fn time_cpu_calls<R>(
    repeats: usize,
    flops: f64,
    call: impl Fn() -> Result<R, CliError>,
) -> Result<Timing, CliError> {
    std::hint::black_box(call()?);
    let mut times = Vec::with_capacity(repeats.max(1));
    for _ in 0..repeats.max(1) {
        let start = Instant::now();
        let out = call()?;
        times.push(start.elapsed().as_secs_f64());
        std::hint::black_box(out);
    }
    Ok(Timing {
        median_s: median(times.clone()),
        min_s: times.iter().copied().fold(f64::INFINITY, f64::min),
        runs: times.len(),
        flops,
    })
}

fn time_cpu_typed<T: BenchElem>(p: &BenchProblem, repeats: usize) -> Result<Timing, CliError> {
    let x = CpuInputs::<T>::new(p);
    time_cpu_calls(repeats, p.flops(), || {
        Ok(sdpa::attention(
            sdpa::Tensor::Host(x.q.view()),
            sdpa::Tensor::Host(x.k.view()),
            sdpa::Tensor::Host(x.v.view()),
            x.mask(),
            &p.options,
            &sdpa::Exec::cpu(),
        )?)
    })
}

fn time_cpu_backward_typed<T: BenchElem>(
    p: &BenchProblem,
    repeats: usize,
) -> Result<Timing, CliError> {
    let x = CpuInputs::<T>::new(p);
    let problem = p.problem()?;
    let mut rng = SplitMix64(0x0d07_2024);
    let [b, h, l, e] = problem.out_shape();
    let dout = Array4::from_shape_simple_fn((b, h, l, e), || T::from_f64(rng.symmetric()));
    let exec = sdpa::Exec::cpu();
    let (out, lse) = sdpa::attention(
        sdpa::Tensor::Host(x.q.view()),
        sdpa::Tensor::Host(x.k.view()),
        sdpa::Tensor::Host(x.v.view()),
        x.mask(),
        &p.options,
        &exec,
    )?
    .into_host()
    .expect("host arrays in, host arrays out");
    time_cpu_calls(repeats, BACKWARD_FLOPS * p.flops(), || {
        Ok(sdpa::attention_backward(
            x.q.view(),
            x.k.view(),
            x.v.view(),
            out.view(),
            lse.view(),
            dout.view(),
            x.mask(),
            &p.options,
            &exec,
        )?)
    })
}

/// The backward's FLOPs as a multiple of the forward's (FlashAttention's count: five
/// products of the forward's size to its two, 2.5x).
pub const BACKWARD_FLOPS: f64 = 2.5;

/// [`time_backend`] of the backward.
fn time_backward(
    engine: &Engine,
    backend: Backend,
    p: &BenchProblem,
    repeats: usize,
) -> Result<Timing, CliError> {
    if let Some(gpu) = &engine.gpu {
        let t = sdpa_cuda::bench::time_backward(gpu, p, backend, 2, repeats.max(1) * 5, 2000.0)?
            .ok_or_else(|| {
                CliError::Usage(format!("{backend} has no backward for {}", label(p)))
            })?;
        return Ok(Timing {
            median_s: t.median_ms / 1e3,
            min_s: t.min_ms / 1e3,
            runs: t.runs,
            flops: BACKWARD_FLOPS * p.flops(),
        });
    }
    match p.dtype {
        DType::F64 => time_cpu_backward_typed::<f64>(p, repeats),
        DType::F32 => time_cpu_backward_typed::<f32>(p, repeats),
        DType::F16 => time_cpu_backward_typed::<f16>(p, repeats),
        DType::BF16 => time_cpu_backward_typed::<bf16>(p, repeats),
    }
}

/// Times `backend` (which supports `p` here). CPU: one warm-up call, then `repeats`
/// calls, wall time around each. CUDA: `sdpa_cuda::bench::time_problem` (events around
/// each launch on resident inputs rotating past 2x L2).
fn time_backend(
    engine: &Engine,
    backend: Backend,
    p: &BenchProblem,
    repeats: usize,
) -> Result<Timing, CliError> {
    if let Some(gpu) = &engine.gpu {
        let t = sdpa_cuda::bench::time_problem(gpu, p, backend, 3, repeats.max(1) * 10, 2000.0)?
            .ok_or_else(|| CliError::Usage(format!("{backend} cannot run {}", label(p))))?;
        return Ok(Timing {
            median_s: t.median_ms / 1e3,
            min_s: t.min_ms / 1e3,
            runs: t.runs,
            flops: p.flops(),
        });
    }
    match p.dtype {
        DType::F64 => time_cpu_typed::<f64>(p, repeats),
        DType::F32 => time_cpu_typed::<f32>(p, repeats),
        DType::F16 => time_cpu_typed::<f16>(p, repeats),
        DType::BF16 => time_cpu_typed::<bf16>(p, repeats),
    }
}

/// Bytes a problem needs on the device it runs on, with and without the math backend's
/// scores.
#[derive(Debug, Clone, PartialEq)]
struct Need {
    /// Inputs (times the input sets) + outputs: what every backend needs.
    base: u128,
    /// What the math backend needs on top (scores, gathered GQA operands).
    math_extra: u128,
    /// The sizes, for messages.
    what: String,
}

fn numel(shape: &[usize]) -> u128 {
    shape.iter().map(|&d| d as u128).product()
}

fn need(p: &BenchProblem, sets: u128) -> Need {
    let elem = p.dtype.size_bytes() as u128;
    let [qs, ks, vs] = p.shapes();
    let (q, k, v, out, lse, what) = match p.totals() {
        None => {
            let out = [p.batch, p.heads_q, p.len_q, p.head_dim_v];
            let what = format!(
                "q {}, k {}, v {}, out {}",
                shape_text(&qs),
                shape_text(&ks),
                shape_text(&vs),
                shape_text(&out)
            );
            (
                numel(&qs),
                numel(&ks),
                numel(&vs),
                numel(&out),
                numel(&qs[..3]),
                what,
            )
        }
        Some((tq, tk)) => {
            let (tq, tk) = (tq as u128, tk as u128);
            let (hq, hkv) = (p.heads_q as u128, p.heads_kv as u128);
            let (e, ev) = (p.head_dim as u128, p.head_dim_v as u128);
            let what = format!(
                "packed q [{tq}, {hq}, {e}], k [{tk}, {hkv}, {e}], v [{tk}, {hkv}, {ev}], out [{tq}, {hq}, {ev}]"
            );
            (
                tq * hq * e,
                tk * hkv * e,
                tk * hkv * ev,
                tq * hq * ev,
                tq * hq,
                what,
            )
        }
    };
    let mask = match p.mask_shape() {
        None => 0,
        Some(s) => {
            let size = match p.mask {
                BenchMask::DenseAdditive => elem,
                _ => 1,
            };
            numel(&s) * size
        }
    };
    let mut what = what;
    if let Some(s) = p.mask_shape() {
        what += &format!(", mask {}", shape_text(&s));
    }
    let base = sets * (q + k + v) * elem + mask + out * elem + lse * 4;
    let scores = numel(&p.scores_shape()) * elem.max(4);
    // cuBLAS reads one kv head per query head: under GQA the math backend copies k, v.
    let gathered = if p.heads_kv != p.heads_q {
        numel(&[p.batch, p.heads_q, p.len_kv, p.head_dim + p.head_dim_v]) * elem
    } else {
        0
    };
    Need {
        base,
        math_extra: scores + gathered,
        what,
    }
}

fn gib(bytes: u128) -> String {
    format!("{:.2} GiB", bytes as f64 / (1u64 << 30) as f64)
}

/// 90% of what the device has free: MemAvailable on the CPU, the driver's free memory
/// on CUDA; the rest is headroom for the process and the allocator. `None` when it
/// cannot be read (then only `Problem::new`'s address-space bound applies).
fn memory_bound(engine: &Engine) -> Result<Option<(u128, String)>, CliError> {
    let (free, source) = match &engine.gpu {
        Some(gpu) => {
            let (free, _total) = gpu
                .cuda()
                .mem_get_info()
                .map_err(sdpa_cuda::CudaError::from)?;
            (free as u128, "the device's free memory")
        }
        None => {
            let Some(kib) = std::fs::read_to_string("/proc/meminfo").ok().and_then(|t| {
                t.lines()
                    .find_map(|l| l.strip_prefix("MemAvailable:"))
                    .and_then(|rest| {
                        rest.trim()
                            .trim_end_matches("kB")
                            .trim()
                            .parse::<u128>()
                            .ok()
                    })
            }) else {
                return Ok(None);
            };
            (kib * 1024, "MemAvailable")
        }
    };
    Ok(Some((
        free / 10 * 9,
        format!("90% of {source} ({})", gib(free)),
    )))
}

/// Every backend (and `auto`) on `shape`: timed where supported, else the reason.
pub fn bench_shape(engine: &Engine, shape: Shape, repeats: usize) -> Result<Vec<Row>, CliError> {
    bench_problem(engine, &shape.problem(), repeats, false)
}

/// Every backend (and `auto`) on `p`: timed where supported and where it fits in memory,
/// else the reason.
///
/// # Errors
/// A problem the specification rejects, a varlen problem on the CPU, one whose inputs
/// and outputs exceed the memory bound (or that no supporting backend fits), a failed
/// run.
pub fn bench_problem(
    engine: &Engine,
    p: &BenchProblem,
    repeats: usize,
    backward: bool,
) -> Result<Vec<Row>, CliError> {
    bench_backends(engine, p, repeats, backward, BackendSet::ALL)
}

/// [`bench_problem`] of the backends in `set` only (the others get no row).
///
/// # Errors
/// As [`bench_problem`].
pub fn bench_backends(
    engine: &Engine,
    p: &BenchProblem,
    repeats: usize,
    backward: bool,
    set: BackendSet,
) -> Result<Vec<Row>, CliError> {
    if p.varlen.is_some() && engine.gpu.is_none() {
        let why = match &engine.no_cuda_reason {
            Some(why) => format!("the cpu (no CUDA device: {why})"),
            None => "--device cpu".to_string(),
        };
        return Err(CliError::Usage(format!(
            "--varlen-q: expected a CUDA device (varlen runs on CUDA only, through \
             attention_varlen; on the CPU sdpa-nested runs nested batches), got {why}"
        )));
    }
    if p.alibi && (engine.gpu.is_none() || p.varlen.is_some() || backward) {
        return Err(CliError::Usage(
            "--alibi: expected a dense forward on a CUDA device (the bench times ALiBi there \
             only), got a CPU, varlen or --backward run"
                .to_string(),
        ));
    }
    let problem = p.problem()?;
    let sets = match &engine.gpu {
        Some(gpu) => {
            let n = need(p, 1);
            let set_bytes = usize::try_from(n.base).unwrap_or(usize::MAX);
            sdpa_cuda::bench::input_sets(set_bytes, gpu.l2_bytes()?) as u128
        }
        None => 1,
    };
    let need = need(p, sets);
    let bound = memory_bound(engine)?;
    let too_big = |bytes: u128, with: &str| -> Option<String> {
        let (limit, source) = bound.as_ref()?;
        (bytes > *limit).then(|| {
            format!(
                "{}: {}{with}{} need {}, over the bound of {} = {source}",
                label(p),
                need.what,
                if sets > 1 {
                    format!(" ({sets} input sets)")
                } else {
                    String::new()
                },
                gib(bytes),
                gib(*limit)
            )
        })
    };
    if let Some(msg) = too_big(need.base, "") {
        return Err(CliError::Usage(format!(
            "problem too large for memory: {msg}"
        )));
    }
    // The backward doubles the math backend's scores (q k^T and dout v^T, both kept)
    // and adds the gradients and their accumulators.
    let math_extra = if backward {
        2 * need.math_extra + need.base
    } else {
        need.math_extra
    };
    let math_too_big = too_big(
        need.base + math_extra,
        &format!(
            " + scores {}{}",
            shape_text(&p.scores_shape()),
            if backward {
                " x2 and the gradients"
            } else {
                ""
            }
        ),
    );
    // Which backends have a backward here: math everywhere, on CUDA flash's tensor-core
    // backward and efficient's fused one where they cover the problem.
    let has_backward = |backend: Backend| -> Result<(), String> {
        if !backward {
            return Ok(());
        }
        engine.backward_support(backend, &problem)
    };
    let fits = |backend: Backend| -> Result<(), String> {
        match (&math_too_big, backend) {
            (Some(msg), Backend::Math) => Err(format!("too large for memory: {msg}")),
            _ => Ok(()),
        }
    };
    let backends: Vec<Backend> = [Backend::Math, Backend::Flash, Backend::Efficient]
        .into_iter()
        .filter(|&b| set.contains(b))
        .collect();
    let runnable: Vec<Backend> = backends
        .iter()
        .copied()
        .filter(|&b| {
            engine.supports(b, &problem).is_ok() && fits(b).is_ok() && has_backward(b).is_ok()
        })
        .collect();
    if runnable.is_empty() {
        if let Some(msg) = &math_too_big {
            if engine.supports(Backend::Math, &problem).is_ok() {
                return Err(CliError::Usage(format!(
                    "problem too large for memory: {msg}"
                )));
            }
        }
    }
    let device = engine.device;
    let mut timed: Vec<(Backend, Result<Timing, String>)> = Vec::new();
    for &backend in &backends {
        let result = match engine
            .supports(backend, &problem)
            .and_then(|()| fits(backend))
            .and_then(|()| has_backward(backend))
        {
            Ok(()) if backward => Ok(time_backward(engine, backend, p, repeats)?),
            Ok(()) => Ok(time_backend(engine, backend, p, repeats)?),
            Err(reason) => Err(reason),
        };
        timed.push((backend, result));
    }
    // Dispatch's pick among those that can run here; its time is that backend's.
    let enabled = runnable
        .iter()
        .fold(BackendSet::EMPTY, |set, &b| set.with(b));
    let gpu_free = engine.gpu.as_ref().and_then(|g| g.free_memory());
    let pick = match (&engine.gpu, backward) {
        (Some(_), true) => sdpa_cuda::select_backward(&problem, enabled, gpu_free)
            .map_err(|e| CliError::from(e).to_string()),
        (None, true) => Ok(Backend::Math),
        _ => engine.select(enabled, &problem).map_err(|e| e.to_string()),
    };
    let auto = match pick {
        Ok(b) => Row {
            label: format!("auto ({b})"),
            backend: b,
            device,
            problem: p.clone(),
            result: timed
                .iter()
                .find(|(x, _)| *x == b)
                .expect("timed")
                .1
                .clone(),
            backward,
        },
        Err(e) => Row {
            label: "auto".to_string(),
            backend: Backend::Math,
            device,
            problem: p.clone(),
            result: Err(e),
            backward,
        },
    };
    let mut rows = vec![auto];
    rows.extend(timed.into_iter().map(|(backend, result)| Row {
        label: backend.name().to_string(),
        backend,
        device,
        problem: p.clone(),
        result,
        backward,
    }));
    Ok(rows)
}

/// One decimal, or four significant digits for the small rates of tiny problems.
fn rate(x: f64) -> String {
    if x >= 100.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.4}")
    }
}

fn unit(device: Device) -> (&'static str, f64) {
    match device {
        Device::Cuda => ("TFLOP/s", 1e12),
        Device::Cpu => ("GFLOP/s", 1e9),
    }
}

/// Human-readable, aligned table; the rate's unit in the header (TFLOP/s on CUDA,
/// GFLOP/s on the CPU) and how FLOPs are counted under it.
pub fn table(rows: &[Row]) -> String {
    let (name, scale) = unit(rows.first().map_or(Device::Cpu, |r| r.device));
    let width = rows
        .iter()
        .map(|r| label(&r.problem).len())
        .max()
        .unwrap_or(0)
        .max(7);
    let mut out = format!(
        "{:<18} {:<6} {:<width$} {:>12} {:>10}  {}\n",
        "backend", "device", "problem", "median", name, "note"
    );
    for r in rows {
        let problem = label(&r.problem);
        match &r.result {
            Ok(t) => out.push_str(&format!(
                "{:<18} {:<6} {:<width$} {:>9.3} ms {:>10}  {} runs, min {:.3} ms\n",
                r.label,
                r.device.to_string(),
                problem,
                t.median_s * 1e3,
                rate(t.flop_rate() / scale),
                t.runs,
                t.min_s * 1e3
            )),
            Err(reason) => out.push_str(&format!(
                "{:<18} {:<6} {:<width$} {:>12} {:>10}  cannot run here: {}\n",
                r.label,
                r.device.to_string(),
                problem,
                "-",
                "-",
                reason
            )),
        }
    }
    out.push_str(&format!("{FLOP_RULE}.\n"));
    if rows.iter().any(|r| r.backward) {
        out.push_str(&format!(
            "Backward (dq, dk, dv from one untimed forward): {BACKWARD_FLOPS}x those FLOPs.\n"
        ));
    }
    out
}

/// The rows as JSON objects (`gflops` always; `tflops` too).
pub fn json(rows: &[Row]) -> serde_json::Value {
    serde_json::Value::Array(
        rows.iter()
            .map(|r| {
                let p = &r.problem;
                let mut o = serde_json::json!({
                    "backend": r.label,
                    "resolved": r.backend.name(),
                    "device": r.device.to_string(),
                    "problem": label(p),
                    "batch": p.batch,
                    "heads": p.heads_q,
                    "heads_kv": p.heads_kv,
                    "len": p.len_q,
                    "len_kv": p.len_kv,
                    "head_dim": p.head_dim,
                    "head_dim_v": p.head_dim_v,
                    "dtype": p.dtype.name(),
                    "causal": p.options.causal != Causal::None,
                    "causal_alignment": p.options.causal.name(),
                    "dropout_p": p.options.dropout.p,
                    "mask": match p.mask {
                        BenchMask::None => serde_json::Value::Null,
                        BenchMask::KeyPadding => "key-padding".into(),
                        BenchMask::DenseBool => "bool".into(),
                        BenchMask::DenseAdditive => "additive".into(),
                    },
                    "varlen_q": p.varlen.as_ref().map(|v| v.q.clone()),
                    "varlen_k": p.varlen.as_ref().map(|v| v.k.clone()),
                    "pass": if r.backward { "backward" } else { "forward" },
                });
                match &r.result {
                    Ok(t) => {
                        o["median_ms"] = serde_json::json!(t.median_s * 1e3);
                        o["min_ms"] = serde_json::json!(t.min_s * 1e3);
                        o["runs"] = serde_json::json!(t.runs);
                        o["flops"] = serde_json::json!(t.flops);
                        o["gflops"] = serde_json::json!(t.flop_rate() / 1e9);
                        o["tflops"] = serde_json::json!(t.flop_rate() / 1e12);
                    }
                    Err(reason) => o["unavailable"] = serde_json::json!(reason),
                }
                o
            })
            .collect(),
    )
}

impl BenchArgs {
    fn has_problem(&self) -> bool {
        self.shape.is_some()
            || self.batch.is_some()
            || self.heads.is_some()
            || self.kv_heads.is_some()
            || self.len_q.is_some()
            || self.len_kv.is_some()
            || self.head_dim.is_some()
            || self.head_dim_v.is_some()
            || self.dtype.is_some()
            || self.causal.is_some()
            || self.dropout.is_some()
            || self.mask.is_some()
            || self.varlen_q.is_some()
    }

    /// The one problem the flags name (`None`: the default set), its sizes checked so
    /// that no tensor's byte count overflows; the specification's checks come after.
    fn problem(&self) -> Result<Option<BenchProblem>, CliError> {
        if !self.has_problem() {
            return Ok(None);
        }
        let usage = |m: String| CliError::Usage(m);
        let [sb, sh, sl, se] = self.shape.unwrap_or([4, 8, 512, 64]);
        let dtype = self.dtype.unwrap_or(DType::F16);
        let heads_q = self.heads.unwrap_or(sh);
        let heads_kv = self.kv_heads.unwrap_or(heads_q);
        let head_dim = self.head_dim.unwrap_or(se);
        let head_dim_v = self.head_dim_v.unwrap_or(head_dim);
        let (batch, len_q, len_kv, varlen) = match &self.varlen_q {
            None => {
                let len_q = self.len_q.unwrap_or(sl);
                (
                    self.batch.unwrap_or(sb),
                    len_q,
                    self.len_kv.unwrap_or(len_q),
                    None,
                )
            }
            Some(lq) => {
                for (flag, given) in [
                    ("--batch", self.batch.is_some()),
                    ("--len-q", self.len_q.is_some()),
                    ("--len-kv", self.len_kv.is_some()),
                    ("--mask", self.mask.is_some_and(|m| m != MaskArg::None)),
                ] {
                    if given {
                        return Err(usage(format!(
                            "{flag}: expected nothing with --varlen-q (varlen takes B, L and S \
                             from the lengths and no mask), got a value"
                        )));
                    }
                }
                let lk = self.varlen_k.clone().unwrap_or_else(|| lq.clone());
                if lq.is_empty() {
                    return Err(usage(
                        "--varlen-q: expected at least one length, got none".into(),
                    ));
                }
                if lk.len() != lq.len() {
                    return Err(usage(format!(
                        "--varlen-k: expected {} lengths (as many as --varlen-q), got {}",
                        lq.len(),
                        lk.len()
                    )));
                }
                for (flag, lens) in [("--varlen-q", lq), ("--varlen-k", &lk)] {
                    // cu_seqlens are i32 on the device.
                    let total = lens
                        .iter()
                        .try_fold(0usize, |a, &l| a.checked_add(l))
                        .filter(|&t| t <= i32::MAX as usize);
                    if total.is_none() {
                        return Err(usage(format!(
                            "{flag}: expected lengths summing to at most {} (i32 cu_seqlens), got more",
                            i32::MAX
                        )));
                    }
                }
                let max = |l: &[usize]| l.iter().copied().max().unwrap_or(0);
                let (mq, mk) = (max(lq), max(&lk));
                let lens = VarlenLens {
                    q: lq.clone(),
                    k: lk,
                };
                (lq.len(), mq, mk, Some(lens))
            }
        };
        let mask = match self.mask.unwrap_or(MaskArg::None) {
            MaskArg::None => BenchMask::None,
            MaskArg::KeyPadding => BenchMask::KeyPadding,
            MaskArg::Bool => BenchMask::DenseBool,
            MaskArg::Additive => BenchMask::DenseAdditive,
        };
        let p = BenchProblem {
            batch,
            heads_q,
            heads_kv,
            len_q,
            len_kv,
            head_dim,
            head_dim_v,
            dtype,
            options: SdpaOptions {
                causal: match self.causal.unwrap_or(CausalArg::None) {
                    CausalArg::None => Causal::None,
                    CausalArg::TopLeft => Causal::TopLeft,
                    CausalArg::BottomRight => Causal::BottomRight,
                },
                dropout: Dropout::new(self.dropout.unwrap_or(0.0), 0x5d9a_2024, 0),
                scale: None,
                enable_gqa: heads_kv != heads_q,
                window: sdpa_core::Window {
                    left: self.window_left.unwrap_or(-1),
                    right: self.window_right.unwrap_or(-1),
                },
                softcap: self.softcap,
            },
            mask,
            varlen,
            alibi: self.alibi,
        };
        check_sizes(&p)?;
        Ok(Some(p))
    }
}

/// Every tensor's byte count must fit `isize` before a `Layout` multiplies its dims
/// (which would overflow) and before ndarray sees them (which panics).
fn check_sizes(p: &BenchProblem) -> Result<(), CliError> {
    let [qs, ks, vs] = p.shapes();
    let out = [p.batch, p.heads_q, p.len_q, p.head_dim_v];
    let mut tensors = vec![
        (
            "--batch, --heads, --len-q, --head-dim (or --shape)",
            "q [B, Hq, L, E]",
            qs.to_vec(),
        ),
        (
            "--batch, --kv-heads, --len-kv, --head-dim (or --shape)",
            "k [B, Hkv, S, E]",
            ks.to_vec(),
        ),
        (
            "--batch, --kv-heads, --len-kv, --head-dim-v (or --shape)",
            "v [B, Hkv, S, Ev]",
            vs.to_vec(),
        ),
        (
            "--batch, --heads, --len-q, --head-dim-v (or --shape)",
            "out [B, Hq, L, Ev]",
            out.to_vec(),
        ),
    ];
    if let Some(s) = p.mask_shape() {
        tensors.push((
            "--mask with --batch, --heads, --len-q, --len-kv",
            "attn_mask",
            s,
        ));
    }
    let elem = p.dtype.size_bytes().max(4);
    for (flags, what, shape) in tensors {
        let ok = shape
            .iter()
            .try_fold(elem, |acc, &d| acc.checked_mul(d.max(1)))
            .is_some_and(|b| b <= isize::MAX as usize);
        if !ok {
            return Err(CliError::Usage(format!(
                "{flags}: expected sizes whose {what} fits in memory (isize::MAX bytes), got {}",
                shape_text(&shape)
            )));
        }
    }
    Ok(())
}

/// Opens the device like `Engine::new`, but with the kernel configuration from the
/// environment, so the tile-sweep variables reach `sdpa bench` too.
fn engine(device: DeviceArg) -> Result<Engine, CliError> {
    let cpu = |reason| Engine {
        device: Device::Cpu,
        gpu: None,
        no_cuda_reason: reason,
    };
    if device == DeviceArg::Cpu {
        return Ok(cpu(None));
    }
    let config = KernelConfig::from_env()?;
    match (GpuContext::with_config(0, config), device) {
        (Ok(gpu), _) => Ok(Engine {
            device: Device::Cuda,
            gpu: Some(gpu),
            no_cuda_reason: None,
        }),
        (Err(e), DeviceArg::Cuda) => Err(CliError::Usage(format!(
            "--device: expected a usable CUDA device, got none ({e})"
        ))),
        (Err(e), _) => Ok(cpu(Some(e.to_string()))),
    }
}

/// The default benchmark set. On the CPU: the speed target (f32 [4,8,512,64]), the
/// same causal, and the tutorial's problem with its batch cut to 2. On CUDA: the five
/// issue shapes.
fn default_problems(engine: &Engine) -> Vec<BenchProblem> {
    let s = |batch, heads, len, head_dim, dtype, causal| {
        Shape {
            batch,
            heads,
            len,
            head_dim,
            dtype,
            causal,
        }
        .problem()
    };
    match engine.device {
        Device::Cpu => vec![
            s(4, 8, 512, 64, DType::F32, false),
            s(4, 8, 512, 64, DType::F32, true),
            s(2, 32, 1024, 32, DType::F16, false),
        ],
        Device::Cuda => sdpa_cuda::bench::issue_shapes()
            .iter()
            .map(|b| b.problem())
            .collect(),
    }
}

/// `sdpa bench`.
///
/// # Errors
/// Bad flags (naming the flag), problems the specification rejects or that do not fit
/// in memory, CUDA failures.
pub fn run(args: BenchArgs) -> Result<ExitCode, CliError> {
    if args.sweep {
        return run_sweep(&args);
    }
    // Validate before opening a device, so bad sizes fail fast everywhere.
    let one = args.problem()?;
    let engine = engine(args.device)?;
    let problems = match one {
        Some(p) => vec![p],
        None => default_problems(&engine),
    };
    let mut rows = Vec::new();
    for p in &problems {
        rows.extend(bench_problem(&engine, p, args.repeats, args.backward)?);
    }
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json(&rows)).expect("JSON of plain values")
        );
    } else {
        match &engine.no_cuda_reason {
            Some(why) => println!("device: {} (no CUDA device: {why})", engine.describe()),
            None => println!("device: {}", engine.describe()),
        }
        print!("{}", table(&rows));
    }
    Ok(ExitCode::SUCCESS)
}

/// `sdpa bench --sweep`.
fn run_sweep(args: &BenchArgs) -> Result<ExitCode, CliError> {
    if let Some(out) = &args.out {
        crate::output::check_target(out, &[])?;
    }
    let engine = engine(args.device)?;
    let (lens, tokens, hidden) = crate::sweep::Sweep::default_for(engine.device);
    let sweep = crate::sweep::Sweep {
        lens: args.sweep_lens.clone().unwrap_or(lens),
        head_dims: args
            .sweep_head_dims
            .clone()
            .unwrap_or_else(|| vec![64, 128]),
        causal: match args.causal {
            None => vec![false, true],
            Some(CausalArg::None) => vec![false],
            Some(CausalArg::TopLeft) => vec![true],
            Some(CausalArg::BottomRight) => {
                return Err(CliError::Usage(
                    "--causal: expected none or top-left with --sweep (L = S, where the two \
                     alignments agree), got bottom-right"
                        .to_string(),
                ))
            }
        },
        tokens: args.sweep_tokens.unwrap_or(tokens),
        hidden: args.sweep_hidden.unwrap_or(hidden),
        dtype: args.dtype.unwrap_or(DType::BF16),
        backward: args.backward,
        backends: match &args.sweep_backends {
            None => BackendSet::ALL,
            Some(list) => list.iter().fold(BackendSet::EMPTY, |set, b| {
                b.set().iter().fold(set, |set, one| set.with(one))
            }),
        },
    };
    sweep.check()?;
    let points = sweep.shapes();
    for shape in &points {
        check_sizes(&shape.problem())?;
    }
    let rows = crate::sweep::run(&engine, &sweep, args.repeats)?;
    let text = serde_json::to_string_pretty(&crate::sweep::json(&engine, &sweep, &rows))
        .expect("JSON of plain values");
    match &args.out {
        Some(out) => {
            crate::output::write(out, format!("{text}\n").as_bytes(), &[])?;
            eprintln!(
                "{} points, {} rows -> {}",
                points.len(),
                rows.len(),
                out.display()
            );
        }
        None => println!("{text}"),
    }
    Ok(ExitCode::SUCCESS)
}
