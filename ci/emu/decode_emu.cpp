// The decode kernels (kernels/decode/attn_decode.cu: append, split, combine; f16, head-dim
// class 64, blocks of 64 keys; and the tensor-core split of attn_decode_tc.cu between the
// same append and combine, on every case whose rows are 16-byte aligned) run on the CPU
// emulator against a plain f64 attention over
// the cache after the append, with causal bottom-right, the window, softcap and ALiBi as
// DESIGN.md orders them: dense and paged caches (block sizes 1, 16, 48 over shuffled
// tables), GQA groups 1 to 8 (every tile size), one to five splits, query rows with no
// key. out within 4e-3 of its magnitude, lse within 2e-4 (1 + |lse|), the cache after the
// append bit-equal to the expected one. Exit status 1 on any failure; run by ci/emu.sh.
#include "cuda_emu.h"
#include "emu_ref.h"
#include "common/dtype.cuh"
#include "decode/params.cuh"

#include <algorithm>
#include <cstdio>
#include <numeric>
#include <string>


extern "C" void emu_decode_append(const DecodeParams);
extern "C" void emu_decode_combine(const DecodeParams);
extern "C" void emu_decode_split1(const DecodeParams);
extern "C" void emu_decode_split4(const DecodeParams);
extern "C" void emu_decode_split8(const DecodeParams);
extern "C" void emu_decode_split16(const DecodeParams);
extern "C" void emu_decode_split_tc(const DecodeParams);
extern "C" unsigned char* emu_decode_arena();
extern "C" unsigned char* emu_decode_tc_arena();

