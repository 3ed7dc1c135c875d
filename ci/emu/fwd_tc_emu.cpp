// The mma.sync forward kernel (kernels/fwd/attn_fwd_tc.cu, f16, head dim 64, mask and
// dropout compiled in) run on the CPU emulator (ci/emu/cuda_emu.h: ldmatrix, mma.sync
// and cp.async emulated lane by lane) against a plain f64 forward on the same rounded
// inputs: out within 4e-3 of its magnitude (the weights are rounded to f16 before P V),
// lse within 2e-4 (1 + |lse|). Exit status 1 on any failure; run by ci/emu.sh.
#include "cuda_emu.h"
#include "emu_ref.h"
#include "common/dtype.cuh"
#include "common/params.cuh"
#include "common/philox.cuh"

#include <cstdio>
#include <string>

extern "C" void emu_fwd_tc(const FwdParams);
extern "C" unsigned char* emu_tc_arena();
extern "C" unsigned emu_tc_block_rows();

namespace {


struct Case {
    std::string name;
    int b, hkv, group, l, s, e;
    int causal;  // CausalCode
    int mask;    // MaskCode
    int mask_shape;  // 0: [L, S]; 1: [B, 1, 1, S]
    double p;
    int vec_ok;
    Mods mods = {};  // window, softcap, ALiBi
};


bool run(const Case& c) {
    const int hq = c.hkv * c.group, ev = c.e;
    const double scale = 1.0 / std::sqrt((double)c.e);
    Rng rng{0xf00d0000ull + (u64)c.l * 131 + (u64)c.s};
    auto fill = [&](size_t n) {
        std::vector<unsigned short> v(n);
        for (auto& x : v) x = emu_f32_to_f16((float)rng.next());
        return v;
    };
    auto f = [](unsigned short x) { return (double)emu_f16_to_f32(x); };
    auto q = fill((size_t)c.b * hq * c.l * c.e), k = fill((size_t)c.b * c.hkv * c.s * c.e),
         v = fill((size_t)c.b * c.hkv * c.s * ev);
    long long ms[4] = {0, 0, 0, 0};
    size_t mask_n = 0;
    if (c.mask) {
        if (c.mask_shape == 0) ms[2] = c.s, ms[3] = 1, mask_n = (size_t)c.l * c.s;
        else ms[0] = c.s, ms[3] = 1, mask_n = (size_t)c.b * c.s;
    }
    std::vector<unsigned char> bmask(mask_n);
    std::vector<unsigned short> amask(mask_n);
    for (size_t n = 0; n < mask_n; ++n) {
        const double x = rng.next();
        bmask[n] = x > -0.5;
        amask[n] = emu_f32_to_f16(x < -0.8 ? -INFINITY : (float)x);
    }
    auto moff = [&](int bb, int h, int i, int j) { return (size_t)(bb * ms[0] + h * ms[1] + i * ms[2] + j * ms[3]); };
    const u64 seed = 0xabcdefull, offset = 40;
    const u64 threshold = (u64)std::llround(c.p * 4294967296.0);
    const double keep_scale = c.p > 0 ? 1.0 / (1.0 - c.p) : 1.0;

    std::vector<double> out_ref((size_t)c.b * hq * c.l * ev), lse_ref((size_t)c.b * hq * c.l);
    std::vector<double> sc(c.s);
    for (int bb = 0; bb < c.b; ++bb)
        for (int h = 0; h < hq; ++h)
            for (int i = 0; i < c.l; ++i) {
                const int hk = h / c.group;
                double mx = -INFINITY;
                for (int j = 0; j < c.s; ++j) {
                    bool vis = c.mods.sees(c.causal, i, j, c.l, c.s) && !(c.mask == 1 && !bmask[moff(bb, h, i, j)]);
                    double dot = 0, t;
                    for (int d = 0; d < c.e; ++d)
                        dot += f(q[(((size_t)bb * hq + h) * c.l + i) * c.e + d]) * f(k[(((size_t)bb * c.hkv + hk) * c.s + j) * c.e + d]);
                    const double x = c.mods.score(dot * scale, h, i, j, c.l, c.s, t);
                    sc[j] = vis ? x + (c.mask == 2 ? f(amask[moff(bb, h, i, j)]) : 0.0) : -INFINITY;
                    mx = std::max(mx, sc[j]);
                }
                double sum = 0;
                for (int j = 0; j < c.s; ++j) sum += mx == -INFINITY ? 0.0 : std::exp(sc[j] - mx);
                const size_t row = ((size_t)bb * hq + h) * c.l + i;
                lse_ref[row] = sum > 0 ? mx + std::log(sum) : -INFINITY;
                for (int j = 0; j < c.s; ++j) {
                    if (!(sum > 0) || sc[j] == -INFINITY) continue;
                    double w = std::exp(sc[j] - mx) / sum;
                    if (c.p > 0) {
                        const u64 n = (((u64)bb * hq + h) * (u64)c.l + (u64)i) * (u64)c.s + (u64)j;
                        w *= dropout_keep1(seed, offset, threshold, n) ? keep_scale : 0.0;
                    }
                    for (int d = 0; d < ev; ++d) out_ref[row * ev + d] += w * f(v[(((size_t)bb * c.hkv + hk) * c.s + j) * ev + d]);
                }
            }

    FwdParams p;
    std::memset(&p, 0, sizeof p);
    std::vector<unsigned short> out(out_ref.size(), 0x7e00);  // NaN-poisoned
    std::vector<float> lse(lse_ref.size(), NAN);
    p.q = (u64)q.data(), p.k = (u64)k.data(), p.v = (u64)v.data(), p.out = (u64)out.data(), p.lse = (u64)lse.data();
    p.mask = c.mask == 1 ? (u64)bmask.data() : c.mask == 2 ? (u64)amask.data() : 0;
    p.q_stride_b = (long long)hq * c.l * c.e, p.q_stride_h = (long long)c.l * c.e, p.q_stride_l = c.e, p.q_stride_e = 1;
    p.k_stride_b = (long long)c.hkv * c.s * c.e, p.k_stride_h = (long long)c.s * c.e, p.k_stride_l = c.e, p.k_stride_e = 1;
    p.v_stride_b = (long long)c.hkv * c.s * ev, p.v_stride_h = (long long)c.s * ev, p.v_stride_l = ev, p.v_stride_e = 1;
    p.out_stride_b = (long long)hq * c.l * ev, p.out_stride_h = (long long)c.l * ev, p.out_stride_l = ev;
    p.lse_stride_b = (long long)hq * c.l, p.lse_stride_h = c.l, p.lse_stride_l = 1;
    p.mask_stride_b = ms[0], p.mask_stride_h = ms[1], p.mask_stride_l = ms[2], p.mask_stride_s = ms[3];
    p.dropout_seed = seed, p.dropout_offset = offset, p.dropout_threshold = threshold;
    p.scale = scale, p.keep_scale = keep_scale;
    p.batch = c.b, p.heads_q = hq, p.heads_kv = c.hkv, p.group = c.group, p.len_q = c.l, p.len_kv = c.s;
    p.head_dim = c.e, p.head_dim_v = ev, p.scale_log2 = (float)(scale * 1.4426950408889634);
    p.causal = c.causal, p.mask_kind = c.mask, p.dropout = c.p > 0, p.varlen = 0, p.vec_ok = c.vec_ok;
    const std::vector<float> slopes = c.mods.slopes(hq);
    c.mods.set(p, slopes);

    emu_shared_base = emu_tc_arena();
    const unsigned bm = emu_tc_block_rows();
    emu_launch(emu_fwd_tc, EmuDim{(c.l + bm - 1) / bm, (unsigned)hq, (unsigned)c.b}, EmuDim{128}, p);

    const OutLseError e = out_lse_error(out, out_ref, lse, lse_ref, f);
    const double mag = e.mag, err = e.err, lse_err = e.lse_err;
    const bool ok = err <= 4e-3 * mag && lse_err <= 2e-4;
    std::printf("%s tc f16 %s: out max err %.3e (magnitude %.3e), lse max rel err %.3e\n", ok ? "ok  " : "FAIL",
                c.name.c_str(), err, mag, lse_err);
    return ok;
}

}  // namespace

