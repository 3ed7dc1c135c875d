"""Call overhead of sdpa_rs from Python against PyTorch's own SDPA, on CUDA.

For each shape: the mean time of N back-to-back calls (CUDA events around the loop,
after a warm-up), ours (backend auto) and PyTorch's F.scaled_dot_product_attention
(its default choice). At a tiny shape the kernels take a few microseconds, so the
difference is the cost of the Python wrapper, argument checks and the launch path; at
a large shape it is the kernels'. Prints a table and writes JSON to the path given.

    python overhead.py [out.json]
"""

import json
import sys

import torch
import torch.nn.functional as F

import sdpa_rs

SHAPES = [  # (B, H, L, S, E, causal)
    (1, 1, 16, 16, 64, False),
    (1, 8, 128, 128, 64, False),
    (4, 16, 1024, 1024, 128, True),
]


def time_calls(fn, n):
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(n):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / n  # us per call


def main():
    rows = []
    for b, h, l, s, e, causal in SHAPES:
        q = torch.randn(b, h, l, e, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(b, h, s, e, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(b, h, s, e, device="cuda", dtype=torch.bfloat16)
        n = 2000 if l * s <= 128 * 128 else 200
        # The native call alone, on descriptions and outputs made once: what the Rust
        # side costs (checks, dispatch, launch) without the Python wrapper's.
        out = torch.empty(b, h, l, e, device="cuda", dtype=q.dtype)
        lse = torch.empty(b, h, l, device="cuda", dtype=torch.float32)
        opts = sdpa_rs._opts(0.0, causal, None, False, None, None, 0, "auto", None, None,
                             sdpa_rs._stream_of(q))
        descs = [sdpa_rs._describe(t, n) for t, n in ((q, "query"), (k, "key"), (v, "value"))]
        o, ls = sdpa_rs._describe(out, "out"), sdpa_rs._describe(lse, "lse")
        with torch.no_grad():
            ours = time_calls(lambda: sdpa_rs.scaled_dot_product_attention(q, k, v, is_causal=causal), n)
            native = time_calls(lambda: sdpa_rs._native.forward(*descs, None, None, opts, o, ls), n)
            theirs = time_calls(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal), n)
        rows.append(dict(B=b, H=h, L=l, S=s, E=e, causal=causal, dtype="bf16",
                         ours_us=round(ours, 2), native_us=round(native, 2),
                         torch_us=round(theirs, 2), ratio=round(theirs / ours, 3)))
        print(f"B={b} H={h} L={l} S={s} E={e} causal={causal}: sdpa_rs {ours:8.2f} us "
              f"(native call alone {native:8.2f}), torch {theirs:8.2f} us per call "
              f"(torch/ours {theirs / ours:.2f})")
    if len(sys.argv) > 1:
        with open(sys.argv[1], "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                       "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
