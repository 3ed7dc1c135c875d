#!/usr/bin/env python3
"""Nested goldens: libtorch's nested tensors (torch.nested, jagged layout) through SDPA
and through the tutorial's CausalSelfAttention, written as case files for
crates/sdpa-nested/tests/golden_nested.rs and crates/sdpa-nn/tests/golden_module.rs.

    python3 ci/golden_nested.py [--device cpu|cuda] [--out DIR]

Needs torch 2.11 (the full wheel: `import torch` loads the CUDA libraries even for the
CPU). Default: --device cpu --out golden/nested (committed). On a GPU machine,
`--device cuda --out golden/nested/cuda` adds the cases the CPU cannot run (torch 2.11's
jagged SDPA with is_causal=True fails on the CPU: it reaches for CUDA) with libtorch's
CUDA result as the peer; ci/gpu_goldens.sh does that. On the CPU, torch 2.11's jagged
SDPA takes only its math path, which rejects is_causal and non-contiguous q/k/v: the
CPU module cases copy q, k, v out of the c_attn output (same values) and none is causal
in effect (eval, or train with is_causal off); causal nested cases come from CUDA.

A case file (safetensors, bytes depend only on the contents: header keys sorted,
tensors widest dtype first then by name, as sdpa_harness::case::serialize lays them out):
  SDPA cases:   q [total_q, Hq, E], k [total_kv, Hkv, E], v [total_kv, Hkv, Ev] (case
                dtype), cu_seqlens_q, cu_seqlens_kv (I32, length B+1: the NJTs' offsets),
                out [total_q, Hq, Ev] (libtorch's jagged SDPA, case dtype), out_f64
                (truth: per-sequence f64 _scaled_dot_product_attention_math);
                metadata name, is_causal, causal, dropout_p, seed, offset, scale,
                enable_gqa, torch_backend, device.
  module cases (name module_*): x [total, E], cu_seqlens (I32), c_attn.weight,
                c_attn.bias, c_proj.weight, c_proj.bias, out [total, E] (libtorch's module
                on the jagged NJT, case dtype), out_f64 (truth: each sequence alone through
                the dense module in f64, attention through the math path); metadata name,
                heads, dropout (0), is_causal, mode (train / eval), torch_backend, device.
Plus manifest.json listing every file.

Inputs come from torch.Generator(seed) on the CPU in f64 (rounded to the case dtype),
lengths from random.Random(seed): fixed per case name. One thread.
"""
import argparse
import json
import os
import random
import struct
import sys
import zlib

import torch
import torch.nn.functional as F

SEED = 0x5D9A_2011_0024_0005
DTYPES = {"f64": torch.float64, "f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
ST_DTYPE = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16",
            torch.bfloat16: "BF16", torch.int32: "I32", torch.int64: "I64", torch.bool: "BOOL"}


def case_seed(name):
    return (SEED ^ zlib.crc32(name.encode())) & 0x7FFF_FFFF_FFFF_FFFF


def serialize(tensors, metadata):
    """safetensors bytes with a canonical header (see the module docstring)."""
    items = sorted(tensors.items(), key=lambda kv: (-kv[1].element_size(), kv[0]))
    header = ['"__metadata__":{%s}' % ",".join(
        "%s:%s" % (json.dumps(k), json.dumps(v)) for k, v in sorted(metadata.items()))]
    data = bytearray()
    for name, t in items:
        t = t.detach().to("cpu").contiguous()
        raw = t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
        start = len(data)
        data += raw
        header.append('%s:{"dtype":"%s","shape":[%s],"data_offsets":[%d,%d]}' % (
            json.dumps(name), ST_DTYPE[t.dtype], ",".join(str(d) for d in t.shape),
            start, len(data)))
    head = ("{" + ",".join(header) + "}").encode()
    head += b" " * (-len(head) % 8)
    return struct.pack("<Q", len(head)) + head + bytes(data)


def draw(gen, shape, dtype, scale=1.0):
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype)


