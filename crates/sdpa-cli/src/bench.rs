//! Timing each backend on a problem: warm-up, then the median of repeats.

use crate::engine::Engine;
use crate::error::CliError;
use sdpa_core::{Backend, Causal, DType, SdpaOptions};
use sdpa_harness::case::Case;
use sdpa_harness::run;
use sdpa_harness::strategies::{MaskSpec, ProblemSpec};
use std::time::Instant;

/// A dense benchmark problem: `q, k, v [B, H, L, E]`.
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
    /// `(B,H,L,E) dtype [causal]`.
    pub fn label(&self) -> String {
        format!(
            "({},{},{},{}) {}{}",
            self.batch,
            self.heads,
            self.len,
            self.head_dim,
            self.dtype,
            if self.causal { " causal" } else { "" }
        )
    }

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
            options: SdpaOptions {
                causal: if self.causal {
                    Causal::TopLeft
                } else {
                    Causal::None
                },
                ..Default::default()
            },
            data_seed: seed,
        }
        .to_case(self.dtype)
    }
}

/// One backend on one shape.
#[derive(Debug, Clone)]
pub struct Row {
    /// `auto` resolves to a backend; kept as the label shown.
    pub label: String,
    /// The backend that ran (or would have).
    pub backend: Backend,
    /// Where.
    pub device: String,
    /// The problem.
    pub shape: Shape,
    /// Median seconds and runs, or why it could not run.
    pub result: Result<Timing, String>,
}

/// Measured time of one backend.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// Median wall time of one call, seconds.
    pub median_s: f64,
    /// Fastest call, seconds.
    pub min_s: f64,
    /// Timed calls (after warm-up).
    pub runs: usize,
    /// Floating-point operations of one call (4*B*H*L*S*E, halved for causal).
    pub flops: f64,
}

impl Timing {
    /// GFLOP/s at the median.
    pub fn gflops(&self) -> f64 {
        self.flops / self.median_s / 1e9
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

/// Times `backend` on `case`: one warm-up call, then `repeats` calls (at least 1),
/// wall time around each call. On CUDA: device events around each launch on resident
/// inputs, rotating over input sets larger than L2 (`sdpa_cuda::bench::time_backend`).
pub fn time_backend(
    engine: &Engine,
    backend: Backend,
    shape: &Shape,
    case: &Case,
    repeats: usize,
) -> Result<Timing, CliError> {
    let problem = run::problem(case)?;
    if let Some(gpu) = &engine.gpu {
        let bench_shape = sdpa_cuda::bench::BenchShape {
            batch: shape.batch,
            heads: shape.heads,
            len: shape.len,
            head_dim: shape.head_dim,
            dtype: shape.dtype.name(),
            causal: shape.causal,
        };
        let row = sdpa_cuda::bench::time_backend(
            gpu,
            &bench_shape,
            backend,
            3,
            repeats.max(1) * 10,
            2000.0,
        )?
        .ok_or_else(|| CliError::Usage(format!("{backend} cannot run {}", shape.label())))?;
        return Ok(Timing {
            median_s: row.median_ms / 1e3,
            min_s: row.min_ms / 1e3,
            runs: row.runs,
            flops: problem.flops(),
        });
    }
    engine.run(backend, case)?;
    let mut times = Vec::with_capacity(repeats.max(1));
    for _ in 0..repeats.max(1) {
        let start = Instant::now();
        let out = engine.run(backend, case)?;
        times.push(start.elapsed().as_secs_f64());
        std::hint::black_box(out);
    }
    let min_s = times.iter().copied().fold(f64::INFINITY, f64::min);
    Ok(Timing {
        median_s: median(times.clone()),
        min_s,
        runs: times.len(),
        flops: problem.flops(),
    })
}

/// Every backend (and `auto`) on `shape`: timed where supported, else the reason.
pub fn bench_shape(engine: &Engine, shape: Shape, repeats: usize) -> Result<Vec<Row>, CliError> {
    let case = shape.case(0x5d9a_2024);
    let problem = run::problem(&case)?;
    let device = engine.device.to_string();
    let mut rows = Vec::new();
    let auto = engine.select(sdpa_core::BackendSet::ALL, &problem)?;
    for (label, backend) in [
        (format!("auto ({auto})"), auto),
        ("math".to_string(), Backend::Math),
        ("flash".to_string(), Backend::Flash),
        ("efficient".to_string(), Backend::Efficient),
    ] {
        let result = match engine.supports(backend, &problem) {
            Ok(()) => Ok(time_backend(engine, backend, &shape, &case, repeats)?),
            Err(reason) => Err(reason),
        };
        rows.push(Row {
            label,
            backend,
            device: device.clone(),
            shape,
            result,
        });
    }
    Ok(rows)
}

/// Human-readable, aligned table.
pub fn table(rows: &[Row]) -> String {
    let mut out = format!(
        "{:<18} {:<6} {:<28} {:>12} {:>10}  {}\n",
        "backend", "device", "problem", "median", "GFLOP/s", "note"
    );
    for r in rows {
        match &r.result {
            Ok(t) => out.push_str(&format!(
                "{:<18} {:<6} {:<28} {:>9.3} ms {:>10.1}  {} runs, min {:.3} ms\n",
                r.label,
                r.device,
                r.shape.label(),
                t.median_s * 1e3,
                t.gflops(),
                t.runs,
                t.min_s * 1e3
            )),
            Err(reason) => out.push_str(&format!(
                "{:<18} {:<6} {:<28} {:>12} {:>10}  cannot run here: {}\n",
                r.label,
                r.device,
                r.shape.label(),
                "-",
                "-",
                reason
            )),
        }
    }
    out
}

/// The rows as JSON objects.
pub fn json(rows: &[Row]) -> serde_json::Value {
    serde_json::Value::Array(
        rows.iter()
            .map(|r| {
                let mut o = serde_json::json!({
                    "backend": r.label,
                    "resolved": r.backend.name(),
                    "device": r.device,
                    "batch": r.shape.batch,
                    "heads": r.shape.heads,
                    "len": r.shape.len,
                    "head_dim": r.shape.head_dim,
                    "dtype": r.shape.dtype.name(),
                    "causal": r.shape.causal,
                });
                match &r.result {
                    Ok(t) => {
                        o["median_ms"] = serde_json::json!(t.median_s * 1e3);
                        o["min_ms"] = serde_json::json!(t.min_s * 1e3);
                        o["runs"] = serde_json::json!(t.runs);
                        o["gflops"] = serde_json::json!(t.gflops());
                    }
                    Err(reason) => o["unavailable"] = serde_json::json!(reason),
                }
                o
            })
            .collect(),
    )
}
