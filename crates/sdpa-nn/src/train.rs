//! A small language model built from [`CausalSelfAttention`] that trains end to end:
//! token and position embeddings, one attention block with a residual connection, an
//! output projection to the vocabulary and a cross-entropy loss, optimised by Adam or
//! SGD. The task is synthetic and needs attention: each sequence is random tokens, and
//! the target at position `t >= delay` is the token at `t - delay` (a delayed copy), so
//! the model must learn to attend `delay` positions back.
//!
//! Every gradient is computed here: the embeddings' and projection's by hand, the block's
//! by [`CausalSelfAttention::backward_on`] (the attention on the CPU or on CUDA).
//!
//! ```
//! use sdpa_nn::train::{train, TrainConfig};
//! let config = TrainConfig { steps: 3, ..TrainConfig::small() };
//! let summary = train(&config, &sdpa::Exec::cpu(), |_| {})?;
//! assert!(summary.final_loss.is_finite());
//! # Ok::<(), sdpa_nn::NnError>(())
//! ```

use crate::linear::Linear;
use crate::module::CausalSelfAttention;
use crate::{NnError, Result};
use ndarray::{Array1, Array2, Array3, Axis};
use sdpa::Exec;
use sdpa_core::rng::SplitMix64;
use sdpa_core::SdpaError;

/// The optimiser.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Optimizer {
    /// Adam with the usual betas (0.9, 0.999) and eps 1e-8.
    Adam,
    /// Plain stochastic gradient descent.
    Sgd,
}

/// The model, the task and the run.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainConfig {
    /// Tokens in the vocabulary.
    pub vocab: usize,
    /// Sequence length `T`.
    pub seq_len: usize,
    /// How far back the target token lies.
    pub delay: usize,
    /// Sequences per step.
    pub batch: usize,
    /// Embedding dim `E`.
    pub embed: usize,
    /// Attention heads (a divisor of `embed`).
    pub heads: usize,
    /// Attention and residual dropout in training.
    pub dropout: f64,
    /// Optimiser steps.
    pub steps: usize,
    /// Learning rate.
    pub lr: f32,
    /// The optimiser.
    pub optimizer: Optimizer,
    /// Seed of the weights, the data and the dropout stream.
    pub seed: u64,
}

impl TrainConfig {
    /// A size that trains in seconds on one CPU core: 32 tokens, sequences of 32, delay 5,
    /// batch 32, E = 64 over 4 heads, Adam at 1e-2 for 200 steps.
    pub fn small() -> Self {
        TrainConfig {
            vocab: 32,
            seq_len: 32,
            delay: 5,
            batch: 32,
            embed: 64,
            heads: 4,
            dropout: 0.0,
            steps: 200,
            lr: 1e-2,
            optimizer: Optimizer::Adam,
            seed: 1,
        }
    }

    fn validate(&self) -> Result<()> {
        let bad = |name: &'static str, expected: &str, got: usize| -> Result<()> {
            Err(SdpaError::invalid(name, expected, got).into())
        };
        if self.vocab < 2 {
            return bad("vocab", "at least 2 tokens", self.vocab);
        }
        if self.delay == 0 || self.delay >= self.seq_len {
            return bad("delay", "between 1 and seq_len - 1", self.delay);
        }
        if self.batch == 0 {
            return bad("batch", "at least 1", self.batch);
        }
        if self.embed == 0 || self.heads == 0 || self.embed % self.heads != 0 {
            return bad("heads", "a divisor of embed (both at least 1)", self.heads);
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return Err(SdpaError::invalid("lr", "a finite rate above 0", self.lr).into());
        }
        Ok(())
    }
}

/// What one step saw: its batch was drawn fresh, before the step's update, so its
/// accuracy is that of unseen data.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepReport {
    /// 1-based step.
    pub step: usize,
    /// Mean cross-entropy over the positions with a target (nats).
    pub loss: f32,
    /// Fraction of those positions whose most likely token is the target.
    pub accuracy: f32,
}