def njt(values, offsets):
    """[total, H, E] packed values + offsets -> NJT [B, H, j, E]."""
    return torch.nested.nested_tensor_from_jagged(values, offsets).transpose(1, 2)


def packed(nt):
    """NJT [B, H, j, E] -> packed values [total, H, E]."""
    return nt.transpose(1, 2).values()


def offsets_of(lengths):
    return torch.tensor([0] + list(torch.tensor(lengths).cumsum(0).tolist()), dtype=torch.int64)


def sdpa_case(name, dtype, lens_q, lens_kv, hq, hkv, e, ev, causal=False, scale=None):
    return dict(kind="sdpa", name=name, dtype=dtype, lens_q=lens_q, lens_kv=lens_kv,
                hq=hq, hkv=hkv, e=e, ev=ev, causal=causal, scale=scale)


def module_case(name, dtype, lens, e, heads, is_causal, training):
    return dict(kind="module", name=name, dtype=dtype, lens=lens, e=e, heads=heads,
                is_causal=is_causal, training=training)


def cases(device):
    rng = random.Random(SEED)
    long_short = [64] + [rng.randint(1, 4) for _ in range(5)]
    out = []
    if device == "cpu":
        for dt in ["f32", "f16", "bf16", "f64"]:
            out.append(sdpa_case(f"nested_self_b4_{dt}", dt, [1, 17, 5, 33], None, 2, 2, 16, 16))
        for dt in ["f32", "bf16"]:
            out.append(sdpa_case(f"nested_cross_b3_{dt}", dt, [3, 9, 1], [12, 1, 7], 2, 2, 16, 16))
        out.append(sdpa_case("nested_empty_seq_f32", "f32", [4, 0, 6], None, 2, 2, 8, 8))
        out.append(sdpa_case("nested_empty_kv_f32", "f32", [3, 2, 5], [4, 0, 3], 1, 1, 8, 8))
        out.append(sdpa_case("nested_long_short_f16", "f16", long_short, None, 2, 2, 32, 32))
        out.append(sdpa_case("nested_scale0p3_ev24_f16", "f16", [7, 2, 11], [5, 13, 3], 2, 2, 16, 24,
                             scale=0.3))
        out.append(sdpa_case("nested_hd64_bf16", "bf16", [20, 3, 41], None, 1, 1, 64, 64))
        for dt in ["f32", "f16", "bf16"]:
            for training in [False, True]:
                mode = "train" if training else "eval"
                for is_causal in ([False, True] if not training else [False]):
                    c = "causal" if is_causal else "noncausal"
                    out.append(module_case(f"module_nested_{mode}_{c}_b3_e32_h4_{dt}", dt,
                                           [5, 13, 1], 32, 4, is_causal, training))
    else:
        # What the CPU cannot run: causal jagged SDPA (per sequence, top-left; L_b = S_b).
        for dt in ["f16", "bf16", "f32"]:
            out.append(sdpa_case(f"nested_cuda_causal_self_b4_{dt}", dt, [1, 17, 5, 33], None,
                                 2, 2, 16, 16, causal=True))
            out.append(sdpa_case(f"nested_cuda_self_b4_{dt}", dt, [1, 17, 5, 33], None,
                                 2, 2, 16, 16))
        out.append(sdpa_case("nested_cuda_causal_long_short_f16", "f16", long_short, None,
                             2, 2, 64, 64, causal=True))
        out.append(sdpa_case("nested_cuda_cross_b3_bf16", "bf16", [3, 9, 1], [12, 1, 7],
                             2, 2, 16, 16))
        for dt in ["f16", "bf16"]:
            out.append(module_case(f"module_nested_cuda_train_causal_b3_e64_h2_{dt}", dt,
                                   [5, 13, 1], 64, 2, True, True))
    return out


