#!/usr/bin/env python3
"""Planted kernel bugs (issue 7): a catalogue of source patches to kernels/ and the
tools to apply them.

Each bug is one or more exact text substitutions in one kernel file; a substitution
whose text is not found exactly once is an error, so the catalogue cannot silently go
stale when the kernels change (`check` runs in CI, no GPU needed).

    planted_bugs.py check KERNELS_DIR          every bug applies to these sources
    planted_bugs.py list                       ids, one a line
    planted_bugs.py category ID                the issue's category of bug ID
    planted_bugs.py file ID                    the kernel file bug ID patches
    planted_bugs.py apply ID KERNELS_DIR OUT   OUT = a copy of KERNELS_DIR with bug ID
    planted_bugs.py table RESULTS_TSV          the markdown table of a run

The kernels read their sources from $SDPA_KERNEL_DIR at run time when it is set
(sdpa_cuda::kernels), so a patched copy needs no rebuild: ci/planted-bugs.sh applies
each bug, runs the GPU test bundle against it and records which tests caught it.
"""
import os
import shutil
import sys

# (id, category from the issue, kernel file (relative to kernels/), [(old, new), ...], what
# the patch does). A bug meant for one kernel patches that kernel's call of a shared
# piece (kernels/common/), not the piece, so the other kernels stay correct.
BUGS = [
    (
        "causal-off-by-one",
        "off-by-one in the causal bound",
        "common/mask.cuh",
        [("if (causal == 1) return min(i + 1, len_kv);", "if (causal == 1) return min(i, len_kv);")],
        "top-left causal lets query i see keys j < i instead of j <= i (every fused kernel)",
    ),
    (
        "causal-mask-compare-wgmma",
        "off-by-one in the causal bound",
        "fwd/attn_fwd_wgmma.cu",
        [("if (!key_seen(p, row0 + ((i >> 1) & 1) * 8, j, seq.len_q, seq.len_k)) sm[i]", "if (j > row_keys(p, row0 + ((i >> 1) & 1) * 8, seq.len_q, seq.len_k).hi) sm[i]")],
        "the Hopper kernel's bound check keeps key j == limit (one key too many on every bounded row)",
    ),
    (
        "scale-twice-wgmma",
        "scale applied twice",
        "fwd/attn_fwd_wgmma.cu",
        [
            ("const float c = pos_scale ? p.scale_log2 : 1.f;", "const float c = pos_scale ? p.scale_log2 * (float)p.scale : 1.f;"),
            ("sm[i] *= p.scale_log2;", "sm[i] *= p.scale_log2 * (float)p.scale;"),
        ],
        "the Hopper kernel multiplies the scores by the scale a second time (folded and unfolded paths)",
    ),
    (
        "scale-twice-tc",
        "scale applied twice",
        "fwd/attn_fwd_tc.cu",
        [("float x = s[mi][nt][e] * p.scale_log2;", "float x = s[mi][nt][e] * p.scale_log2 * (float)p.scale;")],
        "the mma.sync kernel (masks, dropout, sm_80) multiplies the scores by the scale twice",
    ),
    (
        "softmax-no-max-wgmma",
        "softmax without max subtraction",
        "fwd/attn_fwd_wgmma.cu",
        [
            (
                "base[r] = exp_base(new_max);\n"
                "                alpha[m][r] = fast_exp2(row_max[m][r] - base[r]);\n"
                "                row_max[m][r] = new_max;",
                "base[r] = 0.f;\n                alpha[m][r] = 1.f;\n                row_max[m][r] = 0.f;",
            )
        ],
        "exp2(score) straight, no running max (consistent algebra: wrong only when exp overflows or underflows)",
    ),
    (
        "softmax-no-max-tc",
        "softmax without max subtraction",
        "fwd/attn_fwd_tc.cu",
        [
            (
                "const float base = exp_base(new_max);\n"
                "                const float alpha = fast_exp2(row_max[mi][r] - base);\n"
                "                row_max[mi][r] = new_max;",
                "const float base = 0.f;\n                const float alpha = 1.f;\n"
                "                row_max[mi][r] = 0.f;",
            )
        ],
        "the same in the mma.sync kernel",
    ),
    (
        "dropout-no-rescale-tc",
        "dropout without 1/(1-p)",
        "fwd/attn_fwd_tc.cu",
        [("const float inv = out_scale(sum, p.keep_scale);", "const float inv = out_scale(sum, 1.0);")],
        "kept weights are not scaled by 1/(1-p) (tensor-core dropout path)",
    ),
    (
        "dropout-no-rescale-simt",
        "dropout without 1/(1-p)",
        "fwd/attn_fwd_simt.cu",
        [("const float inv = out_scale(sum, p.keep_scale);", "const float inv = out_scale(sum, 1.0);")],
        "the same in the f32 kernel",
    ),
    (
        "gqa-head-map-wgmma",
        "wrong GQA head map",
        "fwd/attn_fwd_wgmma.cu",
        [("const int hk = h / p.group;", "const int hk = h % p.heads_kv;")],
        "query head h reads kv head h mod Hkv (interleaved) instead of h / group (blocked)",
    ),
    (
        "gqa-head-map-tc",
        "wrong GQA head map",
        "fwd/attn_fwd_tc.cu",
        [("const int hk = h / p.group;", "const int hk = h % p.heads_kv;")],
        "the same in the mma.sync kernel",
    ),
    (
        "mask-wrong-axis-tc",
        "mask broadcast on the wrong axis",
        "fwd/attn_fwd_tc.cu",
        [("x = masked_log2(p, b, h, rr, j, x);", "x = masked_log2(p, h, b, rr, j, x);")],
        "batch and head strides of the mask swapped: a per-head mask broadcast over heads, a per-batch one read by head",
    ),
    (
        "mask-wrong-axis-simt",
        "mask broadcast on the wrong axis",
        "fwd/attn_fwd_simt.cu",
        [("x = masked_log2(p, b, h, i, j, x);", "x = masked_log2(p, h, b, i, j, x);")],
        "the same in the f32 kernel",
    ),
    (
        "tail-tile-unwritten-wgmma",
        "a tail tile left unwritten",
        "fwd/attn_fwd_wgmma.cu",
        [("if (m0 >= seq.len_q) return;", "if (m0 + BM > seq.len_q) return;")],
        "the last, partial block of query rows returns without writing its output",
    ),
    (
        "tail-tile-unwritten-tc",
        "a tail tile left unwritten",
        "fwd/attn_fwd_tc.cu",
        [("if (m0 >= seq.len_q) return;", "if (m0 + BM > seq.len_q) return;")],
        "the same in the mma.sync kernel",
    ),
    (
        "missing-barrier-wgmma",
        "a missing barrier",
        "common/wgmma_tile.cuh",
        [("    asm volatile(\"fence.proxy.async.shared::cta;\" ::: \"memory\");\n    __syncthreads();",
          "    asm volatile(\"fence.proxy.async.shared::cta;\" ::: \"memory\");")],
        "no CTA barrier between the K/V tile loads and the wgmma's that read them (nor before the buffers are refilled)",
    ),
    (
        "missing-barrier-tc",
        "a missing barrier",
        "fwd/attn_fwd_tc.cu",
        [("        cp_async_wait<1>();\n        __syncthreads();\n        if (t + 1 < n_tiles)\n            load_tile<BN>(s_v",
          "        cp_async_wait<1>();\n        if (t + 1 < n_tiles)\n            load_tile<BN>(s_v")],
        "no barrier before the V tile is read and the next one loaded over the other buffer",
    ),
    (
        "no-rescale-wgmma",
        "(extra) online softmax: accumulator not rescaled",
        "fwd/attn_fwd_wgmma.cu",
        [("for (int i = 0; i < D / 2; ++i) o[m][i] *= alpha[m][(i >> 1) & 1];", "")],
        "O is not multiplied by exp2(old max - new max) when a later key tile raises the row max",
    ),
    (
        "unswizzled-store-wgmma",
        "(extra) shared-memory layout disagrees with the wgmma descriptor",
        "common/wgmma_tile.cuh",
        [("((cc ^ ((r * RB >> 7) & SW_MASK)) << 4)", "(cc << 4)")],
        "tiles stored without the XOR swizzle the descriptors declare",
    ),
    (
        "lse-without-max-wgmma",
        "(extra) log-sum-exp off by the row max",
        "fwd/attn_fwd_wgmma.cu",
        [("row_lse(sum, row_max[m][r])", "row_lse(sum, 0.f)")],
        "the log-sum-exp output drops the running max (the output itself stays right)",
    ),
]


