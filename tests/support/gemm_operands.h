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

// C0 + A B with A's rows given by pointers (gemm_packed_rows), the rows in reverse order in
// memory, as an all-to-all leaves an expert's rows: floats, or (bf16 rows, for a B packed by
// pack_b_bf16) A's values rounded to bf16.
template <typename Elem>
std::vector<float> gemm_by_row_pointers(const std::vector<float>& A, int64_t M, int64_t K, const PackedB& B,
                                        float beta, const std::vector<float>& C0, const GemmExtras& extras = {}) {
  std::vector<Elem> reversed(M * K);
  std::vector<const Elem*> rows(M);
  for (int64_t i = 0; i < M; ++i) {
    Elem* row = reversed.data() + (M - 1 - i) * K;
    for (int64_t k = 0; k < K; ++k) {
      if constexpr (sizeof(Elem) == 2)
        row[k] = float_to_bf16(A[i * K + k]);
      else
        row[k] = A[i * K + k];
    }
    rows[i] = row;
  }
  std::vector<float> C = C0;
  gemm_packed_rows(M, rows.data(), B, beta, C.data(), B.N, extras);
  return C;
}

}  // namespace pm::test
