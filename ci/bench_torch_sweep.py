#!/usr/bin/env python3
"""PyTorch's SDPA backends over the sweep `sdpa bench --sweep` times ours on: B*L = 16384
tokens, H*E = 2048, L from 512 to 16k, head dims 64 and 128, causal off and on (the
layout of FlashAttention's README benchmarks). Forward (bench_torch.py's timing: CUDA
events, inputs rotated past 2x L2, median) or, with --backward, the backward alone
(bench_torch_bwd.py's: autograd.grad of one forward's output, 2.5x the forward's FLOPs).
Writes JSON in the shape of the sweep's (`{"device", "source": "torch", "rows": [...]}`,
rows with backend, pass, batch, heads, len, head_dim, dtype, causal, median_ms, tflops or
unavailable) for `sdpa chart`.

Usage: python3 bench_torch_sweep.py --out torch-sweep.json [--backward] [--dtype bf16]
         [--lens 512,1024,...] [--head-dims 64,128] [--backends default,flash,cudnn,efficient]
"""
import argparse
import json

import torch

from bench_torch import BACKENDS, flops, time_backend
from bench_torch_bwd import time_backward


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--backward", action="store_true")
    ap.add_argument("--dtype", default="bf16", choices=["f16", "bf16"])
    ap.add_argument("--lens", default="512,1024,2048,4096,8192,16384")
    ap.add_argument("--head-dims", default="64,128")
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--backends", default="default,flash,cudnn,efficient")
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    names = args.backends.split(",")
    rows = []
    for e in (int(x) for x in args.head_dims.split(",")):
        for causal in (False, True):
            for l in (int(x) for x in args.lens.split(",")):
                b, h = max(1, args.tokens // l), max(1, args.hidden // e)
                shape = (b, h, l, e, args.dtype, causal)
                work = flops(b, h, l, e, causal) * (2.5 if args.backward else 1.0)
                for name in names:
                    row = {"source": "torch", "backend": name,
                           "pass": "backward" if args.backward else "forward", "batch": b,
                           "heads": h, "len": l, "head_dim": e, "dtype": args.dtype,
                           "causal": causal}
                    if args.backward:
                        r = time_backward(shape, None, BACKENDS[name])
                        ms, err = (r, None) if isinstance(r, float) else (None, r)
                    else:
                        ms, err = time_backend(shape, BACKENDS[name], 5, 50, 1500.0)
                    if ms is None:
                        row["unavailable"] = err
                    else:
                        row["median_ms"] = ms
                        row["tflops"] = work / ms / 1e9
                    rows.append(row)
                    print(f"torch {name} B={b} H={h} L={l} E={e} causal={causal}: "
                          + (f"{ms:.3f} ms {work / ms / 1e9:.0f} TF/s" if ms else f"n/a ({err})"),
                          flush=True)
    with open(args.out, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(0), "source": "torch",
                   "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
