//! Trains a small model built from `CausalSelfAttention` on a synthetic task (the token
//! `delay` positions back), on the CPU or with the attention on CUDA:
//!
//! ```text
//! cargo run --release --example train -- --device cpu --steps 200
//! ```
//!
//! Prints the loss every `--every` steps (with a progress bar on a terminal), the loss
//! and accuracy reached and a greedy continuation of a prompt through the attention's KV
//! cache; exits 1 if the loss did not fall below
//! `--target-loss`.

use clap::{Parser, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use sdpa_nn::train::{train_model, Optimizer, TrainConfig};
use std::process::ExitCode;

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Device {
    /// CUDA device 0 when one is found, else the CPU.
    Auto,
    Cpu,
    Cuda,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Opt {
    Adam,
    Sgd,
}

#[derive(Parser, Debug)]
#[command(about = "Train a one-block attention model on a delayed-copy task")]
struct Args {
    /// Where the attention (forward and backward) runs; the layers run on the host.
    #[arg(long, value_enum, default_value = "auto")]
    device: Device,
    #[arg(long, default_value_t = 200)]
    steps: usize,
    #[arg(long, default_value_t = 1e-2)]
    lr: f32,
    #[arg(long, value_enum, default_value = "adam")]
    optimizer: Opt,
    /// Attention and residual dropout.
    #[arg(long, default_value_t = 0.0)]
    dropout: f64,
    #[arg(long, default_value_t = 32)]
    batch: usize,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Print the loss every N steps.
    #[arg(long, default_value_t = 25)]
    every: usize,
    /// The loss the run must fall below (exit 1 otherwise).
    #[arg(long, default_value_t = 0.1)]
    target_loss: f32,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let config = TrainConfig {
        steps: args.steps,
        lr: args.lr,
        optimizer: match args.optimizer {
            Opt::Adam => Optimizer::Adam,
            Opt::Sgd => Optimizer::Sgd,
        },
        dropout: args.dropout,
        batch: args.batch,
        seed: args.seed,
        ..TrainConfig::small()
    };
    let gpu = match args.device {
        Device::Cpu => None,
        Device::Cuda => match sdpa_cuda::GpuContext::new(0) {
            Ok(g) => Some(g),
            Err(e) => {
                eprintln!("error: --device cuda: no CUDA device could be opened: {e}");
                return ExitCode::from(2);
            }
        },
        Device::Auto => sdpa_cuda::GpuContext::new(0).ok(),
    };
    let exec = match &gpu {
        Some(g) => sdpa::Exec::cuda(g),
        None => sdpa::Exec::cpu(),
    };
    println!(
        "training on {}: vocab {}, T {}, delay {}, batch {}, E {}, {} heads, dropout {}, {:?} lr {}, {} steps",
        if gpu.is_some() { "cuda (attention), cpu (layers)" } else { "cpu" },
        config.vocab,
        config.seq_len,
        config.delay,
        config.batch,
        config.embed,
        config.heads,
        config.dropout,
        config.optimizer,
        config.lr,
        config.steps
    );
    let bar = ProgressBar::new(config.steps as u64);
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} {msg}").expect("a valid template"),
    );
    let every = args.every.max(1);
    let started = std::time::Instant::now();
    let trained = train_model(&config, &exec, |r| {
        bar.set_position(r.step as u64);
        bar.set_message(format!("loss {:.4}", r.loss));
        if r.step % every == 0 || r.step == 1 {
            let line = format!(
                "step {:>5}  loss {:.4}  accuracy {:.3}",
                r.step, r.loss, r.accuracy
            );
            // Off a terminal the bar is hidden, and so would be its println.
            if bar.is_hidden() {
                println!("{line}");
            } else {
                bar.println(line);
            }
        }
    });
    bar.finish_and_clear();
    let (mut model, summary) = match trained {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    println!(
        "done in {:.1} s: loss {:.4} -> {:.4} (mean of the last 10 steps), accuracy {:.3}",
        started.elapsed().as_secs_f64(),
        summary.initial_loss,
        summary.final_loss,
        summary.final_accuracy
    );
    // Greedy generation through the attention's KV cache (the decode kernels on CUDA):
    // the model outputs at position t the token at t - delay, so fed back, its
    // continuation repeats the prompt's delay + 1 tokens.
    let p = config.delay + 1;
    let prompt = ndarray::Array2::from_shape_fn((1, p), |(_, i)| (5 * i + 2) % config.vocab);
    match model.generate(prompt.view(), config.seq_len - p, &exec) {
        Ok(out) => {
            let repeats = out
                .iter()
                .enumerate()
                .all(|(n, &t)| t == prompt[[0, n % p]]);
            println!(
                "generate (KV cache): prompt {:?} -> {:?} ({})",
                prompt.row(0).to_vec(),
                out.row(0).to_vec(),
                if repeats {
                    "repeats the prompt, as the task says"
                } else {
                    "does NOT repeat the prompt"
                }
            );
        }
        Err(e) => {
            eprintln!("error: generate: {e}");
            return ExitCode::from(2);
        }
    }
    if summary.final_loss < args.target_loss {
        ExitCode::SUCCESS
    } else {
        eprintln!(
            "the loss did not fall below {} in {} steps",
            args.target_loss, config.steps
        );
        ExitCode::from(1)
    }
}
