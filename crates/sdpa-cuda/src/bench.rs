//! Timing of the CUDA backends with CUDA events: warm-up, then the median of many runs,
//! rotating through input sets that together exceed the L2 cache so that no run reads
//! its inputs from cache.
//!
//! [`time_backend`] times one of the issue's five square shapes ([`BenchShape`], what
//! `sdpa-cuda-bench` prints); [`time_problem`] times any problem ([`BenchProblem`]: GQA,
//! L != S, Ev != E, causal alignment, dropout, masks, varlen), what `sdpa bench` runs;
//! [`time_backward`] times a backward ([`run_backward_benchmarks`]:
//! `sdpa-cuda-bench --backward`).

use crate::context::GpuContext;
use crate::error::{CudaError, Result};
use crate::params::Varlen;
use crate::tensor::{DeviceMask, DeviceSeqlens, DeviceTensor};
use cudarc::driver::sys::CUevent_flags;
use half::{bf16, f16};
use ndarray::{Array4, ArrayD, IxDyn};
use sdpa_core::rng::SplitMix64;
use sdpa_core::{
    check_support, Backend, BackendSet, Causal, DType, Device, Layout, MaskDesc, MaskKind, Problem,
    SdpaOptions, TensorDesc,
};
use serde::Serialize;

/// One benchmark shape: `(B, H, L=S, E)`, dtype, causal.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct BenchShape {
    /// Batch.
    pub batch: usize,
    /// Heads.
    pub heads: usize,
    /// Sequence length (L = S).
    pub len: usize,
    /// Head dim (E = Ev).
    pub head_dim: usize,
    /// dtype name.
    pub dtype: &'static str,
    /// Top-left causal.
    pub causal: bool,
}

impl BenchShape {
    /// `4*B*H*L*S*E`, halved for causal: the FLOP count the issue and PyTorch report.
    pub fn flops(&self) -> f64 {
        let full = 4.0 * (self.batch * self.heads * self.len * self.len * self.head_dim) as f64;
        if self.causal {
            full / 2.0
        } else {
            full
        }
    }

    fn dtype(&self) -> DType {
        self.dtype.parse().expect("bench dtypes are f16/bf16/f32")
    }

    /// The shape as a general problem.
    pub fn problem(&self) -> BenchProblem {
        BenchProblem {
            batch: self.batch,
            heads_q: self.heads,
            heads_kv: self.heads,
            len_q: self.len,
            len_kv: self.len,
            head_dim: self.head_dim,
            head_dim_v: self.head_dim,
            dtype: self.dtype(),
            options: SdpaOptions {
                causal: if self.causal {
                    Causal::TopLeft
                } else {
                    Causal::None
                },
                ..Default::default()
            },
            mask: BenchMask::None,
            varlen: None,
            alibi: false,
        }
    }
}

/// The issue's five shapes: the tutorial's, two more, one causal, one long.
pub fn issue_shapes() -> Vec<BenchShape> {
    let s = |batch, heads, len, head_dim, dtype, causal| BenchShape {
        batch,
        heads,
        len,
        head_dim,
        dtype,
        causal,
    };
    vec![
        s(32, 32, 1024, 32, "f16", false),
        s(16, 16, 2048, 64, "f16", false),
        s(8, 16, 4096, 128, "bf16", false),
        s(8, 16, 4096, 128, "bf16", true),
        s(4, 16, 8192, 128, "f16", false),
    ]
}

/// The `attn_mask` a benchmark problem carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BenchMask {
    /// No mask.
    None,
    /// Bool `[B, 1, 1, S]`: sequence `b` keeps its first `S - (b % 4) * S / 8` keys
    /// (a padded batch).
    KeyPadding,
    /// Bool `[B, Hq, L, S]`, each element kept with probability 0.9.
    DenseBool,
    /// Additive `[B, Hq, L, S]` in the dtype of q, uniform in `[-1, 0)`.
    DenseAdditive,
}

impl BenchMask {
    /// Its shape for a problem of `[B, Hq, L, S]` scores; `None` without a mask.
    pub fn shape(self, [b, h, l, s]: [usize; 4]) -> Option<Vec<usize>> {
        match self {
            BenchMask::None => None,
            BenchMask::KeyPadding => Some(vec![b, 1, 1, s]),
            BenchMask::DenseBool | BenchMask::DenseAdditive => Some(vec![b, h, l, s]),
        }
    }

    /// How it acts, for a problem of element type `dtype`.
    pub fn kind(self, dtype: DType) -> Option<MaskKind> {
        match self {
            BenchMask::None => None,
            BenchMask::KeyPadding | BenchMask::DenseBool => Some(MaskKind::Bool),
            BenchMask::DenseAdditive => Some(MaskKind::Additive(dtype)),
        }
    }

