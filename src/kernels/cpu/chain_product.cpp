#include "kernels/cpu/chain_product.h"

#include <immintrin.h>

#include <algorithm>
#include <array>
#include <utility>

#include "core/error.h"
#include "kernels/cpu/gemm.h"

namespace pm {

namespace {

constexpr int kRows = 6;     // rows of C per tile: 6 x 4 accumulators, 4 of B and a broadcast in 32 registers
constexpr int kVectors = 4;  // vectors of 16 columns per tile

// One tile of R rows x V vectors of 16 columns (the last one `last` lanes), every depth in order.
// B's rows are read straight from where they lie (no packing): each depth's V vectors are loaded
// once for the R rows' broadcasts. A's place comes as three values in registers: a StridedRows by
// value went through the stack, written field by field and read back in one 16-byte load that
// waited on the stores (a failed store-to-load forwarding at every call, thousands a head). The
// attention core on the bundled models' shape (bench/attention_ab.sh): forward 0.88-0.96x,
// backward 0.81-0.92x the time (docs/BENCHMARKS.md, "StridedRows by reference").
template <int R, int V>
__attribute__((target("avx512f"))) void tile_avx512(int64_t K, const float* a_base, int64_t a_row_step,
                                                   int64_t a_depth_step, const float* B, int64_t ldb, float* C,
                                                   int64_t ldc, __mmask16 last, bool accumulate) {
  const StridedRows A{a_base, a_row_step, a_depth_step};
  __m512 acc[R][V];
  auto mask = [&](int v) { return v == V - 1 ? last : static_cast<__mmask16>(0xffff); };
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v)
      acc[r][v] = accumulate ? _mm512_maskz_loadu_ps(mask(v), C + r * ldc + 16 * v) : _mm512_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    __m512 b[V];
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) b[v] = _mm512_maskz_loadu_ps(mask(v), B + k * ldb + 16 * v);
    const float* a = A.base + k * A.depth_step;
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m512 x = _mm512_set1_ps(a[r * A.row_step]);
#pragma GCC unroll 4
      for (int v = 0; v < V; ++v) acc[r][v] = _mm512_fmadd_ps(x, b[v], acc[r][v]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) _mm512_mask_storeu_ps(C + r * ldc + 16 * v, mask(v), acc[r][v]);
}

using Tile = void (*)(int64_t, const float*, int64_t, int64_t, const float*, int64_t, float*, int64_t, __mmask16, bool);

template <int R, int... V>
constexpr auto row_of_tiles(std::integer_sequence<int, V...>) {
  return std::array<Tile, sizeof...(V)>{&tile_avx512<R, V + 1>...};
}
template <int... R>
constexpr auto tiles(std::integer_sequence<int, R...>) {
  return std::array{row_of_tiles<R + 1>(std::make_integer_sequence<int, kVectors>{})...};
}
// kTiles[R - 1][V - 1]
constexpr auto kTiles = tiles(std::make_integer_sequence<int, kRows>{});

}  // namespace

void chain_product(int64_t M, int64_t N, int64_t K, const StridedRows& A, const float* B, int64_t ldb, float* C,
                   int64_t ldc, bool accumulate) {
  if (M <= 0 || N <= 0) return;
  static const bool avx512 = __builtin_cpu_supports("avx512f");
  if (!avx512) {
    // gemm performs the same chains (gemm.h): A as a row-major matrix or a transposed one
    PM_CHECK(A.depth_step == 1 || A.row_step == 1, "chain_product: A's rows or its columns must be contiguous");
    const bool rows = A.depth_step == 1;
    return gemm(rows ? Trans::no : Trans::yes, Trans::no, M, N, K, A.base, rows ? A.row_step : A.depth_step, B, ldb,
                accumulate ? 1.0f : 0.0f, C, ldc);
  }
  for (int64_t r0 = 0; r0 < M; r0 += kRows) {
    const int R = static_cast<int>(std::min<int64_t>(kRows, M - r0));
    const float* a = A.base + r0 * A.row_step;
    for (int64_t n0 = 0; n0 < N; n0 += 16 * kVectors) {
      const int64_t width = std::min<int64_t>(16 * kVectors, N - n0);
      const int V = static_cast<int>((width + 15) / 16);
      const int64_t tail = width - 16 * (V - 1);
      const __mmask16 last = static_cast<__mmask16>((1u << tail) - 1u);
      kTiles[R - 1][V - 1](K, a, A.row_step, A.depth_step, B + n0, ldb, C + r0 * ldc + n0, ldc, last, accumulate);
    }
  }
}

}  // namespace pm