namespace {

struct Case {
    std::string name;
    int b, hkv, group, lq, e, ev;
    std::vector<int> lens;  // cache_seqlens, one a batch row
    int len_new;
    int block_size;  // 0: dense
    int causal, wl, wr;
    float softcap;
    bool alibi;
    int splits;
    int vec16;
};

bool run(const Case& c, bool tc) {
    const int hq = c.hkv * c.group;
    const double scale = 1.0 / std::sqrt((double)c.e);
    Rng rng{0x5eed0000ull + (u64)c.lq * 977 + (u64)c.e * 31 + (u64)c.splits};
    auto fill = [&](size_t n) {
        std::vector<unsigned short> v(n);
        for (auto& x : v) x = emu_f32_to_f16((float)(rng.next() * 2.0));
        return v;
    };
    auto f = [](unsigned short x) { return (double)emu_f16_to_f32(x); };
    const int max_total = *std::max_element(c.lens.begin(), c.lens.end()) + c.len_new;
    // Capacity: dense rows of max_total + 5 keys; paged tables of enough blocks, shuffled.
    int s_max = max_total + 5, blocks_per_row = 0, num_blocks = 0;
    std::vector<int> table;
    if (c.block_size > 0) {
        blocks_per_row = (max_total + 5 + c.block_size - 1) / c.block_size;
        num_blocks = c.b * blocks_per_row + 3;
        std::vector<int> ids(num_blocks);
        std::iota(ids.begin(), ids.end(), 0);
        for (int n = num_blocks - 1; n > 0; --n) std::swap(ids[n], ids[(int)((rng.next() + 1) * 0.5 * (n + 1)) % (n + 1)]);
        table.assign(ids.begin(), ids.begin() + c.b * blocks_per_row);
    }
    const size_t rows_k = c.block_size > 0 ? (size_t)num_blocks * c.block_size : (size_t)c.b * s_max;
    auto kc = fill(rows_k * c.hkv * c.e), vc = fill(rows_k * c.hkv * c.ev);
    auto q = fill((size_t)c.b * hq * c.lq * c.e);
    auto kn = fill((size_t)c.b * c.hkv * c.len_new * c.e), vn = fill((size_t)c.b * c.hkv * c.len_new * c.ev);
    std::vector<float> slopes(hq);
    for (int h = 0; h < hq; ++h) slopes[h] = c.alibi ? (float)std::exp2(-8.0 * (h + 1) / hq) : 0.f;
    // Element offset of (b, h, j, 0) in the cache: dense [B, Hkv, S_max, E] and paged
    // [blocks, block_size, Hkv, E] alike.
    auto at = [&](int bb, int h, int j, int dim) -> size_t {
        if (c.block_size == 0) return (((size_t)bb * c.hkv + h) * s_max + j) * dim;
        const int page = table[(size_t)bb * blocks_per_row + j / c.block_size];
        return (((size_t)page * c.block_size + j % c.block_size) * c.hkv + h) * dim;
    };
    auto k_exp = kc, v_exp = vc;
    for (int bb = 0; bb < c.b; ++bb)
        for (int h = 0; h < c.hkv; ++h)
            for (int t = 0; t < c.len_new; ++t) {
                for (int d = 0; d < c.e; ++d) k_exp[at(bb, h, c.lens[bb] + t, c.e) + d] = kn[(((size_t)bb * c.hkv + h) * c.len_new + t) * c.e + d];
                for (int d = 0; d < c.ev; ++d) v_exp[at(bb, h, c.lens[bb] + t, c.ev) + d] = vn[(((size_t)bb * c.hkv + h) * c.len_new + t) * c.ev + d];
            }

    std::vector<double> out_ref((size_t)c.b * hq * c.lq * c.ev, 0.0), lse_ref((size_t)c.b * hq * c.lq);
    for (int bb = 0; bb < c.b; ++bb) {
        const int n = c.lens[bb] + c.len_new;
        std::vector<double> sc(n);
        for (int h = 0; h < hq; ++h)
            for (int i = 0; i < c.lq; ++i) {
                const int hk = h / c.group;
                const long long pos = (long long)i + n - c.lq;
                double mx = -INFINITY;
                // The window and softcap of emu_ref.h (causal is bottom-right here); the
                // decode cases' own geometric ALiBi slopes.
                const Mods mods{c.wl, c.wr, c.softcap, 0};
                for (int j = 0; j < n; ++j) {
                    const bool vis = mods.sees(c.causal ? 2 : 0, i, j, c.lq, n);
                    double dot = 0, t;
                    for (int d = 0; d < c.e; ++d) dot += f(q[(((size_t)bb * hq + h) * c.lq + i) * c.e + d]) * f(k_exp[at(bb, hk, j, c.e) + d]);
                    double x = mods.score(dot * scale, h, i, j, c.lq, n, t);
                    x -= (double)slopes[h] * std::fabs((double)(pos - j));
                    sc[j] = vis ? x : -INFINITY;
                    mx = std::max(mx, sc[j]);
                }
                double sum = 0;
                for (int j = 0; j < n; ++j) sum += mx == -INFINITY ? 0.0 : std::exp(sc[j] - mx);
                const size_t row = ((size_t)bb * hq + h) * c.lq + i;
                lse_ref[row] = sum > 0 ? mx + std::log(sum) : -INFINITY;
                for (int j = 0; j < n; ++j) {
                    if (!(sum > 0) || sc[j] == -INFINITY) continue;
                    const double w = std::exp(sc[j] - mx) / sum;
                    for (int d = 0; d < c.ev; ++d) out_ref[row * c.ev + d] += w * f(v_exp[at(bb, hk, j, c.ev) + d]);
                }
            }
    }

    DecodeParams p;
    std::memset(&p, 0, sizeof p);
    std::vector<unsigned short> out(out_ref.size(), 0x7e00);  // NaN-poisoned
    std::vector<float> lse(lse_ref.size(), NAN);
    const size_t total_rows = lse.size();
    std::vector<float> part_out(total_rows * c.ev * c.splits, NAN), part_lse(total_rows * c.splits, NAN);
    std::vector<int> lens = c.lens;
    p.q = (u64)q.data(), p.k = (u64)kc.data(), p.v = (u64)vc.data(), p.out = (u64)out.data(), p.lse = (u64)lse.data();
    p.part_out = (u64)part_out.data(), p.part_lse = (u64)part_lse.data();
    p.block_table = c.block_size > 0 ? (u64)table.data() : 0;
    p.seqlens = (u64)lens.data();
    p.alibi = c.alibi ? (u64)slopes.data() : 0;
    p.k_new = (u64)kn.data(), p.v_new = (u64)vn.data();
    p.q_stride_b = (i64)hq * c.lq * c.e, p.q_stride_h = (i64)c.lq * c.e, p.q_stride_l = c.e;
    if (c.block_size > 0) {
        p.k_stride_page = (i64)c.block_size * c.hkv * c.e, p.k_stride_slot = (i64)c.hkv * c.e, p.k_stride_h = c.e;
        p.v_stride_page = (i64)c.block_size * c.hkv * c.ev, p.v_stride_slot = (i64)c.hkv * c.ev, p.v_stride_h = c.ev;
    } else {
        p.k_stride_page = (i64)c.hkv * s_max * c.e, p.k_stride_slot = c.e, p.k_stride_h = (i64)s_max * c.e;
        p.v_stride_page = (i64)c.hkv * s_max * c.ev, p.v_stride_slot = c.ev, p.v_stride_h = (i64)s_max * c.ev;
    }
    p.kn_stride_b = (i64)c.hkv * c.len_new * c.e, p.kn_stride_h = (i64)c.len_new * c.e, p.kn_stride_l = c.e;
    p.vn_stride_b = (i64)c.hkv * c.len_new * c.ev, p.vn_stride_h = (i64)c.len_new * c.ev, p.vn_stride_l = c.ev;
    p.batch = c.b, p.heads_q = hq, p.heads_kv = c.hkv, p.group = c.group;
    p.len_q = c.lq, p.head_dim = c.e, p.head_dim_v = c.ev, p.len_new = c.len_new;
    p.block_size = c.block_size, p.table_stride = blocks_per_row, p.causal = c.causal;
    p.window_left = c.wl, p.window_right = c.wr, p.alibi_stride_b = 0, p.splits = c.splits;
    p.vec16 = c.vec16, p.scale = (float)scale, p.softcap = c.softcap;
    const int packed = c.group * c.lq;
    const int mr = tc || packed > 8 ? 16 : packed <= 1 ? 1 : packed <= 4 ? 4 : 8;
    p.row_tiles = (packed + mr - 1) / mr;

    emu_shared_base = emu_decode_arena();
    if (c.len_new > 0) emu_launch(emu_decode_append, EmuDim{(unsigned)c.len_new, (unsigned)c.hkv, (unsigned)c.b}, EmuDim{128}, p);
    auto split = tc ? emu_decode_split_tc : mr == 1 ? emu_decode_split1 : mr == 4 ? emu_decode_split4 : mr == 8 ? emu_decode_split8 : emu_decode_split16;
    emu_shared_base = tc ? emu_decode_tc_arena() : emu_decode_arena();
    emu_launch(split, EmuDim{(unsigned)c.splits, (unsigned)(c.hkv * p.row_tiles), (unsigned)c.b}, EmuDim{128}, p);
    if (c.splits > 1) emu_launch(emu_decode_combine, EmuDim{(unsigned)total_rows}, EmuDim{128}, p);


    const bool cache_ok = kc == k_exp && vc == v_exp;
    const OutLseError e = out_lse_error(out, out_ref, lse, lse_ref, f);
    const double mag = e.mag, err = e.err, lse_err = e.lse_err;
    const bool ok = cache_ok && err <= 4e-3 * mag && lse_err <= 2e-4;
    std::printf("%s decode%s f16 %s: out max err %.3e (magnitude %.3e), lse max rel err %.3e%s\n", ok ? "ok  " : "FAIL",
                tc ? " tc" : "", c.name.c_str(), err, mag, lse_err, cache_ok ? "" : ", cache after the append differs");
    return ok;
}

}  // namespace

