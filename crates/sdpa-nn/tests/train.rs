//! The training demo learns: the loss of `sdpa_nn::train` on the delayed-copy task falls
//! from about ln(vocab) to the stated value within the stated steps on the CPU (the
//! README's run; the GPU bundle runs the same with the attention on CUDA).

use sdpa_nn::train::{train, Optimizer, TrainConfig};

#[test]
fn adam_learns_the_delayed_copy_in_100_steps() {
    let config = TrainConfig {
        steps: 100,
        ..TrainConfig::small()
    };
    let mut losses = Vec::new();
    let summary = train(&config, &sdpa::Exec::cpu(), |r| losses.push(r.loss)).unwrap();
    assert_eq!(losses.len(), 100);
    // Untrained: close to ln(32) = 3.47.
    assert!(
        (summary.initial_loss - 32f32.ln()).abs() < 0.5,
        "{summary:?}"
    );
    assert!(summary.final_loss < 0.01, "{summary:?}");
    assert!(summary.final_accuracy > 0.99, "{summary:?}");
}

#[test]
fn adam_learns_with_dropout() {
    let config = TrainConfig {
        steps: 150,
        dropout: 0.1,
        ..TrainConfig::small()
    };
    let summary = train(&config, &sdpa::Exec::cpu(), |_| {}).unwrap();
    assert!(summary.final_loss < 0.05, "{summary:?}");
    assert!(summary.final_accuracy > 0.98, "{summary:?}");
}

#[test]
fn sgd_learns_the_delayed_copy_in_300_steps() {
    let config = TrainConfig {
        steps: 300,
        optimizer: Optimizer::Sgd,
        lr: 1.0,
        ..TrainConfig::small()
    };
    let summary = train(&config, &sdpa::Exec::cpu(), |_| {}).unwrap();
    assert!(summary.final_loss < 0.01, "{summary:?}");
    assert!(summary.final_accuracy > 0.99, "{summary:?}");
}

#[test]
fn a_bad_configuration_is_refused_by_name() {
    for (config, name) in [
        (
            TrainConfig {
                delay: 32,
                ..TrainConfig::small()
            },
            "delay",
        ),
        (
            TrainConfig {
                heads: 3,
                ..TrainConfig::small()
            },
            "heads",
        ),
        (
            TrainConfig {
                lr: f32::NAN,
                ..TrainConfig::small()
            },
            "lr",
        ),
        (
            TrainConfig {
                batch: 0,
                ..TrainConfig::small()
            },
            "batch",
        ),
        (
            TrainConfig {
                vocab: 1,
                ..TrainConfig::small()
            },
            "vocab",
        ),
    ] {
        let err = train(&config, &sdpa::Exec::cpu(), |_| {})
            .unwrap_err()
            .to_string();
        assert!(err.contains(name), "{name}: {err}");
    }
}

#[test]
fn the_trained_model_generates_the_delayed_copy_through_its_kv_cache() {
    let config = TrainConfig {
        steps: 100,
        ..TrainConfig::small()
    };
    let exec = sdpa::Exec::cpu();
    let (mut model, summary) = sdpa_nn::train::train_model(&config, &exec, |_| {}).unwrap();
    assert!(summary.final_accuracy > 0.99, "{summary:?}");
    let delay = config.delay;
    // The model's output at position t is the token at t - delay: fed back as the next
    // token, the continuation repeats the last delay + 1 tokens (a prompt of delay + 1
    // tokens, so that every output position was trained).
    let p = delay + 1;
    let prompt =
        ndarray::Array2::from_shape_fn((3, p), |(b, i)| (7 * b + 3 * i + 1) % config.vocab);
    let new = config.seq_len - p;
    let out = model.generate(prompt.view(), new, &exec).unwrap();
    for b in 0..3 {
        for n in 0..new {
            assert_eq!(
                out[[b, n]],
                prompt[[b, n % p]],
                "row {b}, token {n}: {out:?}"
            );
        }
    }
    // Each incremental step's choice is the argmax of logits recomputed from nothing.
    let mut seq = prompt.clone();
    for n in 0..6 {
        let logits = model.next_logits(seq.view(), &exec).unwrap();
        for b in 0..3 {
            let best = (0..config.vocab)
                .max_by(|&i, &j| logits[[b, i]].total_cmp(&logits[[b, j]]))
                .unwrap();
            assert_eq!(best, out[[b, n]]);
        }
        seq = ndarray::concatenate(
            ndarray::Axis(1),
            &[seq.view(), out.slice(ndarray::s![.., n..n + 1])],
        )
        .unwrap();
    }
    // Past the model's positions: refused by name.
    let e = model
        .generate(prompt.view(), config.seq_len, &exec)
        .unwrap_err()
        .to_string();
    assert!(e.contains("new_tokens"), "{e}");
}
