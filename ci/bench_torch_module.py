#!/usr/bin/env python3
"""PyTorch's side of the module benchmarks (issues 5 and 6), timed the way
sdpa-nn-bench times ours: CUDA events around each call, 10 warm-ups, median of 100.

- Nested experiment: the tutorial's CausalSelfAttention (E=512, 8 heads, bias=False,
  is_causal=True, dropout=0.1, f16, eval) on the same 32 lengths as ours (read from
  sdpa-nn-bench's JSON): the nested batch (torch.nested, jagged layout) vs the
  zero-padded dense batch, and SDPA alone both ways.
- Module comparison: B=32, T=256, eager vs torch.compile.

With --ours it prints markdown tables of both sides and the ratios.
Usage: python3 bench_torch_module.py --ours ours.json [--json torch.json]
"""
import argparse
import json
import statistics
import traceback

import torch
import torch.nn as nn
import torch.nn.functional as F

WARMUP, RUNS = 10, 100


class CausalSelfAttention(nn.Module):
    """The tutorial's module, written with unflatten/flatten so that it also takes a
    jagged nested tensor (whose ragged dim `view` cannot name)."""

    def __init__(self, num_heads, embed_dimension, bias=False, is_causal=False, dropout=0.0):
        super().__init__()
        assert embed_dimension % num_heads == 0
        self.c_attn = nn.Linear(embed_dimension, 3 * embed_dimension, bias=bias)
        self.c_proj = nn.Linear(embed_dimension, embed_dimension, bias=bias)
        self.dropout = dropout
        self.resid_dropout = nn.Dropout(dropout)
        self.num_heads = num_heads
        self.embed_dimension = embed_dimension
        self.is_causal = is_causal

    def forward(self, x):
        query_projected = self.c_attn(x)
        embed_dim = query_projected.size(-1)
        head_dim = embed_dim // (self.num_heads * 3)
        query, key, value = query_projected.chunk(3, -1)
        query = query.unflatten(-1, [self.num_heads, head_dim]).transpose(1, 2)
        key = key.unflatten(-1, [self.num_heads, head_dim]).transpose(1, 2)
        value = value.unflatten(-1, [self.num_heads, head_dim]).transpose(1, 2)
        if self.training:
            dropout, is_causal = self.dropout, self.is_causal
        else:
            dropout, is_causal = 0.0, False
        y = F.scaled_dot_product_attention(
            query, key, value, attn_mask=None, dropout_p=dropout, is_causal=is_causal
        )
        y = y.transpose(1, 2).flatten(-2)
        return self.resid_dropout(self.c_proj(y))


def median_us(fn):
    with torch.no_grad():
        for _ in range(WARMUP):
            fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(RUNS):
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1e3)
    return statistics.median(times)


