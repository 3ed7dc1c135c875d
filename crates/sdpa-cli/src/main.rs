//! `sdpa`: PyTorch's scaled dot-product attention tutorial rebuilt in Rust, plus the
//! tools around it (replay a case file, benchmark the backends, check goldens).
#![warn(missing_docs)]
#![deny(unsafe_code)]

mod bench;
mod chart;
mod engine;
mod error;
mod expected;
mod output;
mod profile;
mod sweep;
mod tutorial;

use clap::{Parser, Subcommand};
use engine::{BackendArg, DeviceArg, Engine};
use error::CliError;
use sdpa_core::{Backend, DType};
use sdpa_harness::case::{serialize, Case};
use sdpa_harness::judge::judge;
use sdpa_harness::kvcase::{self, CaseFile, KvCase};
use sdpa_harness::{run, Tensor};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// One table for `--help` and the README.
const EXIT_CODES: &str = "Exit status: 0 = done (and every verdict passed); \
1 = a verdict failed (eval against the case's out_f64 or out, check on any case); \
2 = bad input or usage, a refused or failed write, or a device failure (nothing is written)";

/// A verdict failed: the run itself was fine.
const VERDICT_FAILED: u8 = 1;
/// Bad input or usage, or any failure of the command itself (clap uses 2 as well).
const BAD_INPUT: u8 = 2;

#[derive(Parser)]
#[command(
    name = "sdpa",
    version,
    about = "Scaled dot-product attention: the tutorial, case replay, benchmarks and golden checks",
    after_help = EXIT_CODES
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
    /// metadata) and writes `out` (the case dtype) and `lse` (f32) to OUT; judges it
    /// against the case's `out_f64` (or `out`) when it has one.
    ///
    /// Every input is checked first (the case, its stored results' dtypes and shapes,
    /// OUT): bad input exits 2 and writes nothing. A failed verdict exits 1 with OUT
    /// written. OUT is replaced whole or not at all; it must be a new name or a regular
    /// file other than the case (not a folder, device, FIFO, socket or symlink).
    #[command(after_help = EXIT_CODES)]
    Eval {
        /// The case file.
        case: PathBuf,
        /// Backend to use; `auto` takes the first of flash > efficient > math that fits.
        #[arg(long, value_enum, default_value_t = BackendArg::Auto)]
        backend: BackendArg,
        /// Where to run.
        #[arg(long, value_enum, default_value_t = DeviceArg::Auto)]
        device: DeviceArg,
        /// Output file (safetensors with `out` and `lse`), replaced atomically.
        #[arg(long)]
        out: PathBuf,
        /// Also run the backward with the case's `dout`: writes `dq`, `dk`, `dv` (and
        /// `dmask` for an additive mask) and judges them against `dq_f64`, ... where the
        /// case has them. On CUDA the first backend of --backend with a backward for the
        /// case (flash's tensor-core backward, efficient's fused one, math); on the CPU
        /// the reference.
        #[arg(long)]
        backward: bool,
    },
    /// Times every backend on any problem (GQA, L != S, Ev != E, causal, dropout, masks,
    /// varlen on CUDA) or the default set: median of repeats after a warm-up, TFLOP/s on
    /// CUDA, GFLOP/s on the CPU.
    Bench(Box<bench::BenchArgs>),
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
        /// Write a Chrome trace (chrome://tracing, Perfetto) here, replaced atomically
        /// (the same rules as `eval --out`).
        #[arg(long)]
        trace: Option<PathBuf>,
    },
    /// Draws TFLOP/s against sequence length, one line a backend, from sweep JSON
    /// (`sdpa bench --sweep --out ours.json`, `ci/bench_torch_sweep.py --out torch.json`):
    /// one SVG per pass, head dim and causal setting into OUT.
    Chart {
        /// Sweep JSON files (ours and PyTorch's).
        #[arg(required = true)]
        inputs: Vec<PathBuf>,
        /// Folder for the SVG files (created if missing).
        #[arg(long)]
        out: PathBuf,
    },
    /// Runs every case in the given files or folders (default `golden/`) through each
    /// backend that supports it here and judges it by the tolerance policy.
    ///
    /// A file that cannot be read or run is named on stderr and skipped; the counts are
    /// printed at the end. Exit 2 if any file was bad, else 1 if any verdict failed.
    #[command(after_help = EXIT_CODES)]
    Check {
        /// Case files or folders of them.
        paths: Vec<PathBuf>,
        /// Where to run.
        #[arg(long, value_enum, default_value_t = DeviceArg::Auto)]
        device: DeviceArg,
    },
}

