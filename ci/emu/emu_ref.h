// What the emulator harnesses' f64 references share: the input generator and the causal
// key limit (sdpa_core::Causal::key_limit), written once.
#pragma once
#include <algorithm>
#include <cmath>
#include <vector>

typedef unsigned long long emu_u64;

// SplitMix64, uniform in [-1, 1).
struct Rng {
    emu_u64 s;
    double next() {
        s += 0x9E3779B97F4A7C15ull;
        emu_u64 z = s;
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
        z ^= z >> 31;
        return (double)(z >> 11) / (double)(1ull << 52) - 1.0;
    }
};

// Keys j < key_limit_ref(...) take part for query i (causal 1 top-left, 2 bottom-right).
inline int key_limit_ref(int causal, int i, int l, int s) {
    if (causal == 1) return std::min(i + 1, s);
    if (causal == 2) return (int)std::max(0LL, std::min((long long)s, (long long)i + 1 + s - l));
    return s;
}

// The forward harnesses' measure of a result: the output's largest absolute error and
// magnitude (at least 1), the lse's largest error relative to 1 + |lse| (a row the truth
// has at -inf must be -inf); NaN counts as infinite error.
struct OutLseError {
    double mag, err, lse_err;
};
template <class F>
OutLseError out_lse_error(const std::vector<unsigned short>& out, const std::vector<double>& out_ref,
                          const std::vector<float>& lse, const std::vector<double>& lse_ref, F f) {
    OutLseError e{1, 0, 0};
    for (double x : out_ref) e.mag = std::max(e.mag, std::fabs(x));
    for (size_t n = 0; n < out.size(); ++n) {
        const double d = std::fabs(f(out[n]) - out_ref[n]);
        e.err = std::isnan(d) ? INFINITY : std::max(e.err, d);
    }
    for (size_t n = 0; n < lse.size(); ++n) {
        if (lse_ref[n] == -INFINITY) {
            if (lse[n] != -INFINITY) e.lse_err = INFINITY;
            continue;
        }
        const double d = std::fabs((double)lse[n] - lse_ref[n]) / (1 + std::fabs(lse_ref[n]));
        e.lse_err = std::isnan(d) ? INFINITY : std::max(e.lse_err, d);
    }
    return e;
}

// DESIGN.md's sliding window, softcap and ALiBi, for the harnesses' references: row i of
// l queries sees key j of s iff causal allows it and i + s - l - wl <= j <= i + s - l + wr
// (-1 unbounded); a score x = scale q.k becomes cap tanh(x / cap), then minus
// slope(h) |i + s - l - j|, before any mask.
struct Mods {
    int wl = -1, wr = -1;
    double cap = 0;     // 0: no softcap
    double slope0 = 0;  // head h's slope is slope0 (h + 1), rounded to f32 as the kernels read it; 0: none
    bool sees(int causal, int i, int j, int l, int s) const {
        if (j >= key_limit_ref(causal, i, l, s)) return false;
        const long long diag = (long long)i + s - l;
        if (wl >= 0 && j < diag - wl) return false;
        if (wr >= 0 && j > diag + wr) return false;
        return true;
    }
    double slope(int h) const { return (double)(float)(slope0 * (h + 1)); }
    // t: tanh of the softcap (0 without one), for dS's factor 1 - t^2.
    double score(double x, int h, int i, int j, int l, int s, double& t) const {
        t = 0;
        if (cap > 0) {
            t = std::tanh(x / cap);
            x = cap * t;
        }
        if (slope0 != 0) x -= slope(h) * std::fabs((double)i + s - l - j);
        return x;
    }
    // The f32 slopes of heads 0 .. hq - 1 (empty without ALiBi) and the FwdParams fields.
    std::vector<float> slopes(int hq) const {
        std::vector<float> v;
        if (slope0 != 0)
            for (int h = 0; h < hq; ++h) v.push_back((float)slope(h));
        return v;
    }
    template <class P>
    void set(P& p, const std::vector<float>& sl) const {
        p.window_left = wl, p.window_right = wr, p.softcap = cap;
        p.alibi = sl.empty() ? 0 : (unsigned long long)sl.data();
        p.alibi_stride_b = 0;
    }
};
