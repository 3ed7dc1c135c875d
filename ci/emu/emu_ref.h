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