    /// The bool mask's contents (key padding or dense); `None` for the others.
    pub fn bool_values(self, shape: &[usize], seed: u64) -> Option<ArrayD<bool>> {
        let mut rng = SplitMix64(seed);
        match self {
            BenchMask::KeyPadding => {
                let s = shape[3];
                Some(ArrayD::from_shape_fn(IxDyn(shape), |ix| {
                    // Every sequence keeps at least one key, so no row is fully masked.
                    ix[3] < (s - (ix[0] % 4) * s / 8).max(1)
                }))
            }
            BenchMask::DenseBool => Some(ArrayD::from_shape_simple_fn(IxDyn(shape), || {
                rng.unit() < 0.9
            })),
            BenchMask::None | BenchMask::DenseAdditive => None,
        }
    }

    /// The additive mask's contents, as f64 (converted to the dtype by the caller).
    pub fn additive_values(self, shape: &[usize], seed: u64) -> Option<ArrayD<f64>> {
        let mut rng = SplitMix64(seed);
        (self == BenchMask::DenseAdditive)
            .then(|| ArrayD::from_shape_simple_fn(IxDyn(shape), || -rng.unit()))
    }
}

/// Per-sequence lengths of a varlen problem (CUDA only): `q[b]` query rows and `k[b]`
/// keys for sequence `b`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VarlenLens {
    /// Query lengths.
    pub q: Vec<usize>,
    /// Key/value lengths (as many as `q`).
    pub k: Vec<usize>,
}

/// Any benchmark problem: `q [B, Hq, L, E]`, `k [B, Hkv, S, E]`, `v [B, Hkv, S, Ev]`,
/// contiguous, with options and a mask; or packed variable-length sequences.
#[derive(Debug, Clone, PartialEq)]
pub struct BenchProblem {
    /// `B` (the number of sequences under varlen).
    pub batch: usize,
    /// `Hq`.
    pub heads_q: usize,
    /// `Hkv`.
    pub heads_kv: usize,
    /// `L` (the longest query sequence under varlen).
    pub len_q: usize,
    /// `S` (the longest key sequence under varlen).
    pub len_kv: usize,
    /// `E`.
    pub head_dim: usize,
    /// `Ev`.
    pub head_dim_v: usize,
    /// Element type of q, k, v and out.
    pub dtype: DType,
    /// Causal, dropout, scale, GQA.
    pub options: SdpaOptions,
    /// The mask (none under varlen).
    pub mask: BenchMask,
    /// Packed sequences instead of dense tensors.
    pub varlen: Option<VarlenLens>,
    /// ALiBi slopes `[Hq]` (`2^(-8 (h + 1) / Hq)`), dense problems only.
    pub alibi: bool,
}

impl BenchProblem {
    /// `[B, Hq, L, E]`, `[B, Hkv, S, E]`, `[B, Hkv, S, Ev]`: dense, or padded under varlen.
    pub fn shapes(&self) -> [[usize; 4]; 3] {
        [
            [self.batch, self.heads_q, self.len_q, self.head_dim],
            [self.batch, self.heads_kv, self.len_kv, self.head_dim],
            [self.batch, self.heads_kv, self.len_kv, self.head_dim_v],
        ]
    }

    /// `[B, Hq, L, S]`.
    pub fn scores_shape(&self) -> [usize; 4] {
        [self.batch, self.heads_q, self.len_q, self.len_kv]
    }

    /// The mask's shape, if any.
    pub fn mask_shape(&self) -> Option<Vec<usize>> {
        self.mask.shape(self.scores_shape())
    }

    /// Total query and key rows under varlen.
    pub fn totals(&self) -> Option<(usize, usize)> {
        self.varlen
            .as_ref()
            .map(|v| (v.q.iter().sum(), v.k.iter().sum()))
    }

    /// The validated problem: dense, or the padded problem turned varlen over the packed
    /// `[1, H, total, dim]` views the kernels read. Callers with sizes from users check
    /// that every tensor's element count fits `isize` first (`Layout` multiplies them).
    ///
    /// # Errors
    /// What [`Problem::new`] rejects.
    pub fn problem(&self) -> sdpa_core::Result<Problem> {
        let [qs, ks, vs] = self.shapes();
        let mask = self
            .mask_shape()
            .zip(self.mask.kind(self.dtype))
            .map(|(shape, kind)| MaskDesc::contiguous(kind, &shape));
        let t = |shape| TensorDesc::contiguous(self.dtype, shape);
        let problem = Problem::new(&t(qs), &t(ks), &t(vs), mask.as_ref(), &self.options)?;
        Ok(match self.totals() {
            None => problem,
            Some((tq, tk)) => problem.into_varlen(
                packed_layout(self.heads_q, tq, self.head_dim),
                packed_layout(self.heads_kv, tk, self.head_dim),
                packed_layout(self.heads_kv, tk, self.head_dim_v),
            ),
        })
    }