# The backward's bugs (issue 15): patches to kernels/bwd/. planted-bugs.sh runs the
# backward GPU tests (sdpa-cuda-gpu_backward) for a bug in bwd/ (the efficient tests for
# the fused kernels, the math ones for math_bwd.cu) instead of the forward tests.
BUGS += [
    (
        "bwd-d-left-out",
        "backward: D left out",
        "bwd/attn_bwd_simt.cu",
        [
            ("ds = prob * inv_z * (grad_p - d_row);", "ds = prob * inv_z * grad_p;"),
            ("ds = prob * (grad_p - s_d[lane]) * factor;", "ds = prob * grad_p * factor;"),
        ],
        "dS = P dP instead of P (dP - D) in both fused kernels",
    ),
    (
        "bwd-dropout-scale-missing",
        "backward: dropout scale missing",
        "bwd/attn_bwd_simt.cu",
        [("? (float)p.keep_scale\n                   : 0.f;\n    }\n    // Multiplied", "? 1.f\n                   : 0.f;\n    }\n    // Multiplied")],
        "the replayed keep bits without the 1 / (1 - p) factor",
    ),
    (
        "bwd-gqa-first-head-only",
        "backward: wrong GQA reduction",
        "bwd/attn_bwd_simt.cu",
        [("for (int g = 0; g < p.group; ++g) {", "for (int g = 0; g < 1; ++g) {")],
        "dk and dv take only the first query head of each group",
    ),
    (
        "bwd-causal-off-by-one",
        "backward: causal off by one (backward only)",
        "bwd/attn_bwd_simt.cu",
        [("i < seq.len_q && key_seen(p, i, j, seq.len_q, seq.len_k)) {", "i < seq.len_q && j <= row_keys(p, i, seq.len_q, seq.len_k).hi) {")],
        "the dk/dv kernel lets row i reach key j == its causal limit (the forward does not)",
    ),
    (
        "bwd-dmask-race",
        "backward: a race without atomics",
        "bwd/attn_bwd_simt.cu",
        [("atomicAdd((float*)p.dmask + dmask_at(p, b, h, i, j), ds);", "((float*)p.dmask)[dmask_at(p, b, h, i, j)] += ds;")],
        "dmask's broadcast sums by plain read-modify-write from many warps",
    ),
    (
        "bwd-dmask-not-summed",
        "backward: dmask not summed over broadcast axes",
        "bwd/attn_bwd_simt.cu",
        [("if (p.mask_kind == MASK_ADDITIVE && p.dmask != 0)\n", "if (p.mask_kind == MASK_ADDITIVE && p.dmask != 0 && b == 0 && h == 0)\n")],
        "only batch 0, head 0 add into dmask (a broadcast mask misses the others' sums)",
    ),
    (
        "bwd-missing-barrier",
        "a missing barrier",
        "bwd/attn_bwd_simt.cu",
        [(">= first + WARPS) continue;  // block-uniform\n            __syncthreads();  // the previous tile is no longer read\n", ">= first + WARPS) continue;  // block-uniform\n")],
        "the dk/dv kernel loads the next query tile while warps still read the last one",
    ),
    (
        "bwd-gqa-one-chain",
        "backward: wrong GQA reduction",
        "bwd/attn_bwd_simt.cu",
        [
            ("if (d < p.head_dim_v) tdv[c] = fmaf(wi, s_do[ii][d], tdv[c]);", "if (d < p.head_dim_v) dv[c] = fmaf(wi, s_do[ii][d], dv[c]);"),
            ("if (d < p.head_dim) tdk[c] = fmaf(si, s_q[ii][d], tdk[c]);", "if (d < p.head_dim) dk[c] = fmaf(si, s_q[ii][d], dk[c]);"),
        ],
        "dk and dv summed in one f32 chain over the group's G x L rows (right in exact arithmetic, 1.3-3x PyTorch's f32 error at G = 4, L = 192)",
    ),
    (
        "bwd-dk-scale-missing",
        "backward: scale missing",
        "bwd/attn_bwd_simt.cu",
        [("dk_row[d] = to_elem(dk[c] * scale);", "dk_row[d] = to_elem(dk[c]);")],
        "dk without the softmax scale",
    ),
    (
        "bwd-lse-units",
        "backward: lse in the wrong units",
        "bwd/attn_bwd_simt.cu",
        [("prob = lse == SDPA_NEG_INF ? 0.f : expf(x - lse);", "prob = lse == SDPA_NEG_INF ? 0.f : exp2f(x - lse);")],
        "exp2 of natural-log scores and lse (the forward's log2 units mixed in)",
    ),
    (
        "bwd-bool-mask-ignored",
        "backward: mask ignored",
        "bwd/attn_bwd_simt.cu",
        [("if (((const unsigned char*)p.mask)[mask_offset(p, b, h, i, j)] == 0) {", "if (false) {")],
        "the fused backward reads keys a bool mask hides",
    ),
    (
        "bwd-tile-tail-dropped",
        "backward: off by one at a tile's end",
        "bwd/attn_bwd_simt.cu",
        [("const int count = min(TILE, limit - j0);", "const int count = min(TILE, limit - j0) - 1;")],
        "dq leaves out the last key of every key tile",
    ),
    (
        "math-bwd-d-left-out",
        "backward: D left out",
        "bwd/math_bwd.cu",
        [("const acc_t grad_s = prob * (w[j] * keep - d);", "const acc_t grad_s = prob * w[j] * keep;")],
        "the math backward's dS = P dP",
    ),
    (
        "math-bwd-dropout-misaligned",
        "backward: dropout stream misaligned",
        "bwd/math_bwd.cu",
        [
            ("const acc_t grad_p = w[j] * keep_factor(p, row * p.len_kv + j);", "const acc_t grad_p = w[j] * keep_factor(p, row * p.len_kv + j + 1);"),
            ("const acc_t keep = keep_factor(p, row * p.len_kv + j);", "const acc_t keep = keep_factor(p, row * p.len_kv + j + 1);"),
        ],
        "the math backward replays the keep bits one index off",
    ),
]



