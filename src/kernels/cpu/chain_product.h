// Small products C = A B for attention's per-head matrices (a sequence of a few hundred positions,
// a head of 32-128 values), where gemm's packing of B costs as much as the product itself.
//
// Each element is gemm's chain (gemm.h): one fused multiply-add per depth k = 0..K-1 in order,
// from zero or from C, so a chain_product gives the bits the same gemm gives. Attention's
// products are triangular (causal): its callers run each block of rows over the depths and
// columns that hold anything but zeros, where a gemm ran the whole square.
#pragma once

#include <cstdint>

namespace pm {

// A's element (r, k) at base[r * row_step + k * depth_step]: rows of a row-major matrix
// (depth_step 1) or its columns (row_step 1, a transposed operand), without a copy.
struct StridedRows {
  const float* base;
  int64_t row_step, depth_step;
};

// C[M, N] (rows ldc apart) = A[M, K] B[K, N] (B's rows ldb apart), each element's chain from C's
// value (accumulate) or from zero. N need not be a multiple of anything: C's columns past N are
// neither read nor written, and B's past N are not read.
void chain_product(int64_t M, int64_t N, int64_t K, const StridedRows& A, const float* B, int64_t ldb, float* C,
                   int64_t ldc, bool accumulate);

}  // namespace pm