    /// `2*B*Hq*L*S*(E + Ev)` as [`Problem::flops`] counts it (halved under causal), or
    /// under varlen the same summed over the sequences' own `L_b * S_b`. Masks and
    /// dropout do not change the count.
    pub fn flops(&self) -> f64 {
        let pairs = match &self.varlen {
            None => self.batch as f64 * self.len_q as f64 * self.len_kv as f64,
            Some(v) => {
                v.q.iter()
                    .zip(&v.k)
                    .map(|(&l, &s)| l as f64 * s as f64)
                    .sum()
            }
        };
        let full = 2.0 * self.heads_q as f64 * pairs * (self.head_dim + self.head_dim_v) as f64;
        if self.options.causal == Causal::None {
            full
        } else {
            full / 2.0
        }
    }
}

/// `[total, H, dim]` storage seen as `[1, H, total, dim]`.
fn packed_layout(heads: usize, total: usize, dim: usize) -> Layout {
    Layout {
        shape: [1, heads, total, dim],
        strides: [0, dim as isize, (heads * dim) as isize, 1],
    }
}

/// Input sets the timing rotates through so that together they exceed twice the L2
/// cache (2 to 16 sets of `set_bytes` each).
pub fn input_sets(set_bytes: usize, l2_bytes: usize) -> usize {
    (2 * l2_bytes).div_ceil(set_bytes.max(1)).clamp(2, 16)
}

/// One timing.
#[derive(Debug, Clone, Serialize)]
pub struct BenchRow {
    /// The shape.
    pub shape: BenchShape,
    /// Backend name.
    pub backend: String,
    /// Median milliseconds per call.
    pub median_ms: f64,
    /// Fastest run.
    pub min_ms: f64,
    /// Timed runs.
    pub runs: usize,
    /// TFLOP/s at the median.
    pub tflops: f64,
}

/// Event times of one backend on one problem.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Timing {
    /// Median milliseconds per call.
    pub median_ms: f64,
    /// Fastest call.
    pub min_ms: f64,
    /// Timed calls.
    pub runs: usize,
}

fn random_tensor(
    gpu: &GpuContext,
    dtype: DType,
    shape: [usize; 4],
    seed: u64,
) -> Result<DeviceTensor> {
    let mut rng = SplitMix64(seed);
    let mut next = move || rng.symmetric();
    let dims = (shape[0], shape[1], shape[2], shape[3]);
    match dtype {
        DType::F16 => DeviceTensor::upload(
            gpu,
            Array4::from_shape_simple_fn(dims, || f16::from_f64(next())).view(),
        ),
        DType::BF16 => DeviceTensor::upload(
            gpu,
            Array4::from_shape_simple_fn(dims, || bf16::from_f64(next())).view(),
        ),
        DType::F32 => DeviceTensor::upload(
            gpu,
            Array4::from_shape_simple_fn(dims, || next() as f32).view(),
        ),
        DType::F64 => DeviceTensor::upload(gpu, Array4::from_shape_simple_fn(dims, next).view()),
    }
}

fn upload_mask(gpu: &GpuContext, bench: &BenchProblem, seed: u64) -> Result<Option<DeviceMask>> {
    let Some(shape) = bench.mask_shape() else {
        return Ok(None);
    };
    if let Some(b) = bench.mask.bool_values(&shape, seed) {
        return DeviceMask::upload_bool(gpu, b.view()).map(Some);
    }
    let a = bench
        .mask
        .additive_values(&shape, seed)
        .expect("a mask is bool or additive");
    match bench.dtype {
        DType::F64 => DeviceMask::upload_additive(gpu, a.view()),
        DType::F32 => DeviceMask::upload_additive(gpu, a.mapv(|x| x as f32).view()),
        DType::F16 => DeviceMask::upload_additive(gpu, a.mapv(f16::from_f64).view()),
        DType::BF16 => DeviceMask::upload_additive(gpu, a.mapv(bf16::from_f64).view()),
    }
    .map(Some)
}