# The tensor-core backward (kernels/bwd/attn_bwd_tc.cu): the flash tests of
# sdpa-cuda-gpu_backward on the GPU, ci/emu-planted.sh on the CPU.
BUGS += [
    (
        "bwd-tc-d-left-out",
        "backward: D left out",
        "bwd/attn_bwd_tc.cu",
        [("float ds = seen ? prob * (grad_p - d_row) : 0.f;", "float ds = seen ? prob * grad_p : 0.f;")],
        "the tensor-core kernel's dS = P dP instead of P (dP - D)",
    ),
    (
        "bwd-tc-dropout-scale-missing",
        "backward: dropout scale missing",
        "bwd/attn_bwd_tc.cu",
        [("& 1ull) ? (float)p.keep_scale : 0.f;", "& 1ull) ? 1.f : 0.f;")],
        "the tensor-core kernel's replayed keep bits without 1 / (1 - p)",
    ),
    (
        "bwd-tc-causal-off-by-one",
        "backward: causal off by one (backward only)",
        "bwd/attn_bwd_tc.cu",
        [("bool seen = !edge || (i < seq.len_q && key_seen(p, i, j, seq.len_q, seq.len_k));", "bool seen = !edge || (i < seq.len_q && j <= row_keys(p, i, seq.len_q, seq.len_k).hi);")],
        "the tensor-core kernel lets row i reach key j == its causal limit",
    ),
    (
        "bwd-tc-gqa-first-head-only",
        "backward: wrong GQA reduction",
        "bwd/attn_bwd_tc.cu",
        [("const int iters = per_head * p.group;", "const int iters = per_head;")],
        "the tensor-core kernel's dk and dv take only the first query head of each group",
    ),
    (
        "bwd-tc-dq-race",
        "backward: a race without atomics",
        "bwd/attn_bwd_tc.cu",
        [("red_add4(dq_acc + i * p.dq_stride_l + d,", "red_add4_plain(dq_acc + i * p.dq_stride_l + d,")],
        "dq's block sums added by plain read-modify-write from every key block at once",
    ),
    (
        "bwd-shared-word-swap",
        "backward: wrong dropout draw",
        "common/bwd.cuh",
        [("pick_word(w, (u32)(c - r) & 3u)", "pick_word(w, (u32)(c + r) & 3u)")],
        "the four lanes of a key quad trade the wrong words of their Philox blocks (both tensor-core backwards)",
    ),
]

