// Two GEMM shapes that gemm() runs without packing B, on AVX-512 (gemm_internal.h's
// gemm_unpacked): a C of at most 8 rows from a transposed A, and a shallow depth. The router's two
// backward products have these shapes, and packing B cost them more than the products; every
// element is the panel kernels' chain, so the bits are theirs.
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <functional>

#include "core/error.h"
#include "kernels/cpu/gemm.h"
#include "kernels/cpu/gemm_internal.h"
#include "kernels/cpu/thread_pool.h"

namespace pm {
using namespace gemm_detail;
namespace {

// V vectors of 16 columns of a row N wide from column j, the lanes past N masked off (loads give
// zeros there, stores leave memory alone).
template <int V>
struct MaskedColumns {
  __mmask16 mask[V];
  MaskedColumns(int64_t N, int64_t j) {
    for (int v = 0; v < V; ++v)
      mask[v] = static_cast<__mmask16>((1u << std::clamp<int64_t>(N - j - 16 * v, 0, 16)) - 1u);
  }
  [[gnu::always_inline, gnu::target("avx512f")]] __m512 load(const float* p, int v) const {
    return _mm512_maskz_loadu_ps(mask[v], p + 16 * v);
  }
  [[gnu::always_inline, gnu::target("avx512f")]] void store(float* p, int v, __m512 x) const {
    _mm512_mask_storeu_ps(p + 16 * v, mask[v], x);
  }
};

// C[R, N] (+)= A^T B for a C of at most 8 rows, B's rows read where they are: a router's weight
// gradient (E experts x M model values, the tokens deep) where packing B copied all the tokens'
// inputs (4 MB for 2048 tokens of 512) to multiply them by 8 columns. Each element follows the
// panel kernels' chain, c = fma(a_k, b_k, c) for k = 0..K-1 from C (beta 1) or 0: the same bits.
// 48 columns at a time (R x 3 accumulators), over depth chunks whose rows of B stay in L2 while
// every column block reads them; the first block prefetches each row whole. Without that, a B
// that comes from memory (the layer's input, long evicted by the backward) was read 3 lines per
// row per block: as slow as packing it (2048 x 512, E 8, caches flushed: 1.07 ms either way; with
// the prefetch 0.61-0.66 against 0.87-1.08 packed; warm 0.16 against 0.51).
template <int R>
__attribute__((target("avx512f"))) void skinny_tn_avx512(int64_t j_begin, int64_t j_end, int64_t N, int64_t K,
                                                          const float* A, int64_t lda, const float* B, int64_t ldb,
                                                          float beta, float* C, int64_t ldc) {
  constexpr int64_t kColumns = 48, kDepthChunk = 256, kAhead = 8;
  const int64_t j_last = std::min(N, j_end * kColumns);
  for (int64_t k0 = 0; k0 < K; k0 += kDepthChunk) {
    const int64_t k1 = std::min(K, k0 + kDepthChunk);
    const bool zero_start = beta == 0.0f && k0 == 0;
    for (int64_t j = j_begin * kColumns; j < j_last; j += kColumns) {
      const MaskedColumns<3> cols(N, j);
      __m512 c[R][3];
      for (int i = 0; i < R; ++i)
        for (int v = 0; v < 3; ++v) c[i][v] = zero_start ? _mm512_setzero_ps() : cols.load(C + i * ldc + j, v);
      const bool first_block = j == j_begin * kColumns;
      for (int64_t k = k0; k < k1; ++k) {
        if (first_block && k + kAhead < K)  // whole rows ahead: the next blocks find the chunk in L2
          for (int64_t col = j; col < j_last; col += 16)
            _mm_prefetch(reinterpret_cast<const char*>(B + (k + kAhead) * ldb + col), _MM_HINT_T0);
        __m512 b[3];
        for (int v = 0; v < 3; ++v) b[v] = cols.load(B + k * ldb + j, v);
        for (int i = 0; i < R; ++i) {
          const __m512 a = _mm512_set1_ps(A[k * lda + i]);
          for (int v = 0; v < 3; ++v) c[i][v] = _mm512_fmadd_ps(a, b[v], c[i][v]);
        }
      }
      for (int i = 0; i < R; ++i)
        for (int v = 0; v < 3; ++v) cols.store(C + i * ldc + j, v, c[i][v]);
    }
  }
}

// C[M, N] (+)= A B for a shallow depth (the router's share of the input gradient, dlogits [T, E]
// times Wg^T [E, M], a block of 16 tokens at a time): B's K rows are read in place (a column
// block's K x 64 values stay in L1 across the row groups), where packing them copied more than
// the product computes (E 64: 128 KB for each block of 16 tokens). The panel kernels' chain per
// element, R rows x 4 vectors at a time so that 4R chains are in flight.
template <int R>
__attribute__((target("avx512f"))) void shallow_nn_rows_avx512(int64_t i0, int64_t N, int64_t K, const float* A,
                                                                int64_t lda, const float* B, int64_t ldb, float beta,
                                                                float* C, int64_t ldc) {
  for (int64_t j = 0; j < N; j += 64) {
    const MaskedColumns<4> cols(N, j);
    __m512 c[R][4];
    for (int i = 0; i < R; ++i)
      for (int v = 0; v < 4; ++v) c[i][v] = beta == 0.0f ? _mm512_setzero_ps() : cols.load(C + (i0 + i) * ldc + j, v);
    for (int64_t k = 0; k < K; ++k) {
      __m512 b[4];
      for (int v = 0; v < 4; ++v) b[v] = cols.load(B + k * ldb + j, v);
      for (int i = 0; i < R; ++i) {
        const __m512 a = _mm512_set1_ps(A[(i0 + i) * lda + k]);
        for (int v = 0; v < 4; ++v) c[i][v] = _mm512_fmadd_ps(a, b[v], c[i][v]);
      }
    }
    for (int i = 0; i < R; ++i)
      for (int v = 0; v < 4; ++v) cols.store(C + (i0 + i) * ldc + j, v, c[i][v]);
  }
}

// fn(begin, end) over `count` pieces of a product of `flops`, split over the compute threads when
// that pays (worth_threads, as gemm_packed_impl splits).
void run_split(int64_t count, double flops, const std::function<void(int64_t, int64_t)>& fn) {
  if (worth_threads(flops))
    parallel_for(count, fn);
  else
    fn(0, count);
}

}  // namespace

bool gemm_detail::gemm_unpacked(Trans trans_a, Trans trans_b, int64_t M, int64_t N, int64_t K, const float* A,
                                int64_t lda, const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  if (!isa_is_avx512() || trans_b != Trans::no || K == 0) return false;
  PM_CHECK(beta == 0.0f || beta == 1.0f, "gemm supports beta 0 or 1, got {}", beta);
  const double flops = 2.0 * M * N * K;
  if (trans_a == Trans::yes && M <= 8) {
    run_split((N + 47) / 48, flops, [&](int64_t begin, int64_t end) {
      switch (M) {
        case 1: return skinny_tn_avx512<1>(begin, end, N, K, A, lda, B, ldb, beta, C, ldc);
        case 2: return skinny_tn_avx512<2>(begin, end, N, K, A, lda, B, ldb, beta, C, ldc);
        case 3: return skinny_tn_avx512<3>(begin, end, N, K, A, lda, B, ldb, beta, C, ldc);
        case 4: return skinny_tn_avx512<4>(begin, end, N, K, A, lda, B, ldb, beta, C, ldc);
        case 5: return skinny_tn_avx512<5>(begin, end, N, K, A, lda, B, ldb, beta, C, ldc);
        case 6: return skinny_tn_avx512<6>(begin, end, N, K, A, lda, B, ldb, beta, C, ldc);
        case 7: return skinny_tn_avx512<7>(begin, end, N, K, A, lda, B, ldb, beta, C, ldc);
        default: return skinny_tn_avx512<8>(begin, end, N, K, A, lda, B, ldb, beta, C, ldc);
      }
    });
    return true;
  }
  // a depth of at most 8, or a small product (at most 64 rows and 64 deep)
  if (trans_a == Trans::no && (K <= 8 || (M <= 64 && K <= 64))) {
    run_split((M + 3) / 4, flops, [&](int64_t begin, int64_t end) {  // groups of 4 rows
      for (int64_t i = begin * 4; i < std::min(M, end * 4); i += 4) {
        if (i + 4 <= M) {
          shallow_nn_rows_avx512<4>(i, N, K, A, lda, B, ldb, beta, C, ldc);
          continue;
        }
        for (int64_t r = i; r < M; ++r) shallow_nn_rows_avx512<1>(r, N, K, A, lda, B, ldb, beta, C, ldc);
      }
    });
    return true;
  }
  return false;
}

}  // namespace pm