fn cu_seqlens(gpu: &GpuContext, lens: &[usize]) -> Result<DeviceSeqlens> {
    let mut cu = Vec::with_capacity(lens.len() + 1);
    let mut total = 0i64;
    cu.push(0i32);
    for &len in lens {
        total += len as i64;
        cu.push(i32::try_from(total).map_err(|_| {
            crate::CudaError::bad_layout("cu_seqlens", "offsets that fit i32", total)
        })?);
    }
    DeviceSeqlens::upload_i32(gpu, &cu)
}

/// Times `backend` on `bench`: `warmup` untimed calls, then up to `max_runs` timed ones
/// (fewer when they would take over `budget_ms` in all), each between two CUDA events,
/// over enough input sets (q, k, v; one mask shared) to exceed twice the L2 cache.
/// Dense problems run into preallocated outputs ([`GpuContext::run`]); varlen ones
/// through [`GpuContext::sdpa_varlen`], whose stream-ordered output allocation is inside
/// the timed region. `Ok(None)` if the backend does not take the problem.
pub fn time_problem(
    gpu: &GpuContext,
    bench: &BenchProblem,
    backend: Backend,
    warmup: usize,
    max_runs: usize,
    budget_ms: f64,
) -> Result<Option<Timing>> {
    let problem = bench.problem()?;
    if check_support(backend, &problem, Device::Cuda).is_err() {
        return Ok(None);
    }
    let dtype = bench.dtype;
    let shapes = match bench.totals() {
        None => bench.shapes(),
        Some((tq, tk)) => [
            [1, 1, tq * bench.heads_q, bench.head_dim],
            [1, 1, tk * bench.heads_kv, bench.head_dim],
            [1, 1, tk * bench.heads_kv, bench.head_dim_v],
        ],
    };
    let set_bytes: usize = shapes
        .iter()
        .map(|s| s.iter().product::<usize>() * dtype.size_bytes())
        .sum();
    let sets = input_sets(set_bytes, gpu.l2_bytes()?);
    let mut inputs = Vec::with_capacity(sets);
    for i in 0..sets {
        let seed = 3 * i as u64;
        let mut set = Vec::with_capacity(3);
        for (j, &shape) in shapes.iter().enumerate() {
            let t = random_tensor(gpu, dtype, shape, seed + j as u64)?;
            set.push(match bench.totals() {
                None => t,
                Some((tq, tk)) => {
                    let (heads, total) = if j == 0 {
                        (bench.heads_q, tq)
                    } else {
                        (bench.heads_kv, tk)
                    };
                    let l = packed_layout(heads, total, shape[3]);
                    t.view(l.shape, l.strides, 0)?
                }
            });
        }
        inputs.push(set);
    }
    let mask = upload_mask(gpu, bench, 0x6d61_736b)?;
    let slopes = if bench.alibi {
        let h = bench.heads_q;
        let s = ndarray::Array1::from_vec(sdpa_core::geometric_alibi_slopes(h));
        Some(crate::tensor::DeviceSlopes::upload(
            gpu,
            s.view().into_dyn(),
            bench.batch,
            h,
        )?)
    } else {
        None
    };
    let seqlens = match &bench.varlen {
        None => None,
        Some(v) => Some((cu_seqlens(gpu, &v.q)?, cu_seqlens(gpu, &v.k)?)),
    };
    let out = DeviceTensor::alloc(gpu, dtype, problem.out_shape())?;
    let [b, h, l] = problem.lse_shape();
    let lse = DeviceTensor::alloc(gpu, DType::F32, [b, h, l, 1])?;
    let call = |i: usize| -> Result<()> {
        let [q, k, v] = &inputs[i % sets][..] else {
            unreachable!("three tensors per set")
        };
        match &seqlens {
            None => gpu.run(
                backend,
                &problem,
                q,
                k,
                v,
                mask.as_ref(),
                slopes.as_ref(),
                &out,
                &lse,
            ),
            Some((cq, ck)) => gpu
                .sdpa_varlen(
                    q,
                    k,
                    v,
                    Varlen {
                        cu_seqlens_q: cq,
                        cu_seqlens_k: ck,
                    },
                    &bench.options,
                    BackendSet::only(backend),
                )
                .map(drop),
        }
    };
    time_calls(gpu, warmup, max_runs, budget_ms, 5, call).map(Some)
}