/// A write past the file-size limit must be an error the output writer cleans up
/// after (no temp file left), not SIGXFSZ killing the process mid-write.
#[allow(unsafe_code)]
fn ignore_file_size_signal() {
    // SAFETY: setting a signal's disposition to SIG_IGN at start-up, before any thread
    // exists, installs no handler code and has no other effect.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
    }
}

fn main() -> ExitCode {
    ignore_file_size_signal();
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
            backward,
        } => eval(&case, backend, device, &out, backward),
        Command::Bench(args) => bench::run(*args),
        Command::Chart { inputs, out } => chart::run(&inputs, &out).map(|written| {
            for path in written {
                println!("{}", path.display());
            }
            ExitCode::SUCCESS
        }),
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
        } => trace
            .as_deref()
            .map_or(Ok(()), |t| output::check_target(t, &[]))
            .and_then(|()| Engine::new(device))
            .and_then(|e| {
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
            ExitCode::from(BAD_INPUT)
        }
    }
}

fn eval(
    case_path: &Path,
    backend: BackendArg,
    device: DeviceArg,
    out_path: &Path,
    backward: bool,
) -> Result<ExitCode, CliError> {
    let case = match CaseFile::read(case_path).map_err(|e| CliError::in_case(case_path, e))? {
        CaseFile::Sdpa(case) => *case,
        CaseFile::KvCache(case) => {
            return eval_kvcache(case_path, &case, backend, device, out_path, backward)
        }
    };
    let problem = run::problem(&case).map_err(|e| CliError::in_case(case_path, e))?;
    expected::check(case_path, &case, &problem)?;
    if backward && case.result("dout").is_none() {
        return Err(CliError::in_case(
            case_path,
            sdpa_harness::HarnessError::Case {
                what: "tensor dout".into(),
                expected: format!(
                    "the incoming gradient for --backward, {} {:?}",
                    problem.dtype,
                    problem.out_shape()
                ),
                actual: "none".into(),
            },
        ));
    }
    output::check_target(out_path, &[case_path])?;
    let engine = Engine::new(device)?;
    let chosen = match (backward, &engine.gpu) {
        // The forward and the backward on one backend: on CUDA the first of the set with a
        // backward for the problem (flash's tensor cores, efficient's fused kernel, math),
        // on the CPU the reference.
        (true, Some(_)) => sdpa_cuda::select_backward(&problem, backend.set(), None)?,
        _ => engine.select(backend.set(), &problem)?,
    };
    let (result, grads, grad_verdicts) = if backward {
        let b = run::run_backward(&case, &engine.exec(chosen))
            .map_err(|e| CliError::in_case(case_path, e))?;
        let verdicts = sdpa_harness::judge::judge_gradients(&case, problem.dtype, &b)
            .map_err(|e| CliError::in_case(case_path, e))?;
        let mut grads = vec![("dq", b.dq), ("dk", b.dk), ("dv", b.dv)];
        if let Some(dm) = b.dmask {
            grads.push(("dmask", dm));
        }
        (b.forward, grads, verdicts)
    } else {
        (engine.run(chosen, &case)?, Vec::new(), Vec::new())
    };
    let verdict = if case.result("out_f64").is_some() {
        let verdict = judge(&case, problem.dtype, &result.out, Some(&result.lse))
            .map_err(|e| CliError::in_case(case_path, e))?;
        Some(("out_f64", verdict.passed, verdict.to_string()))
    } else {
        case.result("out").map(|expected| {
            let report = sdpa_harness::compare::compare_with(
                result.out.to_f64().view(),
                expected.to_f64().view(),
                Some(&sdpa_harness::tolerance::for_dtype(problem.dtype)),
            );
            let passed = report.passes();
            let word = if passed { "pass" } else { "FAIL" };
            ("out", passed, format!("{word}: {report}"))
        })
    };
    let mut verdicts: Vec<(String, bool, String)> = verdict
        .into_iter()
        .map(|(a, p, l)| (a.to_string(), p, l))
        .collect();
    for (name, v) in grad_verdicts {
        verdicts.push((format!("{name}_f64"), v.passed, v.to_string()));
    }
    let lse = Tensor::F32(result.lse.clone());
    let mut meta = BTreeMap::new();
    meta.insert("backend".to_string(), chosen.to_string());
    meta.insert("device".to_string(), engine.device.to_string());
    meta.insert("case".to_string(), case_path.display().to_string());
    let mut named: Vec<(String, &Tensor)> =
        vec![("out".to_string(), &result.out), ("lse".to_string(), &lse)];
    named.extend(grads.iter().map(|(n, t)| (n.to_string(), t)));
    let bytes = serialize(&named, &meta);
    output::write(out_path, &bytes, &[case_path])?;
    println!(
        "{}: {} on {} ({}{}) -> {}",
        case_path.display(),
        chosen,
        engine.device,
        problem.summary(),
        if backward {
            ", forward and backward"
        } else {
            ""
        },
        out_path.display()
    );
    Ok(print_verdicts(&verdicts))
}

