#!/usr/bin/env python3
"""Before/after table of two sdpa-cuda-bench binaries run alternately in one device call
(run.sh bench-compare): for each shape and backend, the median over the runs of each
binary's median time, and after/before. Usage: bench_compare.py after1.jsonl before1.jsonl
[after2.jsonl before2.jsonl ...] (files alternate: after, before, after, before, ...)."""
import json
import statistics
import sys


def rows(path):
    out = {}
    for line in open(path):
        line = line.strip()
        if not line.startswith("{"):
            continue
        r = json.loads(line)
        s = r["shape"]
        key = (s["batch"], s["heads"], s["len"], s["head_dim"], s["dtype"], s["causal"], r["backend"])
        out[key] = r["median_ms"]
    return out


files = sys.argv[1:]
if len(files) < 2 or len(files) % 2:
    sys.exit("usage: bench_compare.py after.jsonl before.jsonl [after.jsonl before.jsonl ...]")
after = [rows(f) for f in files[0::2]]
before = [rows(f) for f in files[1::2]]
keys = sorted(set(after[0]) & set(before[0]))
print("| B | H | L | E | dtype | causal | backend | before ms | after ms | after/before |")
print("|---|---|---|---|---|---|---|---|---|---|")
worst = 0.0
for k in keys:
    a = statistics.median(r[k] for r in after if k in r)
    b = statistics.median(r[k] for r in before if k in r)
    worst = max(worst, abs(a / b - 1))
    print(f"| {k[0]} | {k[1]} | {k[2]} | {k[3]} | {k[4]} | {k[5]} | {k[6]} | {b:.3f} | {a:.3f} | {a / b:.3f} |")
print(f"largest relative difference: {worst * 100:.1f}%")
