// The mma.sync backward (kernels/bwd/attn_bwd_tc.cu, f16, mask and dropout compiled in)
// at two tile shapes, run on the CPU emulator (ci/emu/cuda_emu.h: ldmatrix, mma.sync and
// cp.async emulated lane by lane) against a plain f64 backward of the same f16 inputs:
// dense and varlen (cu_seqlens) batches, causal both ways, L != S, GQA, E != Ev, bool and
// additive masks (dmask summed over broadcast axes), fully masked rows, dropout, negative
// scale. The kernels round P and dS to f16 for the products, so each gradient is held
// within 1e-2 of its largest magnitude (a planted bug moves it by O(1)). Exit status 1
// on any failure; run by ci/emu.sh.
#include "cuda_emu.h"
#include "emu_ref.h"
#include "common/dtype.cuh"
#include "common/params.cuh"
#include "common/philox.cuh"

#include <cstdio>
#include <string>

#define EMU_CONFIG(tag)                               \
    extern "C" void tag##_pre(const BwdParams);       \
    extern "C" void tag##_main(const BwdParams);      \
    extern "C" unsigned char* tag##_arena();          \
    extern "C" unsigned tag##_block_keys();           \
    extern "C" unsigned tag##_threads();
EMU_CONFIG(w4m64)
EMU_CONFIG(w8m32)