/// `warmup` untimed calls of `call(i)`, then up to `max_runs` timed ones, each between
/// two CUDA events on the context's stream, stopping once they took `budget_ms` in all
/// and at least `min_runs` ran.
fn time_calls(
    gpu: &GpuContext,
    warmup: usize,
    max_runs: usize,
    budget_ms: f64,
    min_runs: usize,
    call: impl Fn(usize) -> Result<()>,
) -> Result<Timing> {
    for i in 0..warmup {
        call(i)?;
    }
    gpu.synchronize()?;
    let ctx = gpu.cuda();
    let mut times = Vec::new();
    let mut spent = 0.0;
    for i in 0..max_runs.max(1) {
        let start = ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
        let end = ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
        start.record(gpu.stream())?;
        call(i + warmup)?;
        end.record(gpu.stream())?;
        end.synchronize()?;
        let ms = start.elapsed_ms(&end)? as f64;
        times.push(ms);
        spent += ms;
        if spent > budget_ms && times.len() >= min_runs {
            break;
        }
    }
    times.sort_by(f64::total_cmp);
    Ok(Timing {
        median_ms: times[times.len() / 2],
        min_ms: times[0],
        runs: times.len(),
    })
}

/// Times the backward of `backend` on dense `bench` ([`GpuContext::sdpa_backward`] with
/// only that backend: the gradients' stream-ordered allocation is inside the timed
/// region): one input set (every benchmark tensor already exceeds the L2 cache), `out`
/// and `lse` from one forward of the fastest forward backend that takes the problem, a
/// random `dout`. `Ok(None)` if the backend has no backward for the problem or it is
/// varlen.
pub fn time_backward(
    gpu: &GpuContext,
    bench: &BenchProblem,
    backend: Backend,
    warmup: usize,
    max_runs: usize,
    budget_ms: f64,
) -> Result<Option<Timing>> {
    let problem = bench.problem()?;
    if bench.varlen.is_some()
        || crate::select_backward(&problem, BackendSet::only(backend), None).is_err()
    {
        return Ok(None);
    }
    let dtype = bench.dtype;
    let [qs, ks, vs] = bench.shapes();
    let q = random_tensor(gpu, dtype, qs, 1)?;
    let k = random_tensor(gpu, dtype, ks, 2)?;
    let v = random_tensor(gpu, dtype, vs, 3)?;
    let dout = random_tensor(gpu, dtype, problem.out_shape(), 4)?;
    let mask = upload_mask(gpu, bench, 0x6d61_736b)?;
    let out = DeviceTensor::alloc(gpu, dtype, problem.out_shape())?;
    let [b, h, l] = problem.lse_shape();
    let lse = DeviceTensor::alloc(gpu, DType::F32, [b, h, l, 1])?;
    let forward = Backend::PRIORITY
        .into_iter()
        .find(|&f| check_support(f, &problem, Device::Cuda).is_ok())
        .unwrap_or(Backend::Math);
    gpu.run(
        forward,
        &problem,
        &q,
        &k,
        &v,
        mask.as_ref(),
        None,
        &out,
        &lse,
    )?;
    let call = |_| -> Result<()> {
        gpu.sdpa_backward(
            &q,
            &k,
            &v,
            &out,
            &lse,
            &dout,
            mask.as_ref(),
            &bench.options,
            BackendSet::only(backend),
        )
        .map(drop)
    };
    time_calls(gpu, warmup, max_runs, budget_ms, 3, call).map(Some)
}

/// One backward benchmark row: the problem's label, the backend, the times and TFLOP/s
/// counting the backward as 2.5x the forward's FLOPs (FlashAttention's convention).
#[derive(Debug, Clone, Serialize)]
pub struct BackwardRow {
    /// `B,H,L,E,dtype,causal[,variant]`: what ci/bench_torch_bwd.py keys on.
    pub label: String,
    /// Backend.
    pub backend: String,
    /// Median milliseconds.
    pub median_ms: f64,
    /// Fastest run.
    pub min_ms: f64,
    /// Timed runs.
    pub runs: usize,
    /// TFLOP/s at the median (2.5x the forward's FLOPs).
    pub tflops: f64,
}