/// `sdpa eval` of a KV-cache case (it holds `k_cache`): the reference on the CPU, the
/// decode kernels on CUDA; writes `out`, `lse` and, after an append, `k_cache` and
/// `v_cache`; judges `out` against `out_f64` (else the f64 reference of the case, run
/// here) by the dtype's tolerance, and the caches against `k_cache_after` /
/// `v_cache_after` (exactly) where the case has them.
fn eval_kvcache(
    case_path: &Path,
    case: &KvCase,
    backend: BackendArg,
    device: DeviceArg,
    out_path: &Path,
    backward: bool,
) -> Result<ExitCode, CliError> {
    if backward {
        return Err(CliError::Usage(
            "--backward: expected a case with q, k, v (a KV-cache case has no backward)".into(),
        ));
    }
    if backend != BackendArg::Auto {
        return Err(CliError::Usage(
            "--backend: expected auto for a KV-cache case (the reference on the cpu, the decode kernels on cuda)".into(),
        ));
    }
    // The f64 truth comes first: it checks the whole call before anything is written.
    let truth = kv_truth(case).map_err(|e| CliError::in_case(case_path, e))?;
    output::check_target(out_path, &[case_path])?;
    let engine = Engine::new(device)?;
    let (r, verdicts) =
        kv_verdicts(case, &truth, &engine).map_err(|e| CliError::in_case(case_path, e))?;
    let lse = Tensor::F32(r.lse.clone());
    let mut meta = BTreeMap::new();
    meta.insert("device".to_string(), engine.device.to_string());
    meta.insert("case".to_string(), case_path.display().to_string());
    meta.insert("splits".to_string(), r.splits.to_string());
    let mut named: Vec<(String, &Tensor)> = vec![("out".into(), &r.out), ("lse".into(), &lse)];
    if let (Some(k), Some(v)) = (&r.k_cache, &r.v_cache) {
        named.push(("k_cache".into(), k));
        named.push(("v_cache".into(), v));
    }
    output::write(out_path, &serialize(&named, &meta), &[case_path])?;
    let what = if engine.gpu.is_some() {
        "decode kernels"
    } else {
        "KV-cache reference"
    };
    println!(
        "{}: {what} on {} ({} split{}) -> {}",
        case_path.display(),
        engine.device,
        r.splits,
        if r.splits == 1 { "" } else { "s" },
        out_path.display()
    );
    Ok(print_verdicts(&verdicts))
}