namespace {

struct Config {
    const char* name;
    void (*pre)(const BwdParams);
    void (*main)(const BwdParams);
    unsigned char* (*arena)();
    unsigned (*block_keys)();
    unsigned (*threads)();
    int max_dim;
};
const Config CONFIGS[] = {
    {"d64/w4/m64", w4m64_pre, w4m64_main, w4m64_arena, w4m64_block_keys, w4m64_threads, 64},
    {"d128/w8/m32", w8m32_pre, w8m32_main, w8m32_arena, w8m32_block_keys, w8m32_threads, 128},
};


struct Case {
    std::string name;
    int b, hkv, group, l, s, e, ev;
    int causal;       // CausalCode
    int mask;         // MaskCode
    int mask_shape;   // 0: [L, S]; 1: [B, 1, 1, S]
    double p;         // dropout
    double scale;     // 0: 1/sqrt(E)
    int vec_ok;
    std::vector<int> lens_q, lens_k;  // non-empty: varlen (packed rows, i32 cu_seqlens)
    Mods mods = {};                   // window, softcap, ALiBi
};


bool report(const char* what, const std::vector<double>& got, const std::vector<double>& want,
            const std::string& name, const char* config) {
    double mag = 1e-30, err = 0;
    size_t at = 0;
    for (double w : want) mag = std::max(mag, std::fabs(w));
    for (size_t n = 0; n < want.size(); ++n) {
        const double d = std::fabs(got[n] - want[n]);
        if (!(d <= err)) {
            err = std::isnan(d) ? INFINITY : d;
            at = n;
        }
    }
    const bool ok = err <= 1e-2 * std::max(mag, 1e-3);
    std::printf("%s %-11s %-5s %s: max err %.3e (at %zu: got %.5g want %.5g), magnitude %.3e\n", ok ? "ok  " : "FAIL",
                config, what, name.c_str(), err, at, want.empty() ? 0.0 : got[at], want.empty() ? 0.0 : want[at], mag);
    return ok;
}

bool run(const Case& c, const Config& cfg, bool deterministic) {
    const int hq = c.hkv * c.group;
    const bool varlen = !c.lens_q.empty();
    const int nb = varlen ? (int)c.lens_q.size() : c.b;
    std::vector<int> cu_q(nb + 1, 0), cu_k(nb + 1, 0);
    int max_q = 0, max_k = 0;
    for (int bb = 0; bb < nb; ++bb) {
        const int lq = varlen ? c.lens_q[bb] : c.l, lk = varlen ? c.lens_k[bb] : c.s;
        cu_q[bb + 1] = cu_q[bb] + lq, cu_k[bb + 1] = cu_k[bb] + lk;
        max_q = std::max(max_q, lq), max_k = std::max(max_k, lk);
    }
    const int tq = cu_q[nb], tk = cu_k[nb];
    // Element offsets: dense [B, H, L, dim], or packed [total, H, dim] (batch stride 0).
    auto off = [&](int bb, int h, int i, int heads, int dim, bool keys) -> size_t {
        const int len = keys ? max_k : max_q;
        if (!varlen) return (((size_t)bb * heads + h) * len + i) * dim;
        return ((size_t)((keys ? cu_k : cu_q)[bb] + i) * heads + h) * dim;
    };
    const double scale = c.scale != 0 ? c.scale : 1.0 / std::sqrt((double)c.e);
    Rng rng{0xbacc0000ull + (u64)c.name.size() * 7919 + (u64)c.l * 131 + (u64)c.s};
    auto fill = [&](size_t n) {
        std::vector<unsigned short> v(n);
        for (auto& x : v) x = emu_f32_to_f16((float)rng.next());
        return v;
    };
    auto f = [](unsigned short x) { return (double)emu_f16_to_f32(x); };
    // Rows of the query and key operands: B * L (dense) or the packed total.
    const size_t rq = varlen ? (size_t)tq : (size_t)nb * max_q, rk = varlen ? (size_t)tk : (size_t)nb * max_k;
    auto q = fill(rq * hq * c.e), k = fill(rk * c.hkv * c.e), v = fill(rk * c.hkv * c.ev), dout = fill(rq * hq * c.ev);
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
    if (c.mask && c.mask_shape == 0 && c.l > 3)  // a fully masked row
        for (int j = 0; j < c.s; ++j) bmask[3 * (size_t)c.s + j] = 0, amask[3 * (size_t)c.s + j] = emu_f32_to_f16(-INFINITY);
    auto moff = [&](int bb, int h, int i, int j) { return (size_t)(bb * ms[0] + h * ms[1] + i * ms[2] + j * ms[3]); };
    const u64 seed = 0x5151ull, offset = 12;
    const u64 threshold = (u64)std::llround(c.p * 4294967296.0);
    const double keep_scale = c.p > 0 ? 1.0 / (1.0 - c.p) : 1.0;
    auto keep = [&](int bb, int h, int i, int j) -> double {
        if (c.p <= 0) return 1.0;
        const u64 n = (((u64)bb * hq + h) * (u64)max_q + (u64)i) * (u64)max_k + (u64)j;
        return dropout_keep1(seed, offset, threshold, n) ? keep_scale : 0.0;
    };

    // f64 forward (out rounded to f16, lse to f32, as the forward stores them) and backward.
    std::vector<unsigned short> out(dout.size(), 0);
    std::vector<float> lse(rq * hq, 0.f);
    std::vector<double> dq(q.size(), 0.0), dk(k.size(), 0.0), dv(v.size(), 0.0), dmask(mask_n, 0.0);
    for (int bb = 0; bb < nb; ++bb) {
        const int lq = cu_q[bb + 1] - cu_q[bb], lk = cu_k[bb + 1] - cu_k[bb];
        for (int h = 0; h < hq; ++h) {
            const int hk = h / c.group;
            for (int i = 0; i < lq; ++i) {
                const size_t qo = off(bb, h, i, hq, c.e, false), go = off(bb, h, i, hq, c.ev, false);
                std::vector<double> sc(lk), pr(lk, 0.0), dpv(lk, 0.0), th(lk, 0.0);
                std::vector<char> vis(lk);
                double mx = -INFINITY;
                for (int j = 0; j < lk; ++j) {
                    const size_t ko = off(bb, hk, j, c.hkv, c.e, true);
                    double dot = 0;
                    for (int d = 0; d < c.e; ++d) dot += f(q[qo + d]) * f(k[ko + d]);
                    sc[j] = c.mods.score(dot * scale, h, i, j, lq, lk, th[j]) +
                            (c.mask == 2 ? f(amask[moff(bb, h, i, j)]) : 0.0);
                    vis[j] = c.mods.sees(c.causal, i, j, lq, lk) && !(c.mask == 1 && !bmask[moff(bb, h, i, j)]) &&
                             sc[j] != -INFINITY;
                    if (vis[j]) mx = std::max(mx, sc[j]);
                }
                double sum = 0;
                for (int j = 0; j < lk; ++j)
                    if (vis[j]) sum += std::exp(sc[j] - mx);
                const size_t row = varlen ? (size_t)h * tq + cu_q[bb] + i : ((size_t)bb * hq + h) * max_q + i;
                lse[row] = sum > 0 ? (float)(mx + std::log(sum)) : -INFINITY;
                std::vector<double> o(c.ev, 0.0);
                for (int j = 0; j < lk; ++j) {
                    if (!vis[j]) continue;
                    pr[j] = std::exp(sc[j] - mx) / sum;
                    const size_t vo = off(bb, hk, j, c.hkv, c.ev, true);
                    for (int d = 0; d < c.ev; ++d) o[d] += pr[j] * keep(bb, h, i, j) * f(v[vo + d]);
                }
                for (int d = 0; d < c.ev; ++d) out[go + d] = emu_f32_to_f16((float)o[d]);
                double D = 0;
                for (int j = 0; j < lk; ++j) {
                    if (!vis[j]) continue;
                    const size_t vo = off(bb, hk, j, c.hkv, c.ev, true);
                    double dw = 0;
                    for (int d = 0; d < c.ev; ++d) dw += f(dout[go + d]) * f(v[vo + d]);
                    dpv[j] = dw * keep(bb, h, i, j);
                    D += pr[j] * dpv[j];
                }
                for (int j = 0; j < lk; ++j) {
                    if (!vis[j]) continue;
                    // dS (the additive mask's gradient), and times 1 - tanh^2 for dq and dk.
                    const double dsm = pr[j] * (dpv[j] - D), w = pr[j] * keep(bb, h, i, j);
                    const double ds = dsm * (1 - th[j] * th[j]);
                    const size_t ko = off(bb, hk, j, c.hkv, c.e, true), vo = off(bb, hk, j, c.hkv, c.ev, true);
                    for (int d = 0; d < c.e; ++d) dq[qo + d] += scale * ds * f(k[ko + d]), dk[ko + d] += scale * ds * f(q[qo + d]);
                    for (int d = 0; d < c.ev; ++d) dv[vo + d] += w * f(dout[go + d]);
                    if (c.mask == 2) dmask[moff(bb, h, i, j)] += dsm;
                }
            }
        }
    }

    BwdParams p;
    std::memset(&p, 0, sizeof p);
    std::vector<unsigned short> gk(k.size(), 0x7e00), gv(v.size(), 0x7e00);  // NaN-poisoned
    // Deterministic mode: two CTAs along the keys, each with its own dq slice (so each
    // walks several key blocks where there are more than two).
    const unsigned splits = deterministic ? 2 : 1;
    // D and the log2 lse (NaN-poisoned: the pre kernel writes every row the main one reads).
    std::vector<float> dq_acc(splits * q.size(), 0.f), gd(mask_n, 0.f), dbuf(2 * (size_t)nb * hq * max_q, NAN);
    p.q = (u64)q.data(), p.k = (u64)k.data(), p.v = (u64)v.data(), p.out = (u64)out.data(), p.lse = (u64)lse.data();
    p.mask = c.mask == 1 ? (u64)bmask.data() : c.mask == 2 ? (u64)amask.data() : 0;
    auto strides = [&](long long* s, int heads, int len, int dim) {
        if (varlen) s[0] = 0, s[1] = dim, s[2] = (long long)heads * dim;
        else s[0] = (long long)heads * len * dim, s[1] = (long long)len * dim, s[2] = dim;
    };
    long long t[3];
    strides(t, hq, max_q, c.e), p.q_stride_b = t[0], p.q_stride_h = t[1], p.q_stride_l = t[2], p.q_stride_e = 1;
    p.dq_stride_b = t[0], p.dq_stride_h = t[1], p.dq_stride_l = t[2];
    strides(t, c.hkv, max_k, c.e), p.k_stride_b = t[0], p.k_stride_h = t[1], p.k_stride_l = t[2], p.k_stride_e = 1;
    p.dk_stride_b = t[0], p.dk_stride_h = t[1], p.dk_stride_l = t[2];
    strides(t, c.hkv, max_k, c.ev), p.v_stride_b = t[0], p.v_stride_h = t[1], p.v_stride_l = t[2], p.v_stride_e = 1;
    p.dv_stride_b = t[0], p.dv_stride_h = t[1], p.dv_stride_l = t[2];
    strides(t, hq, max_q, c.ev), p.out_stride_b = t[0], p.out_stride_h = t[1], p.out_stride_l = t[2];
    p.dout_stride_b = t[0], p.dout_stride_h = t[1], p.dout_stride_l = t[2];
    if (varlen) p.lse_stride_b = 0, p.lse_stride_h = tq, p.lse_stride_l = 1;
    else p.lse_stride_b = (long long)hq * max_q, p.lse_stride_h = max_q, p.lse_stride_l = 1;
    p.mask_stride_b = ms[0], p.mask_stride_h = ms[1], p.mask_stride_l = ms[2], p.mask_stride_s = ms[3];
    p.dmask_stride_b = ms[0], p.dmask_stride_h = ms[1], p.dmask_stride_l = ms[2], p.dmask_stride_s = ms[3];
    p.dropout_seed = seed, p.dropout_offset = offset, p.dropout_threshold = threshold;
    p.scale = scale, p.keep_scale = keep_scale;
    p.batch = nb, p.heads_q = hq, p.heads_kv = c.hkv, p.group = c.group, p.len_q = max_q, p.len_kv = max_k;
    p.head_dim = c.e, p.head_dim_v = c.ev, p.scale_log2 = (float)(scale * 1.4426950408889634);
    p.causal = c.causal, p.mask_kind = c.mask, p.dropout = c.p > 0, p.varlen = varlen ? 2 : 0, p.vec_ok = c.vec_ok;
    const std::vector<float> slopes = c.mods.slopes(hq);
    c.mods.set(p, slopes);
    p.cu_seqlens_q = varlen ? (u64)cu_q.data() : 0, p.cu_seqlens_k = varlen ? (u64)cu_k.data() : 0;
    p.dout = (u64)dout.data(), p.dk = (u64)gk.data(), p.dv = (u64)gv.data();
    p.dq_accum = (u64)dq_acc.data(), p.softmax_d = (u64)dbuf.data();
    p.dmask = c.mask == 2 ? (u64)gd.data() : 0;
    p.dq_split_stride = deterministic ? (long long)q.size() : 0;

    emu_launch(cfg.pre, EmuDim{(unsigned)((max_q + 3) / 4), (unsigned)hq, (unsigned)nb}, EmuDim{128}, p);
    emu_shared_base = cfg.arena();
    const unsigned bn = cfg.block_keys();
    const unsigned grid_x = deterministic ? splits : (max_k + bn - 1) / bn;
    emu_launch(cfg.main, EmuDim{grid_x, (unsigned)c.hkv, (unsigned)nb}, EmuDim{cfg.threads()}, p);

    auto widen = [&](const std::vector<unsigned short>& x) {
        std::vector<double> r(x.size());
        for (size_t n = 0; n < x.size(); ++n) r[n] = f(x[n]);
        return r;
    };
    // The slices summed in order in f32, as the round kernel does.
    std::vector<double> gq(q.size());
    for (size_t n = 0; n < gq.size(); ++n) {
        float sum = dq_acc[n];
        for (unsigned s = 1; s < splits; ++s) sum += dq_acc[s * q.size() + n];
        gq[n] = (double)sum * scale;
    }
    const std::string name = c.name + (deterministic ? " [deterministic]" : "");
    bool ok = report("dq", gq, dq, name, cfg.name);
    ok = report("dk", widen(gk), dk, name, cfg.name) && ok;
    ok = report("dv", widen(gv), dv, name, cfg.name) && ok;
    if (c.mask == 2) ok = report("dmask", std::vector<double>(gd.begin(), gd.end()), dmask, name, cfg.name) && ok;
    return ok;
}

}  // namespace

