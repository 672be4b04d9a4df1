// Values the unit tests draw and compare: normal samples from the engine's own generator, and a
// bit-for-bit comparison of two float arrays.
#pragma once

#include <cstdint>
#include <cstring>
#include <vector>

#include "core/rng.h"

namespace pm::test {

// n normal values of mean 0 and the given standard deviation, stream `seed` of core/rng.h.
inline std::vector<float> normal_values(int64_t n, uint64_t seed, float std = 1.0f) {
  std::vector<float> v(n);
  Rng(seed, 0).fill_normal(v.data(), n, 0.0f, std);
  return v;
}

// Whether a and b hold the same bits (a NaN equals itself, +0 and -0 differ).
inline bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

}  // namespace pm::test