/// The backward benchmarks: the five shapes, then the second with dropout 0.1 and with a
/// key-padding mask, each on flash (where it takes the problem), efficient and math.
pub fn run_backward_benchmarks(gpu: &GpuContext) -> Result<Vec<BackwardRow>> {
    // The label ci/bench_torch_bwd.py keys its rows by.
    let label = |s: &BenchShape| {
        format!(
            "{},{},{},{},{},{}",
            s.batch, s.heads, s.len, s.head_dim, s.dtype, s.causal
        )
    };
    let row = |label: &str, backend: Backend, problem: &BenchProblem, t: Timing| BackwardRow {
        label: label.to_string(),
        backend: backend.name().to_string(),
        median_ms: t.median_ms,
        min_ms: t.min_ms,
        runs: t.runs,
        tflops: 2.5 * problem.flops() / (t.median_ms * 1e-3) / 1e12,
    };
    let shapes = selected_shapes()?;
    let mut problems: Vec<(String, BenchProblem)> = shapes
        .iter()
        .map(|(_, shape)| (label(shape), shape.problem()))
        .collect();
    // The second shape with dropout and with a key-padding mask (where it is selected).
    if let Some((_, second)) = shapes.iter().find(|(i, _)| *i == 1) {
        let base = label(second);
        let mut dropout = second.problem();
        dropout.options.dropout = sdpa_core::Dropout::new(0.1, 0, 0);
        problems.push((format!("{base},dropout0.1"), dropout));
        let mut padded = second.problem();
        padded.mask = BenchMask::KeyPadding;
        problems.push((format!("{base},keypadding"), padded));
    }
    let mut rows = Vec::new();
    // The deterministic mode on flash, the shapes again (SDPA_BENCH_DETERMINISTIC=0: not).
    let deterministic = !std::env::var("SDPA_BENCH_DETERMINISTIC").is_ok_and(|v| v == "0");
    for (_, shape) in shapes.iter().filter(|_| deterministic) {
        let problem = shape.problem();
        gpu.set_deterministic_backward(true);
        let timed = time_backward(gpu, &problem, Backend::Flash, 2, 10, 800.0);
        gpu.set_deterministic_backward(false);
        if let Some(t) = timed? {
            let name = format!("{},deterministic", label(shape));
            rows.push(row(&name, Backend::Flash, &problem, t));
        }
    }
    for (name, problem) in problems {
        for backend in Backend::PRIORITY {
            // SDPA_BENCH_BACKENDS=flash times only those (tile sweeps).
            if let Ok(only) = std::env::var("SDPA_BENCH_BACKENDS") {
                if !only.split(',').any(|b| b.trim() == backend.name()) {
                    continue;
                }
            }
            let (warmup, runs, budget) = match backend {
                Backend::Math => (1, 5, 800.0),
                _ => (2, 10, 800.0),
            };
            if let Some(t) = time_backward(gpu, &problem, backend, warmup, runs, budget)? {
                rows.push(row(&name, backend, &problem, t));
            }
        }
    }
    Ok(rows)
}

/// Times `backend` on one of the square shapes ([`time_problem`] on
/// [`BenchShape::problem`]). `None` if the backend does not take the shape.
pub fn time_backend(
    gpu: &GpuContext,
    shape: &BenchShape,
    backend: Backend,
    warmup: usize,
    max_runs: usize,
    budget_ms: f64,
) -> Result<Option<BenchRow>> {
    let timing = time_problem(gpu, &shape.problem(), backend, warmup, max_runs, budget_ms)?;
    Ok(timing.map(|t| BenchRow {
        shape: *shape,
        backend: backend.name().to_string(),
        median_ms: t.median_ms,
        min_ms: t.min_ms,
        runs: t.runs,
        tflops: shape.flops() / (t.median_ms * 1e-3) / 1e12,
    }))
}

/// Warm-up calls, timed calls at most, and the time budget (ms) of one backend: math is
/// slow on the large shapes, so it gets fewer runs.
pub fn runs_for(backend: Backend) -> (usize, usize, f64) {
    match backend {
        Backend::Math => (2, 10, 1500.0),
        _ => (5, 50, 1500.0),
    }
}

/// The shapes of [`issue_shapes`] with their indices; `SDPA_BENCH_SHAPES=0,1` keeps only
/// those (tile sweeps, profiles). `SDPA_BENCH_SHAPE_LIST` replaces the list (head-dim
/// and length sweeps; [`parse_shape_list`]).
fn selected_shapes() -> Result<Vec<(usize, BenchShape)>> {
    let only = std::env::var("SDPA_BENCH_SHAPES").ok();
    let shapes = match std::env::var("SDPA_BENCH_SHAPE_LIST") {
        Ok(list) => parse_shape_list(&list).map_err(|e| {
            CudaError::bad_layout(
                "SDPA_BENCH_SHAPE_LIST",
                "B,H,L,E,f16|bf16,true|false;...",
                e,
            )
        })?,
        Err(_) => issue_shapes(),
    };
    Ok(shapes
        .into_iter()
        .enumerate()
        .filter(|(i, _)| {
            only.as_ref()
                .is_none_or(|o| o.split(',').any(|s| s.trim() == i.to_string()))
        })
        .collect())
}

