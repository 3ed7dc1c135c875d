//! `sdpa bench --sweep`: every backend over sequence length and head dim, the way
//! FlashAttention's README benchmarks are laid out (a fixed number of tokens B*L and a
//! fixed hidden size H*E, so every point does the same work per token), written as
//! JSON that `sdpa chart` draws beside PyTorch's (`ci/bench_torch_sweep.py`).

use crate::bench::{self, Row, Shape};
use crate::engine::Engine;
use crate::error::CliError;
use sdpa_core::{BackendSet, DType, Device};

/// What a sweep covers.
#[derive(Debug, Clone, PartialEq)]
pub struct Sweep {
    /// Sequence lengths L = S.
    pub lens: Vec<usize>,
    /// Head dims E = Ev.
    pub head_dims: Vec<usize>,
    /// Causal settings (top-left).
    pub causal: Vec<bool>,
    /// B * L at every point (B = max(1, tokens / L)).
    pub tokens: usize,
    /// H * E at every point (H = max(1, hidden / E)).
    pub hidden: usize,
    /// Element type.
    pub dtype: DType,
    /// The backward is timed instead of the forward.
    pub backward: bool,
    /// The backends timed.
    pub backends: BackendSet,
}

impl Sweep {
    /// FlashAttention's grid on CUDA (L 512 to 16k, 16k tokens, hidden 2048); a small one
    /// the reference finishes in seconds on the CPU.
    pub fn default_for(device: Device) -> (Vec<usize>, usize, usize) {
        match device {
            Device::Cuda => (vec![512, 1024, 2048, 4096, 8192, 16384], 16384, 2048),
            Device::Cpu => (vec![64, 128, 256, 512], 1024, 256),
        }
    }

    /// The points, in order: head dim, then causal, then length.
    pub fn shapes(&self) -> Vec<Shape> {
        let mut out = Vec::new();
        for &head_dim in &self.head_dims {
            for &causal in &self.causal {
                for &len in &self.lens {
                    out.push(Shape {
                        batch: (self.tokens / len).max(1),
                        heads: (self.hidden / head_dim).max(1),
                        len,
                        head_dim,
                        dtype: self.dtype,
                        causal,
                    });
                }
            }
        }
        out
    }

    /// Refuses an empty or zero-sized grid, naming the flag.
    ///
    /// # Errors
    /// [`CliError::Usage`].
    pub fn check(&self) -> Result<(), CliError> {
        let bad = |flag: &str, what: String| {
            Err(CliError::Usage(format!(
                "{flag}: expected positive sizes, got {what}"
            )))
        };
        if self.lens.is_empty() || self.lens.contains(&0) {
            return bad("--sweep-lens", format!("{:?}", self.lens));
        }
        if self.head_dims.is_empty() || self.head_dims.contains(&0) {
            return bad("--sweep-head-dims", format!("{:?}", self.head_dims));
        }
        if self.tokens == 0 {
            return bad("--sweep-tokens", "0".into());
        }
        if self.hidden == 0 {
            return bad("--sweep-hidden", "0".into());
        }
        Ok(())
    }
}

/// Times every backend at every point of `sweep` on `engine`; a point too large for the
/// memory bound gets one row saying so and the sweep goes on. A progress bar shows on a
/// terminal (stderr), nothing otherwise.
///
/// # Errors
/// A failed run (other than a point refused for its size).
pub fn run(engine: &Engine, sweep: &Sweep, repeats: usize) -> Result<Vec<Row>, CliError> {
    let shapes = sweep.shapes();
    let bar = indicatif::ProgressBar::new(shapes.len() as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} {elapsed} {msg}")
            .expect("a valid template"),
    );
    let mut rows = Vec::new();
    for shape in shapes {
        let p = shape.problem();
        bar.set_message(bench::label(&p));
        match bench::bench_backends(engine, &p, repeats, sweep.backward, sweep.backends) {
            Ok(r) => rows.extend(r),
            Err(CliError::Usage(msg)) if msg.starts_with("problem too large for memory") => rows
                .push(Row {
                    label: "auto".to_string(),
                    backend: sdpa_core::Backend::Math,
                    device: engine.device,
                    problem: p,
                    result: Err(msg),
                    backward: sweep.backward,
                }),
            Err(e) => {
                bar.abandon();
                return Err(e);
            }
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    Ok(rows)
}

/// The sweep's JSON: `{"device", "source": "sdpa", "sweep": {...}, "rows": [...]}`, rows
/// as `sdpa bench --json` writes them.
pub fn json(engine: &Engine, sweep: &Sweep, rows: &[Row]) -> serde_json::Value {
    serde_json::json!({
        "device": engine.describe(),
        "source": "sdpa",
        "sweep": {
            "lens": sweep.lens,
            "head_dims": sweep.head_dims,
            "causal": sweep.causal,
            "tokens": sweep.tokens,
            "hidden": sweep.hidden,
            "dtype": sweep.dtype.name(),
            "pass": if sweep.backward { "backward" } else { "forward" },
            "backends": sweep.backends.iter().map(|b| b.name()).collect::<Vec<_>>(),
        },
        "rows": bench::json(rows),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn points_keep_tokens_and_hidden_fixed() {
        let s = Sweep {
            lens: vec![512, 16384, 32768],
            head_dims: vec![64, 128],
            causal: vec![false, true],
            tokens: 16384,
            hidden: 2048,
            dtype: DType::BF16,
            backward: false,
            backends: BackendSet::ALL,
        };
        let shapes = s.shapes();
        assert_eq!(shapes.len(), 12);
        assert_eq!((shapes[0].batch, shapes[0].heads), (32, 32));
        assert_eq!((shapes[1].batch, shapes[1].len), (1, 16384));
        // Past the token count B stays 1 rather than 0.
        assert_eq!(shapes[2].batch, 1);
        assert!(shapes[3].causal && shapes[6].head_dim == 128 && shapes[6].heads == 16);
        assert!(s.check().is_ok());
        let empty = Sweep {
            lens: vec![],
            ..s.clone()
        };
        assert!(empty
            .check()
            .unwrap_err()
            .to_string()
            .starts_with("--sweep-lens"));
    }
}