# The Hopper backward (kernels/bwd/attn_bwd_wgmma.cu): every test of
# sdpa-cuda-gpu_backward on an sm_90 device (flash's cases and efficient's masked ones).
BUGS += [
    (
        "bwd-wg-d-left-out",
        "backward: D left out",
        "bwd/attn_bwd_wgmma.cu",
        [("const float ds = st[idx] * (grad_p - d_row);", "const float ds = st[idx] * grad_p;")],
        "the Hopper kernel's dS = P dP instead of P (dP - D)",
    ),
    (
        "bwd-wg-causal-off-by-one",
        "backward: causal off by one (backward only)",
        "bwd/attn_bwd_wgmma.cu",
        [("(i < seq.len_q && key_seen(p, i, j, seq.len_q, seq.len_k));", "(i < seq.len_q && j <= row_keys(p, i, seq.len_q, seq.len_k).hi);")],
        "the Hopper kernel lets row i reach key j == its causal limit",
    ),
    (
        "bwd-wg-gqa-first-head-only",
        "backward: wrong GQA reduction",
        "bwd/attn_bwd_wgmma.cu",
        [("const int iters = per_head * p.group;", "const int iters = per_head;")],
        "the Hopper kernel's dk and dv take only the first query head of each group",
    ),
    (
        "bwd-wg-dq-race",
        "backward: a race without atomics",
        "bwd/attn_bwd_wgmma.cu",
        [("red_add4(dq_acc + i * p.dq_stride_l + d,", "red_add4_plain(dq_acc + i * p.dq_stride_l + d,")],
        "dq's block sums added by plain read-modify-write from every key block at once",
    ),
    (
        "bwd-wg-ds-unswizzled",
        "backward: wrong shared-memory layout",
        "bwd/attn_bwd_wgmma.cu",
        [("r * 8 * RB + (((cg & 7) ^ g) << 4);", "r * 8 * RB + ((cg & 7) << 4);")],
        "dS^T stored without the swizzle the dQ product's descriptor reads it through",
    ),
    (
        "bwd-wg-dropout-scale-missing",
        "backward: dropout scale missing",
        "bwd/attn_bwd_wgmma.cu",
        [("keep = ((keep_bits >> idx) & 1ull) ? (float)p.keep_scale : 0.f;", "keep = ((keep_bits >> idx) & 1ull) ? 1.f : 0.f;")],
        "the Hopper kernel's replayed keep bits without 1 / (1 - p)",
    ),
    (
        "bwd-wg-mask-ignored",
        "backward: mask ignored",
        "bwd/attn_bwd_wgmma.cu",
        [("x = key_mask ? x + key_bias[e >> 1] : masked_log2(p, b, h, i, j, x);", "(void)key_bias;")],
        "the Hopper kernel's P recomputed without the mask (bool or additive)",
    ),
    (
        "bwd-wg-dmask-unkept",
        "backward: dmask not summed over broadcast axes",
        "bwd/attn_bwd_wgmma.cu",
        [("atomicAdd((float*)p.dmask + dmask_at(p, b, h, i, j), ds);", "*((float*)p.dmask + dmask_at(p, b, h, i, j)) = ds;")],
        "the Hopper kernel's dmask stores each score's dS over the others broadcast onto it",
    ),
    (
        "bwd-wg-key-dmask-half-quad",
        "backward: dmask not summed over broadcast axes",
        "bwd/attn_bwd_wgmma.cu",
        [("sum += __shfl_xor_sync(0xffffffffu, sum, 2);", "")],
        "a key-padding dmask summed over two of the four lanes that hold a key's rows",
    ),
]