/// The f64 truth of a KV-cache case: its `out_f64`, else the reference on the case
/// widened to f64.
fn kv_truth(case: &KvCase) -> Result<ndarray::ArrayD<f64>, CliError> {
    Ok(match case.result("out_f64") {
        Some(t) => t.to_f64(),
        None => kvcase::run_kvcache(&kvcase::widened(case), &sdpa::Exec::cpu())?
            .out
            .to_f64(),
    })
}

/// Prints each verdict line; exit 0 when all passed, else [`VERDICT_FAILED`].
fn print_verdicts(verdicts: &[Verdict]) -> ExitCode {
    let mut passed = true;
    for (against, ok, line) in verdicts {
        println!("  vs {against}: {line}");
        passed &= ok;
    }
    if passed {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(VERDICT_FAILED)
    }
}

/// What a verdict line holds: what it judged against, whether it passed, the line.
type Verdict = (String, bool, String);

/// Runs a KV-cache case on the engine's device and judges `out` against `truth` by the
/// dtype's tolerance and the caches against `k_cache_after` / `v_cache_after` (exactly).
fn kv_verdicts(
    case: &KvCase,
    truth: &ndarray::ArrayD<f64>,
    engine: &Engine,
) -> Result<(kvcase::KvRunOutput, Vec<Verdict>), CliError> {
    let dtype = case
        .q
        .dtype()
        .ok_or_else(|| CliError::Usage("q: expected a floating-point dtype".into()))?;
    let exec = engine
        .exec(Backend::Math)
        .with_backends(sdpa_core::BackendSet::ALL);
    let r = kvcase::run_kvcache(case, &exec)?;
    let report = sdpa_harness::compare::compare_with(
        r.out.to_f64().view(),
        truth.view(),
        Some(&sdpa_harness::tolerance::for_dtype(dtype)),
    );
    let mut verdicts = vec![(
        "out_f64".to_string(),
        report.passes(),
        format!(
            "{}: {report}",
            if report.passes() { "pass" } else { "FAIL" }
        ),
    )];
    for (name, got) in [("k_cache", &r.k_cache), ("v_cache", &r.v_cache)] {
        let want_name = format!("{name}_after");
        if let (Some(got), Some(want)) = (got, case.result(&want_name)) {
            let same = got == want;
            let line = if same {
                "pass: bit-equal"
            } else {
                "FAIL: differs"
            };
            verdicts.push((want_name, same, line.to_string()));
        }
    }
    Ok((r, verdicts))
}

/// The case files under `paths` (folders listed one level deep), and the paths that
/// could not be listed, each as its error.
fn case_files(paths: &[PathBuf]) -> (Vec<PathBuf>, Vec<CliError>) {
    let (mut files, mut bad) = (Vec::new(), Vec::new());
    for p in paths {
        if p.is_dir() {
            let entries = match std::fs::read_dir(p) {
                Ok(entries) => entries,
                Err(source) => {
                    bad.push(CliError::Io {
                        path: p.display().to_string(),
                        source,
                    });
                    continue;
                }
            };
            let mut found = Vec::new();
            for entry in entries {
                match entry {
                    Ok(e) => {
                        let f = e.path();
                        if f.extension().is_some_and(|x| x == "safetensors") {
                            found.push(f);
                        }
                    }
                    Err(source) => bad.push(CliError::Io {
                        path: p.display().to_string(),
                        source,
                    }),
                }
            }
            found.sort();
            files.extend(found);
        } else {
            files.push(p.clone());
        }
    }
    (files, bad)
}

/// Validates one case `check` read, naming the file in any error.
fn validate_case(file: &Path, case: Case) -> Result<(Case, sdpa_core::Problem), CliError> {
    let problem = run::problem(&case).map_err(|e| CliError::in_case(file, e))?;
    expected::check(file, &case, &problem)?;
    Ok((case, problem))
}

