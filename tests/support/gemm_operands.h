// Operands for GEMM tests: normal random matrices (a seed per test file, a stream per operand) and
// element (i, j) of op(X).
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "core/rng.h"
#include "kernels/backend.h"
#include "kernels/cpu/gemm.h"

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

// C0 + A B (A [M, K] row-major, C0 [M, N]) computed `split` rows at a time, as pipelining splits
// a GEMM.
inline std::vector<float> gemm_in_row_splits(const std::vector<float>& A, int64_t M, int64_t K, const PackedB& B,
                                             const std::vector<float>& C0, int64_t split) {
  std::vector<float> C = C0;
  for (int64_t r = 0; r < M; r += split)
    gemm_packed(Trans::no, std::min(split, M - r), A.data() + r * K, K, B, 1.0f, C.data() + r * B.N, B.N);
  return C;
}

}  // namespace pm::test
