#!/usr/bin/env python3
"""Decode beside PyTorch: times PyTorch's SDPA backends (cuDNN, flash, efficient, math)
with enable_gqa on each shape of `sdpa-cuda-bench --decode` (its JSON lines), on a dense
[B, Hkv, S, E] K/V (PyTorch has no paged cache: a paged row is compared with the dense
call of the same work), bf16, non-causal (one query row sees every key either way; the
chunked-prefill row runs non-causal on both sides). CUDA events, warm-up, median, caches
rotated past twice the L2. Measures the device copy rate (read + write of 1 GiB) in the
same process and prints one markdown table: our time, PyTorch's, the ratio (PyTorch's
time / ours: > 1 means ours is faster), K/V GB/s and its share of the copy rate.

Usage: python3 bench_torch_decode.py ours.jsonl [--json out.json]
"""
import argparse
import json
import statistics

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

BACKENDS = {
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
}


def timed(fn, warmup=5, runs=50, budget_ms=1500.0):
    for i in range(warmup):
        fn(i)
    torch.cuda.synchronize()
    times, spent = [], 0.0
    for i in range(runs):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn(i)
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
        spent += times[-1]
        if spent > budget_ms and len(times) >= 10:
            break
    return statistics.median(times) * 1e3


def copy_rate():
    n = 1 << 30
    src = torch.empty(n, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    us = timed(lambda i: dst.copy_(src), runs=10)
    return 2 * n / (us * 1e-6) / 1e9


def torch_times(s):
    b, hq, hkv, lq, n, e = s["batch"], s["heads_q"], s["heads_kv"], s["len_q"], s["len_kv"], s["head_dim"]
    kv_bytes = 2 * b * hkv * n * e * 2
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    sets = min(16, max(2, -(-2 * l2 // kv_bytes)))
    gen = torch.Generator(device="cuda").manual_seed(0)
    rnd = lambda *shape: torch.rand(*shape, device="cuda", dtype=torch.bfloat16, generator=gen) * 2 - 1
    q = rnd(b, hq, lq, e)
    kv = [(rnd(b, hkv, n, e), rnd(b, hkv, n, e)) for _ in range(sets)]
    out = {}
    for name, backend in BACKENDS.items():
        if name == "math" and b * hq * lq * n > (1 << 31):
            out[name] = None
            continue
        try:
            with sdpa_kernel([backend]):
                def call(i):
                    k, v = kv[i % sets]
                    F.scaled_dot_product_attention(q, k, v, enable_gqa=hq != hkv)
                out[name] = timed(call)
        except RuntimeError as err:
            out[name] = None
            print(f"  {name}: {str(err).splitlines()[0][:100]}")
    del kv
    torch.cuda.empty_cache()
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("ours")
    ap.add_argument("--json")
    args = ap.parse_args()
    print(f"device: {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    copy = copy_rate()
    print(f"copy: {copy:.0f} GB/s (read + write of 1 GiB)\n")
    rows = [json.loads(l) for l in open(args.ours) if l.strip()]
    print("| B | Hq/Hkv | Lq | S | cache | ours us | path, splits | K/V GB/s | of copy | cuDNN us | flash us | efficient us | math us | vs cuDNN | vs flash | vs best |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    results = []
    for r in rows:
        s = r["shape"]
        t = torch_times(s)
        ours = r["median_us"]
        best = min(x for x in t.values() if x is not None)
        fmt = lambda x: "-" if x is None else f"{x:.1f}"
        ratio = lambda x: "-" if x is None else f"{x / ours:.2f}x"
        cache = "dense" if s["block_size"] == 0 else f"paged {s['block_size']}"
        print(
            f"| {s['batch']} | {s['heads_q']}/{s['heads_kv']} | {s['len_q']} | {s['len_kv']} | {cache} | {ours:.1f} | {r.get('path', 'split-kv')}, {r['splits']} "
            f"| {r['kv_gbs']:.0f} | {100 * r['kv_gbs'] / copy:.0f}% | {fmt(t['cudnn'])} | {fmt(t['flash'])} | {fmt(t['efficient'])} "
            f"| {fmt(t['math'])} | {ratio(t['cudnn'])} | {ratio(t['flash'])} | {ratio(best)} |",
            flush=True,
        )
        results.append({"ours": r, "torch_us": t, "copy_gbs": copy})
    if args.json:
        json.dump(results, open(args.json, "w"), indent=1)


if __name__ == "__main__":
    main()
