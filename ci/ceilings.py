#!/usr/bin/env python3
"""The card's ceilings, measured in the same device call as our kernels (GPU-TESTS.md,
BENCHMARKS.md): device-to-device copy bandwidth (1 GiB, read + write counted) and the
dense bf16 / f16 GEMM rate of cuBLAS through torch (8192^3), CUDA events, median of 10."""
import statistics

import torch


def timed(fn, runs=10):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(runs):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def main():
    print(f"device: {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    n = 1 << 30
    src = torch.empty(n, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = timed(lambda: dst.copy_(src))
    print(f"copy: {2 * n / ms / 1e6:.0f} GB/s (read + write of 1 GiB, {ms:.3f} ms)")
    for dtype in (torch.bfloat16, torch.float16):
        m = 8192
        a = torch.randn(m, m, device="cuda", dtype=dtype)
        b = torch.randn(m, m, device="cuda", dtype=dtype)
        ms = timed(lambda: a @ b)
        print(f"gemm {dtype}: {2 * m**3 / ms / 1e9:.0f} TFLOP/s ({m}^3, {ms:.3f} ms)")


if __name__ == "__main__":
    main()
