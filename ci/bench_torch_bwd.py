#!/usr/bin/env python3
"""Times PyTorch's SDPA backward (default, flash, efficient, cuDNN; math on the two
smallest shapes) on the problems `sdpa-cuda-bench --backward` times ours on: the issue's
five shapes, and the second with dropout 0.1 and with a bool key-padding mask [B, 1, 1, S].
Only the backward is timed (torch.autograd.grad of one forward's output, retain_graph),
with CUDA events, after a warm-up, median of the runs. TFLOP/s count the backward as 2.5x
the forward's FLOPs. With --ours (sdpa-cuda-bench --backward output) it prints one
markdown table of both and the ratio PyTorch time / ours (>1: ours is faster).

Usage: python3 bench_torch_bwd.py [--ours ours.jsonl] [--json torch.json]
"""
import argparse
import json
import statistics

import torch
import torch.nn.functional as F
from torch.nn.attention import sdpa_kernel

# The five shapes and the backend table are the forward bench's (same folder, here and
# in the GPU bundle).
from bench_torch import BACKENDS, DTYPES, SHAPES
from bench_torch import flops as forward_flops


def problems():
    for s in SHAPES:
        yield s, None
    yield SHAPES[1], "dropout0.1"
    yield SHAPES[1], "keypadding"


def label(shape, variant):
    b, h, l, e, dt, causal = shape
    base = f"{b},{h},{l},{e},{dt},{str(causal).lower()}"
    return base if variant is None else f"{base},{variant}"


def flops(shape):
    b, h, l, e, _, causal = shape
    return 2.5 * forward_flops(b, h, l, e, causal)


def time_backward(shape, variant, backend, warmup=2, max_runs=20, budget_ms=600.0):
    b, h, l, e, dt, causal = shape
    dtype = DTYPES[dt]
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = [
        (torch.rand(b, h, l, e, device="cuda", dtype=dtype, generator=gen) * 2 - 1).requires_grad_()
        for _ in range(3)
    ]
    dout = torch.rand(b, h, l, e, device="cuda", dtype=dtype, generator=gen) * 2 - 1
    mask = None
    if variant == "keypadding":
        keep = torch.arange(l, device="cuda")[None, :] < torch.tensor(
            [max(1, l - (i % 4) * l // 8) for i in range(b)], device="cuda"
        )[:, None]
        mask = keep[:, None, None, :]
    p = 0.1 if variant == "dropout0.1" else 0.0

    def forward():
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, is_causal=causal)

    try:
        if backend is None:
            out = forward()
        else:
            with sdpa_kernel(backend):
                out = forward()
        call = lambda: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)
        for _ in range(warmup):
            call()
        torch.cuda.synchronize()
        times, spent = [], 0.0
        for _ in range(max_runs):
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            call()
            end.record()
            end.synchronize()
            ms = start.elapsed_time(end)
            times.append(ms)
            spent += ms
            if spent > budget_ms and len(times) >= 3:
                break
        return statistics.median(times)
    except Exception as err:  # a backend that refuses the problem, or runs out of memory
        return str(err).splitlines()[0][:80]
    finally:
        torch.cuda.empty_cache()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ours")
    ap.add_argument("--json")
    args = ap.parse_args()
    print(f"device: {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    results = {}
    for shape, variant in problems():
        key = label(shape, variant)
        for name, backend in BACKENDS.items():
            if name == "math" and shape[2] > 2048:
                continue
            results[(key, name)] = time_backward(shape, variant, backend)
            print(key, name, results[(key, name)], flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({f"{k}|{n}": v for (k, n), v in results.items()}, f, indent=1)
    ours = {}
    if args.ours:
        with open(args.ours) as f:
            for line in f:
                line = line.strip()
                if line.startswith("{"):
                    row = json.loads(line)
                    ours[(row["label"], row["backend"])] = row["median_ms"]
    print()
    print("| problem | ours flash ms (TFLOP/s) | ours efficient | ours math | torch flash | torch efficient | torch cuDNN | torch default | torch flash/ours flash | torch efficient/ours efficient | torch default/ours best |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for shape, variant in problems():
        key = label(shape, variant)
        f = flops(shape)
        mine = {b: ours.get((key, b)) for b in ("flash", "efficient", "math")}
        timed = [t for t in mine.values() if isinstance(t, float)]
        best = min(timed) if timed else None

        def cell(ms):
            if isinstance(ms, float):
                return f"{ms:.3f} ({f / ms / 1e9:.0f})"
            return "n/a" if ms is None else f"n/a ({ms})"

        def ratio(name, ours_ms):
            t = results.get((key, name))
            if isinstance(t, float) and isinstance(ours_ms, float):
                return f"{t / ours_ms:.2f}x"
            return "n/a"

        print(
            f"| {key} | {cell(mine['flash'])} | {cell(mine['efficient'])} | {cell(mine['math'])} | "
            f"{cell(results.get((key, 'flash')))} | {cell(results.get((key, 'efficient')))} | "
            f"{cell(results.get((key, 'cudnn')))} | {cell(results.get((key, 'default')))} | "
            f"{ratio('flash', mine['flash'])} | {ratio('efficient', mine['efficient'])} | {ratio('default', best)} |"
        )

if __name__ == "__main__":
    main()