def run_sdpa(c, device):
    dtype = DTYPES[c["dtype"]]
    gen = torch.Generator().manual_seed(case_seed(c["name"]))
    lens_q = c["lens_q"]
    lens_kv = c["lens_kv"] if c["lens_kv"] is not None else lens_q
    off_q, off_kv = offsets_of(lens_q), offsets_of(lens_kv)
    q = draw(gen, (sum(lens_q), c["hq"], c["e"]), dtype)
    if c["lens_kv"] is None and c["hq"] == c["hkv"] and c["e"] == c["ev"]:
        k, v = draw(gen, q.shape, dtype), draw(gen, q.shape, dtype)
    else:
        k = draw(gen, (sum(lens_kv), c["hkv"], c["e"]), dtype)
        v = draw(gen, (sum(lens_kv), c["hkv"], c["ev"]), dtype)
    dev = torch.device(device)
    oq, okv = off_q.to(dev), off_kv.to(dev)
    out = F.scaled_dot_product_attention(
        njt(q.to(dev), oq), njt(k.to(dev), okv), njt(v.to(dev), okv),
        is_causal=c["causal"], scale=c["scale"])
    out = packed(out).to("cpu")
    truth = []
    for b in range(len(lens_q)):
        qs = q[off_q[b]:off_q[b + 1]].double().transpose(0, 1).unsqueeze(0)
        ks = k[off_kv[b]:off_kv[b + 1]].double().transpose(0, 1).unsqueeze(0)
        vs = v[off_kv[b]:off_kv[b + 1]].double().transpose(0, 1).unsqueeze(0)
        o, _ = torch.ops.aten._scaled_dot_product_attention_math(
            qs, ks, vs, None, 0.0, c["causal"], None, scale=c["scale"])
        truth.append(o.squeeze(0).transpose(0, 1))
    out_f64 = torch.cat(truth, 0)
    if out.shape != out_f64.shape:
        raise SystemExit(f"{c['name']}: libtorch out {tuple(out.shape)} vs truth {tuple(out_f64.shape)}")
    tensors = {"q": q, "k": k, "v": v, "cu_seqlens_q": off_q.to(torch.int32),
               "cu_seqlens_kv": off_kv.to(torch.int32), "out": out, "out_f64": out_f64}
    meta = {"name": c["name"], "is_causal": str(c["causal"]).lower(),
            "causal": "top_left" if c["causal"] else "none", "dropout_p": "0", "seed": "0",
            "offset": "0", "enable_gqa": "false", "torch_backend": f"njt_{device}",
            "device": device}
    if c["scale"] is not None:
        meta["scale"] = repr(float(c["scale"]))
    entry = {"name": c["name"], "kind": "sdpa", "dtype": c["dtype"], "lens_q": lens_q,
             "lens_kv": lens_kv, "hq": c["hq"], "hkv": c["hkv"], "e": c["e"], "ev": c["ev"],
             "causal": meta["causal"], "scale": c["scale"]}
    return tensors, meta, entry


