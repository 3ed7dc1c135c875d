//! Ring attention on this machine's CPU: a causal call sharded over simulated ranks
//! (threads), forward and backward, against the one-device call.
//!
//! ```text
//! cargo run --release -p sdpa-dist --example ring -- [--ranks 4] [--len 1024]
//!     [--heads 8] [--kv-heads 2] [--head-dim 64] [--sharding zigzag|contiguous]
//!     [--dropout 0.1] [--dtype f32|f64]
//! ```

use ndarray::Array4;
use sdpa_core::rng::SplitMix64;
use sdpa_core::{Causal, Dropout, SdpaOptions};
use sdpa_dist::{simulate_backward, simulate_forward, Plan, Ring, Sharding};
use sdpa_ref::{sdpa_backward, Element, Gradients, Output};
use std::time::Instant;

struct Args {
    ranks: usize,
    len: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    sharding: Sharding,
    dropout: f64,
    f64: bool,
}

fn parse() -> Result<Args, String> {
    let mut a = Args {
        ranks: 4,
        len: 1024,
        heads: 8,
        kv_heads: 2,
        head_dim: 64,
        sharding: Sharding::Zigzag,
        dropout: 0.0,
        f64: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag}: expected a value"));
        let number = |v: String| v.parse::<usize>().map_err(|e| format!("{flag}: {e}"));
        match flag.as_str() {
            "--ranks" => a.ranks = number(value()?)?,
            "--len" => a.len = number(value()?)?,
            "--heads" => a.heads = number(value()?)?,
            "--kv-heads" => a.kv_heads = number(value()?)?,
            "--head-dim" => a.head_dim = number(value()?)?,
            "--sharding" => a.sharding = value()?.parse().map_err(|e| format!("{e}"))?,
            "--dropout" => {
                a.dropout = value()?.parse().map_err(|e| format!("{flag}: {e}"))?;
            }
            "--dtype" => {
                a.f64 = match value()?.as_str() {
                    "f64" => true,
                    "f32" => false,
                    other => return Err(format!("--dtype: expected f32 or f64, got {other}")),
                }
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(a)
}

fn max_diff<T: Element>(a: &Array4<T>, b: &Array4<T>) -> f64 {
    let wide = |x: &T| num_traits::ToPrimitive::to_f64(&x.to_acc()).unwrap_or(f64::NAN);
    a.iter()
        .zip(b)
        .map(|(x, y)| (wide(x) - wide(y)).abs())
        .fold(0.0, f64::max)
}

fn run<T: Element>(a: &Args) -> Result<(), Box<dyn std::error::Error>> {
    let mut rng = SplitMix64(7);
    let mut draw = |h: usize| {
        Array4::from_shape_simple_fn((1, h, a.len, a.head_dim), || {
            T::from_acc(<T::Acc as sdpa_ref::Accum>::from_f64(rng.symmetric()))
        })
    };
    let (q, k, v, dout) = (
        draw(a.heads),
        draw(a.kv_heads),
        draw(a.kv_heads),
        draw(a.heads),
    );
    let options = SdpaOptions {
        causal: Causal::TopLeft,
        enable_gqa: a.heads != a.kv_heads,
        dropout: Dropout::new(a.dropout, 2026, 0),
        ..Default::default()
    };
    let ring = Ring::self_attention(Plan::new(a.sharding, a.len, a.ranks)?);
    println!(
        "causal attention, B 1, {} query heads over {} kv heads, L = S = {}, E = {}, {}, \
         dropout {}: {} ranks, {:?} sharding",
        a.heads,
        a.kv_heads,
        a.len,
        a.head_dim,
        T::DTYPE.name(),
        a.dropout,
        a.ranks,
        a.sharding
    );
    for r in 0..a.ranks {
        let segs: Vec<String> = ring
            .queries()
            .segments(r)
            .iter()
            .map(|s| format!("{}..{}", s.start, s.start + s.len))
            .collect();
        println!("  rank {r}: rows {}", segs.join(", "));
    }
    let t = Instant::now();
    let one: Output<T> = sdpa_ref::sdpa(q.view(), k.view(), v.view(), None, &options)?;
    let one_grads: Gradients<T> = sdpa_backward(
        q.view(),
        k.view(),
        v.view(),
        one.out.view(),
        one.lse.view(),
        dout.view(),
        None,
        &options,
    )?;
    let t_one = t.elapsed();
    let t = Instant::now();
    let cp = simulate_forward(&ring, q.view(), k.view(), v.view(), None, &options)?;
    let t_fwd = t.elapsed();
    let cp_grads = simulate_backward(
        &ring,
        q.view(),
        k.view(),
        v.view(),
        cp.out.view(),
        cp.lse.view(),
        dout.view(),
        None,
        &options,
    )?;
    let t_ring = t.elapsed();
    println!(
        "one device: {:.1} ms forward + backward; ring: {:.1} ms ({:.1} ms forward), \
         all ranks on this machine's {} CPU threads",
        t_one.as_secs_f64() * 1e3,
        t_ring.as_secs_f64() * 1e3,
        t_fwd.as_secs_f64() * 1e3,
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    for (name, x, y) in [
        ("out", &cp.out, &one.out),
        ("dq", &cp_grads.dq, &one_grads.dq),
        ("dk", &cp_grads.dk, &one_grads.dk),
        ("dv", &cp_grads.dv, &one_grads.dv),
    ] {
        println!(
            "  max |ring - one device| of {name}: {:.3e}",
            max_diff(x, y)
        );
    }
    Ok(())
}

fn main() {
    let result = parse().map_err(Into::into).and_then(|a| {
        if a.f64 {
            run::<f64>(&a)
        } else {
            run::<f32>(&a)
        }
    });
    if let Err(e) = result {
        eprintln!("error: {e}");
        std::process::exit(2);
    }
}