/// `B,H,L,E,dtype,causal` shapes separated by `;` (dtype `f16` or `bf16`, causal `true`
/// or `false`), the form `ci/bench_torch.py --shapes` takes; an error names the entry.
pub fn parse_shape_list(list: &str) -> std::result::Result<Vec<BenchShape>, String> {
    let mut shapes = Vec::new();
    for entry in list.split(';').map(str::trim).filter(|e| !e.is_empty()) {
        let f: Vec<&str> = entry.split(',').map(str::trim).collect();
        let bad = || format!("{entry:?}");
        if f.len() != 6 {
            return Err(bad());
        }
        let num = |s: &str| s.parse::<usize>().ok().filter(|&n| n > 0).ok_or_else(bad);
        let dtype = match f[4] {
            "f16" => "f16",
            "bf16" => "bf16",
            _ => return Err(bad()),
        };
        let causal = f[5].parse::<bool>().map_err(|_| bad())?;
        shapes.push(BenchShape {
            batch: num(f[0])?,
            heads: num(f[1])?,
            len: num(f[2])?,
            head_dim: num(f[3])?,
            dtype,
            causal,
        });
    }
    if shapes.is_empty() {
        return Err("no shape".to_string());
    }
    Ok(shapes)
}

/// Every backend on every shape of [`issue_shapes`] (or those `SDPA_BENCH_SHAPES` keeps).
pub fn run_issue_benchmarks(gpu: &GpuContext) -> Result<Vec<BenchRow>> {
    let mut rows = Vec::new();
    for (_, shape) in selected_shapes()? {
        for backend in Backend::PRIORITY {
            // SDPA_BENCH_BACKENDS=flash,math times only those.
            if let Ok(only) = std::env::var("SDPA_BENCH_BACKENDS") {
                if !only.split(',').any(|b| b.trim() == backend.name()) {
                    continue;
                }
            }
            let (warmup, runs, budget) = runs_for(backend);
            if let Some(row) = time_backend(gpu, &shape, backend, warmup, runs, budget)? {
                rows.push(row);
            }
        }
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shape_lists_parse_and_bad_entries_are_named() {
        let shapes = parse_shape_list("2,16,4096,96,bf16,true; 1,8,512,256,f16,false;").unwrap();
        assert_eq!(shapes.len(), 2);
        assert_eq!(
            (
                shapes[0].batch,
                shapes[0].heads,
                shapes[0].len,
                shapes[0].head_dim
            ),
            (2, 16, 4096, 96)
        );
        assert_eq!((shapes[0].dtype, shapes[0].causal), ("bf16", true));
        assert_eq!((shapes[1].dtype, shapes[1].causal), ("f16", false));
        for bad in [
            "1,8,512,256,f32,false",
            "1,8,512,256,f16",
            "0,8,512,64,f16,false",
            "1,8,x,64,f16,true",
            "1,8,64,64,f16,yes",
        ] {
            let e = parse_shape_list(bad).unwrap_err();
            assert!(e.contains(bad), "{bad}: {e}");
        }
        assert!(parse_shape_list(" ; ").is_err());
    }
}

/// One decode benchmark: `q [B, Hq, Lq, E]` over a cache of `S` keys a row (all rows
/// full), dense or paged, bf16.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct DecodeShape {
    /// Batch.
    pub batch: usize,
    /// Query heads.
    pub heads_q: usize,
    /// KV heads.
    pub heads_kv: usize,
    /// Query rows a call (1: decoding; hundreds: chunked prefill).
    pub len_q: usize,
    /// Keys each row attends to.
    pub len_kv: usize,
    /// Head dim.
    pub head_dim: usize,
    /// 0: dense; else the paged cache's block size.
    pub block_size: usize,
}

impl DecodeShape {
    /// K and V bytes one call reads (bf16).
    pub fn kv_bytes(&self) -> f64 {
        (2 * self.batch * self.heads_kv * self.len_kv * self.head_dim * 2) as f64
    }
}

/// The issue's decode grid: GQA 32/8 and MHA at D = 128, B from 1 to 128, S from 2k to
/// 128k; paged at block sizes 16 and 256; chunked prefill (Lq = 512 over 8k keys).
pub fn decode_shapes() -> Vec<DecodeShape> {
    let d = |batch, heads_q, heads_kv, len_q, len_kv, block_size| DecodeShape {
        batch,
        heads_q,
        heads_kv,
        len_q,
        len_kv,
        head_dim: 128,
        block_size,
    };
    vec![
        d(1, 32, 8, 1, 2048, 0),
        d(1, 32, 8, 1, 32768, 0),
        d(1, 32, 8, 1, 131072, 0),
        d(8, 32, 8, 1, 8192, 0),
        d(8, 32, 8, 1, 32768, 0),
        d(64, 32, 8, 1, 4096, 0),
        d(128, 32, 8, 1, 2048, 0),
        d(128, 32, 8, 1, 8192, 0),
        d(1, 32, 32, 1, 32768, 0),
        d(8, 32, 32, 1, 8192, 0),
        d(64, 32, 32, 1, 4096, 0),
        d(8, 32, 8, 1, 32768, 16),
        d(8, 32, 8, 1, 32768, 256),
        d(64, 32, 8, 1, 4096, 16),
        d(64, 32, 8, 1, 4096, 256),
        d(1, 32, 8, 512, 8192, 0),
    ]
}