# The decode kernels (issue 17): caught by ci/emu.sh's decode cases on the CPU and by
# sdpa-cuda-gpu_decode on the GPU.
BUGS += [
    (
        "decode-split-merge",
        "decode: wrong split merge",
        "decode/attn_decode.cu",
        [("const float w = expf(lse[s * total_rows + row] - base);", "const float w = 1.f;")],
        "the combine averages the splits' outputs instead of weighting them by exp(lse)",
    ),
    (
        "decode-window-off-by-one",
        "decode: off-by-one window",
        "decode/keys.cuh",
        [("max(0, i + off - wl); }", "max(0, i + off - wl + 1); }")],
        "a row sees window_left - 1 keys before its diagonal instead of window_left",
    ),
    (
        "decode-stale-block-index",
        "decode: stale block index",
        "decode/keys.cuh",
        [("p.table_stride + j / p.block_size], j % p.block_size};", "p.table_stride + (j & ~63) / p.block_size], j % p.block_size};")],
        "one block-table lookup a 64-key tile (the tile's first key's block) for every key of it",
    ),
    (
        "decode-tc-warp-merge",
        "decode: warps' partials merged unweighted",
        "decode/attn_decode_tc.cu",
        [("const float wt = fast_exp2(red_m[w * 16 + r] - wbase);", "const float wt = 1.f;")],
        "the tensor-core kernel adds its warps' partial sums without rescaling them to one row maximum",
    ),
]

