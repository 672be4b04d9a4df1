// Operands for GEMM tests: normal random matrices (a seed per test file, a stream per operand) and
// element (i, j) of op(X).
#pragma once

#include <cstdint>
#include <vector>

#include "core/rng.h"
#include "kernels/backend.h"

namespace pm::test {

inline std::vector<float> random_matrix(uint64_t seed, int64_t n, uint64_t stream) {
  std::vector<float> v(n);
  Rng(seed, stream).fill_normal(v.data(), n, 0.0f, 1.0f);
  return v;
}

// op(X)[i, j] of an op(X) [rows, cols] stored as X (Trans::no) or as its transpose.
inline float op_at(Trans t, const std::vector<float>& X, int64_t rows, int64_t cols, int64_t i, int64_t j) {
  return t == Trans::no ? X[i * cols + j] : X[j * rows + i];
}

}  // namespace pm::test