/// One decode timing.
#[derive(Debug, Clone, Serialize)]
pub struct DecodeRow {
    /// The shape.
    pub shape: DecodeShape,
    /// Median microseconds a call (the append-free decode call, uploads of the lengths
    /// and the table and the output allocation included).
    pub median_us: f64,
    /// Fastest call.
    pub min_us: f64,
    /// K/V bytes over the median time, GB/s.
    pub kv_gbs: f64,
    /// Key splits chosen.
    pub splits: usize,
    /// `split-kv tc` (the tensor-core split kernel), `split-kv` (the scalar one), or the
    /// fused forward backend a long chunk ran on.
    pub path: String,
}

/// Times [`GpuContext::attention_with_kvcache`] on every shape of [`decode_shapes`]
/// (`SDPA_BENCH_SHAPES=0,3` keeps some), rotating caches so that they exceed twice the
/// L2 cache.
pub fn run_decode_benchmarks(gpu: &GpuContext) -> Result<Vec<DecodeRow>> {
    let only = std::env::var("SDPA_BENCH_SHAPES").ok();
    let mut rows = Vec::new();
    for (i, shape) in decode_shapes().into_iter().enumerate() {
        if only
            .as_ref()
            .is_some_and(|o| !o.split(',').any(|s| s.trim() == i.to_string()))
        {
            continue;
        }
        rows.push(time_decode(gpu, &shape)?);
    }
    Ok(rows)
}

fn time_decode(gpu: &GpuContext, shape: &DecodeShape) -> Result<DecodeRow> {
    let (b, hq, hkv, lq, s, e) = (
        shape.batch,
        shape.heads_q,
        shape.heads_kv,
        shape.len_q,
        shape.len_kv,
        shape.head_dim,
    );
    let bs = shape.block_size;
    let cache_shape = if bs == 0 {
        [b, hkv, s, e]
    } else {
        [b * s.div_ceil(bs), bs, hkv, e]
    };
    let sets = input_sets(shape.kv_bytes() as usize, gpu.l2_bytes()?);
    let mut caches = Vec::with_capacity(sets);
    for i in 0..sets {
        let k = random_tensor(gpu, DType::BF16, cache_shape, 10 * i as u64)?;
        let v = random_tensor(gpu, DType::BF16, cache_shape, 10 * i as u64 + 1)?;
        caches.push((k, v));
    }
    let q = random_tensor(gpu, DType::BF16, [b, hq, lq, e], 7)?;
    let per_row = if bs == 0 { 0 } else { s.div_ceil(bs) };
    // Row r's blocks are interleaved across rows (block m * B + r), so that a row's pages
    // are not contiguous. Empty (and unused) for a dense cache.
    let table = ndarray::Array2::from_shape_fn((b, per_row), |(r, m)| (m * b + r) as i32);
    let lens = ndarray::Array1::from_elem(b, s as i32);
    let options = sdpa_core::SdpaOptions::default();
    let splits = std::cell::Cell::new(0);
    let path = std::cell::Cell::new("");
    let call = |i: usize| -> Result<()> {
        let (k, v) = &caches[i % sets];
        let cache = if bs == 0 {
            crate::DeviceKvCache::Dense { k, v }
        } else {
            crate::DeviceKvCache::Paged {
                k,
                v,
                block_table: table.view(),
            }
        };
        let r = gpu.attention_with_kvcache(&q, cache, lens.view(), None, None, &options, None)?;
        splits.set(r.splits);
        path.set(match r.fused {
            Some(backend) => backend.name(),
            None if r.tensor_cores => "split-kv tc",
            None => "split-kv",
        });
        Ok(())
    };
    let t = time_calls(gpu, 5, 100, 1500.0, 10, call)?;
    Ok(DecodeRow {
        shape: *shape,
        median_us: t.median_ms * 1e3,
        min_us: t.min_ms * 1e3,
        kv_gbs: shape.kv_bytes() / (t.median_ms * 1e-3) / 1e9,
        splits: splits.get(),
        path: path.get().to_string(),
    })
}