def attempt(label, fn, errors):
    try:
        return median_us(fn)
    except Exception as err:  # noqa: BLE001 - report any failure and go on
        errors[label] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
        traceback.print_exc()
        return None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ours", required=True)
    ap.add_argument("--json")
    args = ap.parse_args()
    ours = json.load(open(args.ours))
    dev = "cuda"
    dtype = torch.float16
    torch.manual_seed(0)
    e, h = ours["embed"], ours["heads"]
    lengths = ours["lengths"]
    model = CausalSelfAttention(h, e, bias=False, is_causal=True, dropout=0.1).to(dev, dtype).eval()
    errors = {}

    seqs = [torch.randn(n, e, device=dev, dtype=dtype) for n in lengths]
    nt = torch.nested.nested_tensor(seqs, layout=torch.jagged)
    padded = torch.nested.to_padded_tensor(torch.nested.nested_tensor(seqs), 0.0)
    res = {
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(0),
        "nested_module_us": attempt("nested_module", lambda: model(nt), errors),
        "dense_module_us": attempt("dense_module", lambda: model(padded), errors),
    }
    # SDPA alone, on q, k, v from one projection (as in the module).
    with torch.no_grad():
        def qkv(x):
            q, k, v = model.c_attn(x).chunk(3, -1)
            return [t.unflatten(-1, [h, e // h]).transpose(1, 2) for t in (q, k, v)]

        nq, nk, nv = qkv(nt)
        dq, dk, dv = qkv(padded)
    res["nested_attn_us"] = attempt(
        "nested_attn", lambda: F.scaled_dot_product_attention(nq, nk, nv), errors
    )
    res["dense_attn_us"] = attempt(
        "dense_attn", lambda: F.scaled_dot_product_attention(dq, dk, dv), errors
    )

    # Module comparison.
    x = torch.randn(ours["module_batch"], ours["module_seq"], e, device=dev, dtype=dtype)
    res["module_eager_us"] = attempt("module_eager", lambda: model(x), errors)
    try:
        compiled = torch.compile(model)
        res["module_compile_us"] = attempt("module_compile", lambda: compiled(x), errors)
    except Exception as err:  # noqa: BLE001
        errors["module_compile"] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
        res["module_compile_us"] = None
    # Training step: forward and backward of the same module in train mode (dropout 0
    # and the tutorial's 0.1), eager.
    g = torch.randn_like(x)
    for p, key in [(0.0, "train_step_us"), (0.1, "train_step_dropout_us")]:
        m = CausalSelfAttention(h, e, bias=False, is_causal=True, dropout=p).to(dev, dtype).train()
        xt = x.clone().requires_grad_(True)

        def step(m=m, xt=xt):
            with torch.enable_grad():  # median_us times under no_grad
                m(xt).backward(g)

        res[key] = attempt(key, step, errors)
    res["errors"] = errors
    if args.json:
        json.dump(res, open(args.json, "w"), indent=1)

    def f(x):
        return "n/a" if x is None else f"{x:.1f} us"

    def ratio(a, b):
        return "n/a" if a is None or b is None else f"{a / b:.2f}x"

    print(f"\ncard: {res['device']}, torch {res['torch']}")
    print(
        f"\nNested experiment: B={len(lengths)}, max length {ours['max_len']}, "
        f"{sum(lengths)} rows ({100 * ours['padding']:.1f}% padding), E={e}, {h} heads, f16, eval\n"
    )
    print("| | ours nested | ours dense padded | torch nested (jagged) | torch dense padded | ours nested vs ours dense | ours nested vs torch dense | ours nested vs torch nested |")
    print("|---|---|---|---|---|---|---|---|")
    for what, key in [("module forward", "module"), ("attention (SDPA) alone", "attn")]:
        on, od = ours[f"nested_{key}_us"], ours[f"dense_{key}_us"]
        tn, td = res[f"nested_{key}_us"], res[f"dense_{key}_us"]
        print(f"| {what} | {f(on)} | {f(od)} | {f(tn)} | {f(td)} | {ratio(od, on)} | {ratio(td, on)} | {ratio(tn, on)} |")
    print(
        f"\nModule comparison: B={ours['module_batch']}, T={ours['module_seq']}, E={e}, {h} heads, f16, eval\n"
    )
    print("| ours | torch eager | torch.compile | eager / ours | compile / ours |")
    print("|---|---|---|---|---|")
    ours_m = ours["module_us"]
    print(
        f"| {f(ours_m)} | {f(res['module_eager_us'])} | {f(res['module_compile_us'])} | "
        f"{ratio(res['module_eager_us'], ours_m)} | {ratio(res['module_compile_us'], ours_m)} |"
    )
    print(f"\nTraining step (forward + backward, train mode): B={ours['module_batch']}, T={ours['module_seq']}, E={e}, {h} heads, f16\n")
    print("| dropout | ours | torch eager | eager / ours |")
    print("|---|---|---|---|")
    for label, key in [("0", "train_step_us"), ("0.1", "train_step_dropout_us")]:
        print(f"| {label} | {f(ours.get(key))} | {f(res.get(key))} | {ratio(res.get(key), ours.get(key))} |")
    for k, v in errors.items():
        print(f"error in {k}: {v}")


if __name__ == "__main__":
    main()