int main() {
    const std::vector<Case> cases = {
        {"GQA 2x2 L=130 S=70, cp.async loads", 1, 2, 2, 130, 70, 64, 0, 0, 0, 0.0, 1},
        {"causal top-left L=S=100 + additive [L, S] + dropout 0.2, scalar loads", 1, 1, 2, 100, 100, 64, 1, 2, 0, 0.2, 0},
        {"causal bottom-right L=40 S=150 + bool [B, 1, 1, S], E=40", 2, 1, 1, 40, 150, 40, 2, 1, 1, 0.0, 0},
        {"bottom-right L=150 S=40 (rows with no key)", 1, 1, 1, 150, 40, 64, 2, 0, 0, 0.0, 1},
        // Window: tiles before the window's start are skipped, edge tiles bound both sides.
        {"window (37, 5) L=200 S=230", 1, 1, 2, 200, 230, 64, 0, 0, 0, 0.0, 1, {37, 5}},
        {"window (0, 0) + causal top-left L=S=90, GQA", 1, 2, 2, 90, 90, 64, 1, 0, 0, 0.0, 1, {0, 0}},
        {"window (-1, 70) L=150 S=40 (rows with no key)", 1, 1, 1, 150, 40, 64, 0, 0, 0, 0.0, 1, {-1, 70}},
        {"softcap 2 + ALiBi + bool mask + window (64, -1) L=100 S=300", 2, 1, 2, 100, 300, 64, 2, 1, 1, 0.0, 1,
         {64, -1, 2.0, 0.05}},
        {"softcap 0.5 + additive [L, S] + dropout 0.1, E=40", 1, 1, 1, 70, 90, 40, 0, 2, 0, 0.1, 0, {-1, -1, 0.5, 0}},
    };
    bool ok = true;
    for (const auto& c : cases) ok = run(c) && ok;
    std::printf("%zu tc forward cases: %s\n", cases.size(), ok ? "all pass" : "FAILURES");
    return ok ? 0 : 1;
}