int main() {
    // name, b, hkv, group, l, s, e, ev, causal, mask, mask_shape, p, scale, vec_ok, lens
    const std::vector<Case> cases = {
        {"GQA 2x2 L=130 S=70, cp.async loads", 1, 2, 2, 130, 70, 64, 64, 0, 0, 0, 0.0, 0, 1, {}, {}},
        {"causal top-left L=S=100 + additive [L, S] + dropout 0.2, scalar loads", 1, 1, 2, 100, 100, 64, 64, 1, 2, 0,
         0.2, 0, 0, {}, {}},
        {"causal bottom-right L=40 S=150 + bool [B, 1, 1, S], E=40", 2, 1, 1, 40, 150, 40, 40, 2, 1, 1, 0.0, 0, 0, {}, {}},
        {"bottom-right L=150 S=40 (rows with no key), E=64 Ev=32, scale -0.3", 1, 1, 1, 150, 40, 64, 32, 2, 0, 0, 0.0,
         -0.3, 1, {}, {}},
        {"E=Ev=30 (scalar dq adds), causal top-left L=70 S=90, dropout 0.3 (S % 4 != 0 draws)", 1, 1, 1, 70, 90, 30, 30,
         1, 0, 0, 0.3, 0, 0, {}, {}},
        {"varlen q (37, 90) k (50, 20), causal bottom-right, GQA 1x3, dropout 0.1", 0, 1, 3, 0, 0, 64, 64, 2, 0, 0, 0.1, 0,
         1, {37, 90}, {50, 20}},
        // Window: query blocks outside a key block's window skipped, edge blocks bounded on both sides.
        {"window (40, 7) L=200 S=180, GQA 2x2", 1, 2, 2, 200, 180, 64, 64, 0, 0, 0, 0.0, 0, 1, {}, {}, {40, 7}},
        {"window (0, -1) + causal bottom-right L=50 S=120 (one key a row)", 1, 1, 1, 50, 120, 64, 64, 2, 0, 0, 0.0, 0, 1,
         {}, {}, {0, -1}},
        {"softcap 1.2 + ALiBi + additive [L, S] + window (30, 30) + dropout 0.1", 1, 1, 2, 90, 110, 64, 64, 0, 2, 0, 0.1,
         0, 0, {}, {}, {30, 30, 1.2, 0.08}},
        {"varlen q (37, 90) k (50, 20), softcap 3 + ALiBi + window (10, 4)", 0, 1, 2, 0, 0, 64, 32, 0, 0, 0, 0.0, 0, 1,
         {37, 90}, {50, 20}, {10, 4, 3.0, 0.2}},
    };
    bool ok = true;
    int runs = 0;
    for (const auto& cfg : CONFIGS)
        for (const auto& c : cases) {
            if (std::max(c.e, c.ev) > cfg.max_dim) continue;
            ok = run(c, cfg, false) && ok;
            ++runs;
            // The fixed-order dq adds, on the first tile shape.
            if (&cfg == &CONFIGS[0]) {
                ok = run(c, cfg, true) && ok;
                ++runs;
            }
        }
    std::printf("%d tc backward runs: %s\n", runs, ok ? "all pass" : "FAILURES");
    return ok ? 0 : 1;
}