# Window, softcap and ALiBi in the attention kernels (issue 17, item 2): the emulator's
# window and softcap cases (ci/emu.sh) and the GPU tests' catch them.
BUGS += [
    (
        "window-left-off-by-one",
        "off-by-one window",
        "common/mask.cuh",
        [("lo = (int)max((i64)0, min((i64)len_k, diag - p.window_left));", "lo = (int)max((i64)0, min((i64)len_k, diag - p.window_left + 1));")],
        "every attention kernel's window starts one key late (row i misses key i + S - L - window_left)",
    ),
    (
        "window-tiles-from-zero-tc",
        "off-by-one window",
        "fwd/attn_fwd_tc.cu",
        [("if (!tile_inside(unmasked, n0, BN)) {", "if (n0 + BN > unmasked.hi) {")],
        "the mma.sync forward checks only the right end of a tile: keys before the window's start leak into edge tiles",
    ),
    (
        "softcap-grad-factor-missing-tc",
        "backward: softcap derivative missing",
        "bwd/attn_bwd_tc.cu",
        [("ds *= ScoreMods<float, true>::grad_factor(t);", "ds *= 1.f;")],
        "the mma.sync backward passes dS to dq and dk without the softcap's 1 - tanh^2",
    ),
    (
        "softcap-grad-factor-missing-simt",
        "backward: softcap derivative missing",
        "bwd/attn_bwd_simt.cu",
        [("ds = prob * (grad_p - s_d[lane]) * factor;", "ds = prob * (grad_p - s_d[lane]);")],
        "the scalar dk/dv kernel leaves out the softcap's 1 - tanh^2 (dq keeps it)",
    ),
    (
        "alibi-sign-tc",
        "ALiBi with the wrong sign",
        "common/mask.cuh",
        [("x -= slope * (T)(dist < 0 ? -dist : dist);", "x += slope * (T)(dist < 0 ? -dist : dist);")],
        "every kernel adds the ALiBi distance penalty instead of subtracting it",
    ),
]

def apply_to(text, subs, bug_id, name):
    for old, new in subs:
        n = text.count(old)
        if n != 1:
            raise SystemExit(f"planted bug {bug_id}: {name} has {n} matches of {old!r}, expected 1")
        text = text.replace(old, new)
    return text


def check(kernels):
    for bug_id, _, name, subs, _ in BUGS:
        text = open(os.path.join(kernels, name)).read()
        patched = apply_to(text, subs, bug_id, name)
        assert patched != text, bug_id
    ids = [b[0] for b in BUGS]
    assert len(ids) == len(set(ids)), "duplicate bug ids"
    print(f"{len(BUGS)} planted bugs apply cleanly to {kernels}")


def apply(bug_id, kernels, out):
    bug = next((b for b in BUGS if b[0] == bug_id), None)
    if bug is None:
        raise SystemExit(f"no planted bug {bug_id!r}")
    _, _, name, subs, _ = bug
    if os.path.exists(out):
        shutil.rmtree(out)
    shutil.copytree(kernels, out)
    path = os.path.join(out, name)
    text = open(path).read()
    open(path, "w").write(apply_to(text, subs, bug_id, name))


def table(results):
    rows = {}
    for line in open(results):
        parts = line.rstrip("\n").split("\t")
        if len(parts) >= 4:
            rows[parts[0]] = parts[1:]
    if "none" in rows:
        verdict, by, secs = rows["none"][:3]
        print(f"Unpatched kernels: {verdict} ({by}, {secs}).\n")
    print("| bug | category | kernel | caught | by | time |")
    print("|---|---|---|---|---|---|")
    for bug_id, category, name, _, what in BUGS:
        verdict, by, secs = (rows.get(bug_id) or ["not run", "", ""])[:3]
        print(f"| `{bug_id}`: {what} | {category} | `{name}` | {verdict} | {by} | {secs} |")


def main(argv):
    if len(argv) >= 2 and argv[1] == "list":
        print("\n".join(b[0] for b in BUGS))
    elif len(argv) == 3 and argv[1] == "category":
        print(next(b[1] for b in BUGS if b[0] == argv[2]))
    elif len(argv) == 3 and argv[1] == "file":
        print(next(b[2] for b in BUGS if b[0] == argv[2]))
    elif len(argv) == 3 and argv[1] == "check":
        check(argv[2])
    elif len(argv) == 5 and argv[1] == "apply":
        apply(argv[2], argv[3], argv[4])
    elif len(argv) == 3 and argv[1] == "table":
        table(argv[2])
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main(sys.argv)