/// The run's end: the first step's loss and the mean loss and accuracy of the last ten
/// steps (or all, if fewer).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TrainSummary {
    /// The first step's loss (about `ln(vocab)` for an untrained model).
    pub initial_loss: f32,
    /// Mean loss of the last steps.
    pub final_loss: f32,
    /// Mean accuracy of the last steps.
    pub final_accuracy: f32,
}

/// The data and weight stream, reproducible from the seed (the workspace's splitmix64).
struct Rng(SplitMix64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0.next_u64()
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    /// Uniform in [-a, a).
    fn uniform(&mut self, a: f32) -> f32 {
        ((self.next() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * a
    }
    fn matrix(&mut self, rows: usize, cols: usize, a: f32) -> Array2<f32> {
        Array2::from_shape_simple_fn((rows, cols), || self.uniform(a))
    }
}

/// One parameter with its optimiser state.
struct Param {
    value: Vec<f32>,
    m: Vec<f32>,
    v: Vec<f32>,
}

impl Param {
    fn new(value: Vec<f32>) -> Self {
        let n = value.len();
        Param {
            value,
            m: vec![0.0; n],
            v: vec![0.0; n],
        }
    }

    fn step(&mut self, grad: &[f32], config: &TrainConfig, t: i32) {
        match config.optimizer {
            Optimizer::Sgd => {
                for (w, g) in self.value.iter_mut().zip(grad) {
                    *w -= config.lr * g;
                }
            }
            Optimizer::Adam => {
                let (b1, b2, eps) = (0.9f32, 0.999f32, 1e-8f32);
                let (c1, c2) = (1.0 - b1.powi(t), 1.0 - b2.powi(t));
                let state = self.value.iter_mut().zip(&mut self.m).zip(&mut self.v);
                for (((w, m), v), &g) in state.zip(grad) {
                    *m = b1 * *m + (1.0 - b1) * g;
                    *v = b2 * *v + (1.0 - b2) * g * g;
                    let mhat = *m / c1;
                    let vhat = *v / c2;
                    *w -= config.lr * mhat / (vhat.sqrt() + eps);
                }
            }
        }
    }
}

/// A fresh gradient's elements (standard layout, as every one here is made).
fn grad_slice(a: &Array2<f32>) -> &[f32] {
    a.as_slice().expect("standard layout")
}

/// A layer's bias gradient (every layer of the model has a bias).
fn bias_slice(b: &Option<Array1<f32>>) -> &[f32] {
    b.as_ref()
        .and_then(|b| b.as_slice())
        .expect("a standard-layout bias gradient")
}

/// The model: `logits = head(h + attn(h))` with `h = tok[x] + pos`. After
/// [`train_model`], [`TinyLm::generate`] continues prompts greedily through the
/// attention's KV cache.
pub struct TinyLm {
    tok: Array2<f32>,
    pos: Array2<f32>,
    attn: CausalSelfAttention<f32>,
    head: Linear<f32>,
}

impl TinyLm {
    fn new(config: &TrainConfig, rng: &mut Rng) -> Result<Self> {
        let e = config.embed;
        let a = 1.0 / (e as f32).sqrt();
        let c_attn = Linear::new(rng.matrix(3 * e, e, a), Some(Array1::zeros(3 * e)))?;
        let c_proj = Linear::new(rng.matrix(e, e, a), Some(Array1::zeros(e)))?;
        let mut attn =
            CausalSelfAttention::new(c_attn, c_proj, config.heads, config.dropout, true)?;
        attn.seed(config.seed);
        Ok(TinyLm {
            tok: rng.matrix(config.vocab, e, 1.0),
            pos: rng.matrix(config.seq_len, e, 1.0),
            attn,
            head: Linear::new(
                rng.matrix(config.vocab, e, a),
                Some(Array1::zeros(config.vocab)),
            )?,
        })
    }
}

fn batch(config: &TrainConfig, rng: &mut Rng) -> Array2<usize> {
    Array2::from_shape_simple_fn((config.batch, config.seq_len), || rng.below(config.vocab))
}

/// Trains a fresh [`TinyLm`] on the delayed-copy task, calling `on_step` after each
/// step.
///
/// # Errors
/// A configuration that cannot run (the argument is named), or what the attention's
/// device refuses.
pub fn train(
    config: &TrainConfig,
    exec: &Exec<'_>,
    on_step: impl FnMut(&StepReport),
) -> Result<TrainSummary> {
    Ok(train_model(config, exec, on_step)?.1)
}

/// [`train`], keeping the trained model.
///
/// # Errors
/// As [`train`].
pub fn train_model(
    config: &TrainConfig,
    exec: &Exec<'_>,
    mut on_step: impl FnMut(&StepReport),
) -> Result<(TinyLm, TrainSummary)> {
    config.validate()?;
    let mut rng = Rng(SplitMix64(config.seed));
    let mut model = TinyLm::new(config, &mut rng)?;
    let to_vec = |a: &Array2<f32>| a.iter().copied().collect::<Vec<_>>();
    let flat = |l: &Linear<f32>| -> [Param; 2] {
        [
            Param::new(to_vec(l.weight())),
            Param::new(l.bias().expect("built with a bias").to_vec()),
        ]
    };
    let [mut attn_w, mut attn_b] = flat(model.attn.c_attn());
    let [mut proj_w, mut proj_b] = flat(model.attn.c_proj());
    let [mut head_w, mut head_b] = flat(&model.head);
    let mut tok = Param::new(to_vec(&model.tok));
    let mut pos = Param::new(to_vec(&model.pos));

    let (b, t, e, vocab) = (config.batch, config.seq_len, config.embed, config.vocab);
    let counted = (b * (t - config.delay)) as f32;
    let mut history = Vec::with_capacity(config.steps);
    for step in 1..=config.steps {
        let x = batch(config, &mut rng);
        // Forward.
        let mut h = Array3::<f32>::zeros((b, t, e));
        for ((bi, ti), &token) in x.indexed_iter() {
            let mut row = h.index_axis_mut(Axis(0), bi);
            let mut row = row.index_axis_mut(Axis(0), ti);
            row.assign(&(&model.tok.row(token) + &model.pos.row(ti)));
        }
        let (a, saved) = model.attn.forward_train_on(h.view(), exec)?;
        let z = (&h + &a)
            .into_shape_with_order((b * t, e))
            .expect("contiguous");
        let logits = model.head.forward(z.view())?;
        // Cross-entropy over positions t >= delay, and its gradient.
        let mut dlogits = Array2::<f32>::zeros((b * t, vocab));
        let (mut loss, mut correct) = (0.0f64, 0usize);
        for r in 0..b * t {
            let (bi, ti) = (r / t, r % t);
            if ti < config.delay {
                continue;
            }
            let target = x[[bi, ti - config.delay]];
            let row = logits.row(r);
            let max = row.fold(f32::NEG_INFINITY, |m, &v| m.max(v));
            let sum: f32 = row.iter().map(|&v| (v - max).exp()).sum();
            loss += f64::from(sum.ln() + max - row[target]);
            let best = row
                .iter()
                .enumerate()
                .fold(
                    (0, f32::NEG_INFINITY),
                    |acc, (i, &v)| if v > acc.1 { (i, v) } else { acc },
                )
                .0;
            correct += usize::from(best == target);
            for (j, d) in dlogits.row_mut(r).iter_mut().enumerate() {
                let p = (row[j] - max).exp() / sum;
                *d = (p - f32::from(u8::from(j == target))) / counted;
            }
        }
        let report = StepReport {
            step,
            loss: (loss / f64::from(counted)) as f32,
            accuracy: correct as f32 / counted,
        };
        if !report.loss.is_finite() {
            return Err(NnError::Sdpa(SdpaError::invalid(
                "lr",
                "a rate at which the loss stays finite",
                format!("{} (loss {} at step {step})", config.lr, report.loss),
            )));
        }
        // Backward.
        let head_grads = model.head.backward(z.view(), dlogits.view())?;
        let dz = head_grads
            .dx
            .into_shape_with_order((b, t, e))
            .expect("contiguous");
        let block = model.attn.backward_on(&saved, dz.view(), exec)?;
        let dh = &dz + &block.dx;
        let mut dtok = Array2::<f32>::zeros((vocab, e));
        let mut dpos = Array2::<f32>::zeros((t, e));
        for ((bi, ti), &token) in x.indexed_iter() {
            let g = dh.index_axis(Axis(0), bi);
            let g = g.index_axis(Axis(0), ti);
            let mut row = dtok.row_mut(token);
            row += &g;
            let mut row = dpos.row_mut(ti);
            row += &g;
        }
        // Update.
        let ti = i32::try_from(step).unwrap_or(i32::MAX);
        // Every gradient is a fresh standard-layout array: its slice, no copy.
        attn_w.step(grad_slice(&block.c_attn.0), config, ti);
        attn_b.step(bias_slice(&block.c_attn.1), config, ti);
        proj_w.step(grad_slice(&block.c_proj.0), config, ti);
        proj_b.step(bias_slice(&block.c_proj.1), config, ti);
        head_w.step(grad_slice(&head_grads.weight), config, ti);
        head_b.step(bias_slice(&head_grads.bias), config, ti);
        tok.step(grad_slice(&dtok), config, ti);
        pos.step(grad_slice(&dpos), config, ti);
        let matrix = |p: &Param, rows, cols| {
            Array2::from_shape_vec((rows, cols), p.value.clone()).expect("its own shape")
        };
        let (c_attn, c_proj) = model.attn.layers_mut();
        c_attn.set_parameters(
            matrix(&attn_w, 3 * e, e),
            Some(Array1::from(attn_b.value.clone())),
        )?;
        c_proj.set_parameters(
            matrix(&proj_w, e, e),
            Some(Array1::from(proj_b.value.clone())),
        )?;
        model.head.set_parameters(
            matrix(&head_w, vocab, e),
            Some(Array1::from(head_b.value.clone())),
        )?;
        model.tok = matrix(&tok, vocab, e);
        model.pos = matrix(&pos, t, e);
        on_step(&report);
        history.push(report);
    }
    let last = &history[history.len().saturating_sub(10)..];
    let mean = |f: fn(&StepReport) -> f32| {
        if last.is_empty() {
            f32::NAN
        } else {
            last.iter().map(f).sum::<f32>() / last.len() as f32
        }
    };
    let summary = TrainSummary {
        initial_loss: history.first().map_or(f32::NAN, |r| r.loss),
        final_loss: mean(|r| r.loss),
        final_accuracy: mean(|r| r.accuracy),
    };
    Ok((model, summary))
}

fn argmax(row: ndarray::ArrayView1<'_, f32>) -> usize {
    row.iter()
        .enumerate()
        .fold(
            (0, f32::NEG_INFINITY),
            |acc, (i, &v)| if v > acc.1 { (i, v) } else { acc },
        )
        .0
}

impl TinyLm {
    /// Tokens the model can place (its position table's length).
    pub fn max_len(&self) -> usize {
        self.pos.nrows()
    }

    /// Logits `[B, T_new, vocab]` of `tokens [B, T_new]` at positions `cache.lens()..`,
    /// their keys and values appended to `cache` (causal attention through
    /// [`CausalSelfAttention::decode`], eval mode).
    fn step(
        &mut self,
        tokens: ndarray::ArrayView2<'_, usize>,
        cache: &mut crate::ModuleCache<f32>,
        exec: &Exec<'_>,
    ) -> Result<Array3<f32>> {
        let (b, t) = tokens.dim();
        let e = self.tok.ncols();
        let start = cache.lens().first().copied().unwrap_or(0);
        if start + t > self.max_len() {
            return Err(SdpaError::invalid(
                "new_tokens",
                format!(
                    "prompt and new tokens within the model's {} positions",
                    self.max_len()
                ),
                start + t,
            )
            .into());
        }
        let vocab = self.tok.nrows();
        let mut h = Array3::<f32>::zeros((b, t, e));
        for ((bi, ti), &token) in tokens.indexed_iter() {
            if token >= vocab {
                return Err(
                    SdpaError::invalid("prompt", format!("tokens below {vocab}"), token).into(),
                );
            }
            h.slice_mut(ndarray::s![bi, ti, ..])
                .assign(&(&self.tok.row(token) + &self.pos.row(start + ti)));
        }
        let a = self.attn.decode(h.view(), cache, exec)?;
        let z = (&h + &a)
            .into_shape_with_order((b * t, e))
            .expect("contiguous");
        Ok(self
            .head
            .forward(z.view())?
            .into_shape_with_order((b, t, vocab))
            .expect("contiguous"))
    }

    /// Greedy generation: feeds `prompt [B, P]` through the attention's KV cache at once,
    /// then one token at a time, each the most likely next token, `new_tokens` of them;
    /// returns `[B, new_tokens]`. The attention runs on `exec` (the decode kernels on
    /// CUDA) in eval mode; the module's mode is restored after.
    ///
    /// # Errors
    /// An empty prompt, a token outside the vocabulary, more tokens than the model has
    /// positions, what the device refuses.
    pub fn generate(
        &mut self,
        prompt: ndarray::ArrayView2<'_, usize>,
        new_tokens: usize,
        exec: &Exec<'_>,
    ) -> Result<ndarray::Array2<usize>> {
        let (b, p) = prompt.dim();
        if p == 0 {
            return Err(SdpaError::invalid("prompt", "at least one token", 0).into());
        }
        let heads = self.attn.heads();
        let training = self.attn.is_training();
        self.attn.eval();
        let mut cache =
            crate::ModuleCache::new(b, heads, p + new_tokens, self.tok.ncols() / heads)?;
        let mut out = ndarray::Array2::<usize>::zeros((b, new_tokens));
        let result = (|| {
            let mut logits = self.step(prompt, &mut cache, exec)?;
            for n in 0..new_tokens {
                let last = logits.index_axis(Axis(1), logits.dim().1 - 1).to_owned();
                let next = ndarray::Array2::from_shape_fn((b, 1), |(bi, _)| argmax(last.row(bi)));
                out.column_mut(n).assign(&next.column(0));
                if n + 1 < new_tokens {
                    logits = self.step(next.view(), &mut cache, exec)?;
                }
            }
            Ok(())
        })();
        if training {
            self.attn.train();
        }
        result.map(|()| out)
    }

    /// The next-token logits `[B, vocab]` after `tokens [B, T]`, recomputed from nothing
    /// (a fresh cache): what [`generate`](Self::generate)'s incremental steps must equal.
    ///
    /// # Errors
    /// As [`generate`](Self::generate).
    pub fn next_logits(
        &mut self,
        tokens: ndarray::ArrayView2<'_, usize>,
        exec: &Exec<'_>,
    ) -> Result<ndarray::Array2<f32>> {
        let (b, t) = tokens.dim();
        if t == 0 {
            return Err(SdpaError::invalid("tokens", "at least one token", 0).into());
        }
        let heads = self.attn.heads();
        let training = self.attn.is_training();
        self.attn.eval();
        let r = crate::ModuleCache::new(b, heads, t, self.tok.ncols() / heads)
            .and_then(|mut cache| self.step(tokens, &mut cache, exec));
        if training {
            self.attn.train();
        }
        Ok(r?.index_axis(Axis(1), t - 1).to_owned())
    }
}