int main() {
    // name, B, Hkv, group, Lq, E, Ev, cache_seqlens, L_new, block_size, causal, wl, wr,
    // softcap, alibi, splits, vec16
    const std::vector<Case> cases = {
        {"dense MHA Lq=1 S=200, one split", 2, 2, 1, 1, 64, 64, {200, 131}, 0, 0, 0, -1, -1, 0.f, false, 1, 1},
        {"dense GQA 4 Lq=1, three splits, append 1", 2, 2, 4, 1, 64, 64, {150, 0}, 1, 0, 1, -1, -1, 0.f, false, 3, 1},
        {"paged bs=16 GQA 8 Lq=2 (tile 16), two splits, append 2", 2, 1, 8, 2, 64, 64, {100, 37}, 2, 16, 1, -1, -1, 0.f, false, 2, 1},
        {"paged bs=1 GQA 2 Lq=3 causal, window (20, 0), softcap 5, alibi", 1, 2, 2, 3, 64, 64, {90}, 3, 1, 1, 20, 0, 5.f, true, 2, 1},
        {"paged bs=48 MHA Lq=5 E=40 Ev=56 window (-1, 2), scalar loads, five splits", 2, 1, 1, 5, 40, 56, {130, 3}, 0, 48, 0, -1, 2, 0.f, false, 5, 0},
        {"dense GQA 3 Lq=7 (tiles 16, 5 rows), more query rows than keys", 1, 2, 3, 7, 64, 64, {2}, 1, 0, 1, -1, -1, 0.f, true, 2, 1},
        {"dense GQA 4 Lq=1 S=1000, one split (more blocks a warp than stages)", 1, 2, 4, 1, 64, 64, {1000}, 0, 0, 1, -1, -1, 0.f, false, 1, 1},
        {"paged bs=16 GQA 4 Lq=1 E=48 Ev=32, window (300, -1), softcap 20, alibi, three splits", 2, 2, 4, 1, 48, 32, {700, 450}, 1, 16, 1, 300, -1, 20.f, true, 3, 1},
        {"dense empty cache and no append", 1, 1, 4, 1, 64, 64, {0}, 0, 0, 1, -1, -1, 0.f, false, 2, 1},
    };
    bool ok = true;
    int runs = 0;
    for (const auto& c : cases) {
        ok = run(c, false) && ok;
        ++runs;
        if (c.vec16) {
            ok = run(c, true) && ok;
            ++runs;
        }
    }
    std::printf("%d decode runs of %zu cases: %s\n", runs, cases.size(), ok ? "all pass" : "FAILURES");
    return ok ? 0 : 1;
}