def module_forward(x, w, heads, causal, attention, contiguous=False):
    """The tutorial's CausalSelfAttention.forward on x [B, T, E] (dense or NJT).
    `contiguous`: copy q, k, v out of the packed projection first, which torch 2.11's
    CPU jagged SDPA (math only) requires; the values are the same."""
    e = x.size(-1)
    qkv = F.linear(x, w["c_attn.weight"], w["c_attn.bias"])
    q, k, v = qkv.split(e, dim=-1)
    if contiguous:
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    q, k, v = (t.unflatten(-1, [heads, e // heads]).transpose(1, 2) for t in (q, k, v))
    y = attention(q, k, v, causal)
    y = y.transpose(1, 2).flatten(-2)
    return F.linear(y, w["c_proj.weight"], w["c_proj.bias"])


def run_module(c, device):
    dtype = DTYPES[c["dtype"]]
    gen = torch.Generator().manual_seed(case_seed(c["name"]))
    e, lens = c["e"], c["lens"]
    off = offsets_of(lens)
    x = draw(gen, (sum(lens), e), dtype)
    w = {"c_attn.weight": draw(gen, (3 * e, e), dtype, e ** -0.5),
         "c_attn.bias": draw(gen, (3 * e,), dtype, 0.1),
         "c_proj.weight": draw(gen, (e, e), dtype, e ** -0.5),
         "c_proj.bias": draw(gen, (e,), dtype, 0.1)}
    causal = c["training"] and c["is_causal"]
    dev = torch.device(device)
    wd = {k: t.to(dev) for k, t in w.items()}
    fused = lambda q, k, v, causal: F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    xn = torch.nested.nested_tensor_from_jagged(x.to(dev), off.to(dev))
    out = module_forward(xn, wd, c["heads"], causal, fused,
                         contiguous=device == "cpu").values().to("cpu")
    math = lambda q, k, v, causal: torch.ops.aten._scaled_dot_product_attention_math(
        q, k, v, None, 0.0, causal, None)[0]
    w64 = {k: t.double() for k, t in w.items()}
    truth = [module_forward(x[off[b]:off[b + 1]].double().unsqueeze(0), w64, c["heads"], causal,
                            math).squeeze(0) for b in range(len(lens))]
    out_f64 = torch.cat(truth, 0)
    if out.shape != out_f64.shape:
        raise SystemExit(f"{c['name']}: libtorch out {tuple(out.shape)} vs truth {tuple(out_f64.shape)}")
    tensors = dict(w, x=x, cu_seqlens=off.to(torch.int32), out=out, out_f64=out_f64)
    meta = {"name": c["name"], "heads": str(c["heads"]), "dropout": "0",
            "is_causal": str(c["is_causal"]).lower(), "mode": "train" if c["training"] else "eval",
            "torch_backend": f"njt_module_{device}", "device": device}
    entry = {"name": c["name"], "kind": "module", "dtype": c["dtype"], "lens": lens, "e": e,
             "heads": c["heads"], "is_causal": c["is_causal"], "mode": meta["mode"],
             "causal_applied": causal}
    return tensors, meta, entry


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    out_dir = args.out or ("golden/nested" if args.device == "cpu" else "golden/nested/cuda")
    torch.set_num_threads(1)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device")
    os.makedirs(out_dir, exist_ok=True)
    for f in os.listdir(out_dir):
        if f.endswith(".safetensors") or f == "manifest.json":
            os.remove(os.path.join(out_dir, f))
    entries, total = [], 0
    for c in cases(args.device):
        run = run_sdpa if c["kind"] == "sdpa" else run_module
        try:
            tensors, meta, entry = run(c, args.device)
        except Exception as e:  # noqa: BLE001 (any torch error: recorded on CUDA)
            # On CUDA a case no jagged backend takes is recorded, not fatal: the rest
            # still come back. On the CPU every case must run.
            if args.device == "cpu":
                raise
            entries.append({"name": c["name"], "rejected": str(e).splitlines()[0][:300]})
            print(f"golden_nested.py: {c['name']}: rejected: {entries[-1]['rejected']}",
                  file=sys.stderr)
            continue
        data = serialize(tensors, meta)
        fname = c["name"] + ".safetensors"
        with open(os.path.join(out_dir, fname), "wb") as fh:
            fh.write(data)
        entry.update(file=fname, bytes=len(data))
        entries.append(entry)
        total += len(data)
    manifest = {
        "libtorch": torch.__version__,
        "produced_by": f"python3 ci/golden_nested.py --device {args.device} (torch.nested jagged layout)",
        "device": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu",
        "input_seed": hex(SEED),
        "case_count": sum(1 for e in entries if "file" in e),
        "total_bytes": total,
        "cases": entries,
    }
    with open(os.path.join(out_dir, "manifest.json"), "w") as fh:
        fh.write(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    print(f"golden_nested.py: {len(entries)} cases, {total / 1e6:.2f} MB, torch {torch.__version__} "
          f"({args.device}), into {out_dir}", file=sys.stderr)


if __name__ == "__main__":
    main()
