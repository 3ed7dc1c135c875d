//! `sdpa`: PyTorch's scaled dot-product attention tutorial rebuilt in Rust, plus the
//! tools around it (replay a case file, benchmark the backends, check goldens).
#![warn(missing_docs)]

mod bench;
mod engine;
mod error;
mod profile;
mod tutorial;

use clap::{Parser, Subcommand};
use engine::{BackendArg, DeviceArg, Engine};
use error::CliError;
use sdpa_core::{Backend, DType};
use sdpa_harness::case::{serialize, Case};
use sdpa_harness::judge::judge;
use sdpa_harness::{run, Tensor};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "sdpa",
    version,
    about = "Scaled dot-product attention: the tutorial, case replay, benchmarks and golden checks"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// The tutorial (the default): the example call, then each backend's time on the
    /// tutorial's problem, then explicit backend control.
    Tutorial {
        /// Where to run.
        #[arg(long, value_enum, default_value_t = DeviceArg::Auto)]
        device: DeviceArg,
    },
    /// Runs a case file (safetensors: q, k, v, optional attn_mask, options in the
    /// metadata) and writes `out` (the case dtype) and `lse` (f32) to OUT.
    Eval {
        /// The case file.
        case: PathBuf,
        /// Backend to use; `auto` takes the first of flash > efficient > math that fits.
        #[arg(long, value_enum, default_value_t = BackendArg::Auto)]
        backend: BackendArg,
        /// Where to run.
        #[arg(long, value_enum, default_value_t = DeviceArg::Auto)]
        device: DeviceArg,
        /// Output file (safetensors with `out` and `lse`).
        #[arg(long)]
        out: PathBuf,
    },
    /// Times every backend on any problem (GQA, L != S, Ev != E, causal, dropout, masks,
    /// varlen on CUDA) or the default set: median of repeats after a warm-up, TFLOP/s on
    /// CUDA, GFLOP/s on the CPU.
    Bench(bench::BenchArgs),
    /// Profiles the tutorial's CausalSelfAttention module: a per-op table (calls, total,
    /// mean, share) and optionally a Chrome trace.
    Profile {
        /// Where to run.
        #[arg(long, value_enum, default_value_t = DeviceArg::Auto)]
        device: DeviceArg,
        /// Batch size (cut to 4 on the CPU).
        #[arg(long, default_value_t = 32)]
        batch: usize,
        /// Sequence length.
        #[arg(long, default_value_t = 256)]
        seq: usize,
        /// Embedding dim.
        #[arg(long, default_value_t = 512)]
        embed: usize,
        /// Heads.
        #[arg(long, default_value_t = 8)]
        heads: usize,
        /// Element type.
        #[arg(long, default_value = "f16")]
        dtype: DType,
        /// Forward calls profiled.
        #[arg(long, default_value_t = 25)]
        iters: usize,
        /// Write a Chrome trace (chrome://tracing, Perfetto) here.
        #[arg(long)]
        trace: Option<PathBuf>,
    },
    /// Runs every case in the given files or folders (default `golden/`) through each
    /// backend that supports it here and judges it by the tolerance policy.
    Check {
        /// Case files or folders of them.
        paths: Vec<PathBuf>,
        /// Where to run.
        #[arg(long, value_enum, default_value_t = DeviceArg::Auto)]
        device: DeviceArg,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command.unwrap_or(Command::Tutorial {
        device: DeviceArg::Auto,
    }) {
        Command::Tutorial { device } => Engine::new(device).and_then(|e| tutorial::run(&e)),
        Command::Eval {
            case,
            backend,
            device,
            out,
        } => eval(&case, backend, device, &out),
        Command::Bench(args) => bench::run(args),
        Command::Check { paths, device } => check(paths, device),
        Command::Profile {
            device,
            batch,
            seq,
            embed,
            heads,
            dtype,
            iters,
            trace,
        } => Engine::new(device).and_then(|e| {
            profile::run(
                &e,
                profile::Setup {
                    batch,
                    seq,
                    embed,
                    heads,
                    dtype,
                    iters,
                },
                trace.as_deref(),
            )
            .map(|()| ExitCode::SUCCESS)
        }),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}

fn eval(
    case_path: &Path,
    backend: BackendArg,
    device: DeviceArg,
    out_path: &Path,
) -> Result<ExitCode, CliError> {
    let case = Case::read(case_path)?;
    let engine = Engine::new(device)?;
    let problem = run::problem(&case)?;
    let chosen = engine.select(backend.set(), &problem)?;
    let result = engine.run(chosen, &case)?;
    let lse = Tensor::F32(result.lse.clone());
    let mut meta = BTreeMap::new();
    meta.insert("backend".to_string(), chosen.to_string());
    meta.insert("device".to_string(), engine.device.to_string());
    meta.insert("case".to_string(), case_path.display().to_string());
    let bytes = serialize(
        &[("out".to_string(), &result.out), ("lse".to_string(), &lse)],
        &meta,
    );
    // Write beside the target and rename, so a failure never leaves a partial file.
    let tmp = out_path.with_extension("partial");
    std::fs::write(&tmp, bytes)
        .and_then(|()| std::fs::rename(&tmp, out_path))
        .map_err(|source| CliError::Io {
            path: out_path.display().to_string(),
            source,
        })?;
    println!(
        "{}: {} on {} ({}) -> {}",
        case_path.display(),
        chosen,
        engine.device,
        problem.summary(),
        out_path.display()
    );
    if case.result("out_f64").is_some() {
        let verdict = judge(&case, problem.dtype, &result.out, Some(&result.lse))?;
        println!("  vs out_f64: {verdict}");
    } else if let Some(expected) = case.result("out") {
        let report = sdpa_harness::compare::compare_with(
            result.out.to_f64().view(),
            expected.to_f64().view(),
            Some(&sdpa_harness::tolerance::for_dtype(problem.dtype)),
        );
        println!("  vs out: {report}");
    }
    Ok(ExitCode::SUCCESS)
}

fn case_files(paths: &[PathBuf]) -> Result<Vec<PathBuf>, CliError> {
    let mut files = Vec::new();
    for p in paths {
        if p.is_dir() {
            let entries = std::fs::read_dir(p).map_err(|source| CliError::Io {
                path: p.display().to_string(),
                source,
            })?;
            let mut found: Vec<PathBuf> = entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|f| f.extension().is_some_and(|x| x == "safetensors"))
                .collect();
            found.sort();
            files.extend(found);
        } else {
            files.push(p.clone());
        }
    }
    Ok(files)
}

fn check(paths: Vec<PathBuf>, device: DeviceArg) -> Result<ExitCode, CliError> {
    let engine = Engine::new(device)?;
    let paths = if paths.is_empty() {
        vec![PathBuf::from("golden")]
    } else {
        paths
    };
    let files = case_files(&paths)?;
    if files.is_empty() {
        return Err(CliError::Usage(format!(
            "paths: expected case files (*.safetensors), got none in {paths:?}"
        )));
    }
    let (mut passed, mut failed) = (0usize, 0usize);
    for file in &files {
        let case = Case::read(file)?;
        let problem = run::problem(&case)?;
        for backend in Backend::PRIORITY {
            if engine.supports(backend, &problem).is_err() {
                continue;
            }
            let result = engine.run(backend, &case)?;
            let verdict = judge(&case, problem.dtype, &result.out, Some(&result.lse))?;
            if verdict.passed {
                passed += 1;
            } else {
                failed += 1;
                println!("{} [{backend}]: {verdict}", file.display());
            }
        }
    }
    println!("{passed} passed, {failed} failed");
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
