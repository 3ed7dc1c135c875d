#!/usr/bin/env python3
"""Times PyTorch's SDPA backends (default, flash, efficient, cuDNN, math) on the issue's
five shapes on this machine's GPU, the way sdpa-cuda-bench times ours: CUDA events,
warm-up, median of many runs, input sets rotated so that together they exceed twice
the L2 cache. With --ours (sdpa-cuda-bench --json output) it prints one markdown table
of both, with TFLOP/s and our time's ratio to PyTorch's (speed-up: >1 means ours is
faster).

Usage: python3 bench_torch.py [--ours ours.jsonl] [--json torch.json] [--shapes "B,H,L,E,dt,causal;..."]
"""
import argparse
import json
import statistics

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

SHAPES = [
    (32, 32, 1024, 32, "f16", False),
    (16, 16, 2048, 64, "f16", False),
    (8, 16, 4096, 128, "bf16", False),
    (8, 16, 4096, 128, "bf16", True),
    (4, 16, 8192, 128, "f16", False),
]
BACKENDS = {
    "default": None,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "math": SDPBackend.MATH,
}
DTYPES = {"f16": torch.float16, "bf16": torch.bfloat16, "f32": torch.float32}


def flops(b, h, l, e, causal):
    full = 4.0 * b * h * l * l * e
    return full / 2 if causal else full


def time_backend(shape, backend, warmup, max_runs, budget_ms):
    b, h, l, e, dt, causal = shape
    dtype = DTYPES[dt]
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    set_bytes = 3 * b * h * l * e * torch.finfo(dtype).bits // 8
    sets = min(16, max(2, -(-2 * l2 // set_bytes)))
    gen = torch.Generator(device="cuda").manual_seed(0)
    inputs = [
        [torch.rand(b, h, l, e, device="cuda", dtype=dtype, generator=gen) * 2 - 1 for _ in range(3)]
        for _ in range(sets)
    ]

    def call(i):
        q, k, v = inputs[i % sets]
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    try:
        if backend is None:
            for i in range(warmup):
                call(i)
        else:
            with sdpa_kernel([backend]):
                for i in range(warmup):
                    call(i)
        torch.cuda.synchronize()
    except RuntimeError as err:
        return None, str(err).splitlines()[0][:120]
    times, spent = [], 0.0
    for i in range(max_runs):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        if backend is None:
            start.record()
            call(i + warmup)
            end.record()
        else:
            with sdpa_kernel([backend]):
                start.record()
                call(i + warmup)
                end.record()
        end.synchronize()
        ms = start.elapsed_time(end)
        times.append(ms)
        spent += ms
        if spent > budget_ms and len(times) >= 5:
            break
    del inputs
    torch.cuda.empty_cache()
    return statistics.median(times), None


def parse_shape(entry):
    b, h, l, e, dt, causal = [f.strip() for f in entry.split(",")]
    if dt not in DTYPES or causal not in ("true", "false"):
        raise SystemExit(f"bad shape {entry!r}: B,H,L,E,f16|bf16,true|false")
    return (int(b), int(h), int(l), int(e), dt, causal == "true")


def key(shape):
    b, h, l, e, dt, causal = shape
    return f"({b},{h},{l},{e}) {dt}{' causal' if causal else ''}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ours")
    ap.add_argument("--json")
    ap.add_argument("--shapes", help="B,H,L,E,dtype,causal;... (sdpa-cuda-bench's SDPA_BENCH_SHAPE_LIST)")
    args = ap.parse_args()
    if args.shapes:
        SHAPES[:] = [parse_shape(e) for e in args.shapes.split(";") if e.strip()]
    torch.backends.cuda.matmul.allow_tf32 = False
    theirs = {}
    for shape in SHAPES:
        for name, backend in BACKENDS.items():
            warmup, runs = (2, 10) if name == "math" else (5, 50)
            ms, err = time_backend(shape, backend, warmup, runs, 1500.0)
            theirs[(key(shape), name)] = ms
            if err:
                print(f"torch {name} {key(shape)}: not run: {err}")
    ours = {}
    if args.ours:
        with open(args.ours) as f:
            for line in f:
                line = line.strip()
                if not line.startswith("{"):
                    continue
                r = json.loads(line)
                s = r["shape"]
                shape = (s["batch"], s["heads"], s["len"], s["head_dim"], s["dtype"], s["causal"])
                ours[(key(shape), r["backend"])] = r["median_ms"]
    if args.json:
        with open(args.json, "w") as f:
            json.dump({f"{k[0]} | {k[1]}": v for k, v in theirs.items()}, f, indent=1)
    print(f"device: {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    print()
    print("| shape | torch default | torch flash | torch efficient | torch cuDNN | torch math "
          "| ours flash | ours efficient | ours math | flash vs torch flash | flash vs torch default "
          "| efficient vs torch efficient | math vs torch math |")
    print("|---" * 13 + "|")
    for shape in SHAPES:
        k = key(shape)
        f = flops(*shape[:4], shape[5])

        def cell(ms):
            return "n/a" if ms is None else f"{ms:.3f} ms / {f / ms / 1e9:.0f} TF"

        def ratio(a, b):
            return "n/a" if a is None or b is None else f"{b / a:.2f}x"

        t = {n: theirs.get((k, n)) for n in BACKENDS}
        o = {n: ours.get((k, n)) for n in ["flash", "efficient", "math"]}
        print(f"| {k} | {cell(t['default'])} | {cell(t['flash'])} | {cell(t['efficient'])} | "
              f"{cell(t['cudnn'])} | {cell(t['math'])} | {cell(o['flash'])} | {cell(o['efficient'])} | "
              f"{cell(o['math'])} | {ratio(o['flash'], t['flash'])} | {ratio(o['flash'], t['default'])} | "
              f"{ratio(o['efficient'], t['efficient'])} | {ratio(o['math'], t['math'])} |")


if __name__ == "__main__":
    main()
