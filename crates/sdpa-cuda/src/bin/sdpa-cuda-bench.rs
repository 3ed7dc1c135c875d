//! `sdpa-cuda-bench [--json | --backward | --decode]`: times flash, efficient and math on the
//! issue's five shapes on CUDA device 0 and prints a table (or JSON lines); with
//! `--backward`, JSON lines of the backward benchmarks (efficient and math); with
//! `--decode`, JSON lines of the KV-cache decode benchmarks. The kernel configuration
//! comes from the environment (`SDPA_CUDA_WG_TILES`, `SDPA_CUDA_TC_TILES`,
//! `SDPA_CUDA_WGMMA`: the variables `ci/tile-sweep.sh` sweeps); `SDPA_BENCH_SHAPES` and
//! `SDPA_BENCH_BACKENDS` pick shapes and backends.
use sdpa_cuda::{bench, GpuContext, KernelConfig};

/// Prints `rows` as JSON lines, or the error and exits 1.
fn json_lines<R: serde::Serialize>(rows: sdpa_cuda::Result<Vec<R>>) {
    match rows {
        Ok(rows) => {
            for row in &rows {
                println!("{}", serde_json::to_string(row).expect("rows serialise"));
            }
        }
        Err(e) => {
            eprintln!("sdpa-cuda-bench: {e}");
            std::process::exit(1);
        }
    }
}

fn main() {
    let json = std::env::args().any(|a| a == "--json");
    let gpu = match KernelConfig::from_env().and_then(|config| GpuContext::with_config(0, config)) {
        Ok(gpu) => gpu,
        Err(e) => {
            eprintln!("sdpa-cuda-bench: {e}");
            std::process::exit(2);
        }
    };
    if std::env::args().any(|a| a == "--decode") {
        // JSON lines of the decode rows (ci/bench_torch_decode.py reads them).
        json_lines(bench::run_decode_benchmarks(&gpu));
        return;
    }
    if std::env::args().any(|a| a == "--backward") {
        // JSON lines of the backward rows (ci/bench_torch_bwd.py reads them).
        json_lines(bench::run_backward_benchmarks(&gpu));
        return;
    }
    let rows = match bench::run_issue_benchmarks(&gpu) {
        Ok(rows) => rows,
        Err(e) => {
            eprintln!("sdpa-cuda-bench: {e}");
            std::process::exit(1);
        }
    };
    if json {
        for row in &rows {
            println!("{}", serde_json::to_string(row).expect("rows serialise"));
        }
        return;
    }
    println!("device: {} (sm_{})", gpu.name(), gpu.arch());
    println!("| B | H | L | E | dtype | causal | backend | median ms | TFLOP/s |");
    println!("|---|---|---|---|---|---|---|---|---|");
    for r in &rows {
        let s = &r.shape;
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {:.3} | {:.1} |",
            s.batch,
            s.heads,
            s.len,
            s.head_dim,
            s.dtype,
            s.causal,
            r.backend,
            r.median_ms,
            r.tflops
        );
    }
}