fn check(paths: Vec<PathBuf>, device: DeviceArg) -> Result<ExitCode, CliError> {
    let engine = Engine::new(device)?;
    let paths = if paths.is_empty() {
        vec![PathBuf::from("golden")]
    } else {
        paths
    };
    let (files, listing_errors) = case_files(&paths);
    if files.is_empty() && listing_errors.is_empty() {
        return Err(CliError::Usage(format!(
            "paths: expected case files (*.safetensors), got none in {paths:?}"
        )));
    }
    let mut bad = listing_errors.len();
    for e in &listing_errors {
        eprintln!("error: {e}");
    }
    let (mut passed, mut failed) = (0usize, 0usize);
    // Progress over the files on a terminal (stderr); every line printed meanwhile goes
    // through `suspend`, so the bar never garbles it, and prints the same without one.
    let bar = indicatif::ProgressBar::new(files.len() as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} {elapsed} {msg}")
            .expect("a valid template"),
    );
    for file in &files {
        bar.set_message(file.display().to_string());
        bar.inc(1);
        let case = match CaseFile::read(file) {
            Ok(CaseFile::Sdpa(case)) => *case,
            Ok(CaseFile::KvCache(case)) => {
                let judged = kv_truth(&case).and_then(|t| kv_verdicts(&case, &t, &engine));
                match judged {
                    Ok((_, verdicts)) => {
                        for (name, ok, line) in verdicts {
                            if ok {
                                passed += 1;
                            } else {
                                failed += 1;
                                bar.suspend(|| {
                                    println!("{} [kv-cache] {name}: {line}", file.display())
                                });
                            }
                        }
                    }
                    Err(e) => {
                        bad += 1;
                        bar.suspend(|| eprintln!("error: {} [kv-cache]: {e}", file.display()));
                    }
                }
                continue;
            }
            Err(e) => {
                bad += 1;
                bar.suspend(|| eprintln!("error: {}", CliError::in_case(file, e)));
                continue;
            }
        };
        let (case, problem) = match validate_case(file, case) {
            Ok(loaded) => loaded,
            Err(e) => {
                bad += 1;
                bar.suspend(|| eprintln!("error: {e}"));
                continue;
            }
        };
        for backend in Backend::PRIORITY {
            if engine.supports(backend, &problem).is_err() {
                continue;
            }
            let verdict = engine
                .run(backend, &case)
                .and_then(|r| Ok(judge(&case, problem.dtype, &r.out, Some(&r.lse))?));
            match verdict {
                Ok(v) if v.passed => passed += 1,
                Ok(v) => {
                    failed += 1;
                    bar.suspend(|| println!("{} [{backend}]: {v}", file.display()));
                }
                Err(e) => {
                    bad += 1;
                    bar.suspend(|| eprintln!("error: {} [{backend}]: {e}", file.display()));
                }
            }
            // A case with dout: the backward too, on each backend that has one here,
            // every gradient with a truth judged.
            if case.result("dout").is_none() || engine.backward_support(backend, &problem).is_err()
            {
                continue;
            }
            let grads = run::run_backward(&case, &engine.exec(backend))
                .and_then(|g| sdpa_harness::judge::judge_gradients(&case, problem.dtype, &g));
            match grads {
                Ok(verdicts) => {
                    for (name, v) in verdicts {
                        if v.passed {
                            passed += 1;
                        } else {
                            failed += 1;
                            bar.suspend(|| println!("{} [{backend}] {name}: {v}", file.display()));
                        }
                    }
                }
                Err(e) => {
                    bad += 1;
                    bar.suspend(|| {
                        eprintln!("error: {} [{backend}] backward: {e}", file.display())
                    });
                }
            }
        }
    }
    bar.finish_and_clear();
    println!("{passed} passed, {failed} failed, {bad} errors");
    Ok(if bad > 0 {
        ExitCode::from(BAD_INPUT)
    } else if failed > 0 {
        ExitCode::from(VERDICT_FAILED)
    } else {
        ExitCode::SUCCESS
    })
}
