"""Times PyTorch's CPU SDPA backends on the shapes `sdpa bench --device cpu` times, so
BENCHMARKS.md compares both measured in one run on one machine.

    python3 ci/bench_cpu_torch.py [--json]    (needs torch 2.11; any CPU)

Same protocol as `sdpa bench`: inputs uniform in [-1, 1), one warm-up call, then the
median of 10 timed calls; GFLOP/s counted as 4*B*H*L*S*E, halved for causal.
"""
import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

SHAPES = [
    (4, 8, 512, 64, torch.float32, False),
    (4, 8, 512, 64, torch.float32, True),
    (2, 32, 1024, 32, torch.float16, False),
]
BACKENDS = {"default": None, "math": SDPBackend.MATH, "flash (cpu)": SDPBackend.FLASH_ATTENTION}


def timed(fn, repeats=10):
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    torch.manual_seed(0)
    rows = []
    for b, h, l, e, dtype, causal in SHAPES:
        q, k, v = (torch.rand(b, h, l, e, dtype=torch.float32).mul(2).sub(1).to(dtype) for _ in range(3))
        flops = 4 * b * h * l * l * e / (2 if causal else 1)
        for name, backend in BACKENDS.items():
            def call():
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

            try:
                if backend is None:
                    t = timed(call)
                else:
                    with sdpa_kernel(backend):
                        t = timed(call)
                rows.append(dict(backend=name, shape=[b, h, l, e], dtype=str(dtype).replace("torch.", ""),
                                 causal=causal, median_ms=t * 1e3, gflops=flops / t / 1e9))
            except RuntimeError as err:
                rows.append(dict(backend=name, shape=[b, h, l, e], dtype=str(dtype), causal=causal,
                                 unavailable=str(err).splitlines()[0]))
    if "--json" in sys.argv:
        print(json.dumps(rows, indent=1))
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for r in rows:
        shape = "({},{},{},{}) {}{}".format(*r["shape"], r["dtype"], " causal" if r["causal"] else "")
        if "median_ms" in r:
            print(f"torch {r['backend']:<12} {shape:<28} {r['median_ms']:9.3f} ms {r['gflops']:8.1f} GFLOP/s")
        else:
            print(f"torch {r['backend']:<12} {shape:<28} unavailable: {r['unavailable']}")


if __name__ == "__main__":
    main()
