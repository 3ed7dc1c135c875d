// What the emulator harnesses' f64 references share: the input generator and the causal
// key limit (sdpa_core::Causal::key_limit), written once.
#pragma once
#include <algorithm>

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
