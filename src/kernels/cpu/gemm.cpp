#include "kernels/cpu/gemm.h"

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <type_traits>
#include <utility>

#include "core/error.h"
#include "core/tensor.h"
#include "kernels/cpu/gemm_internal.h"
#include "kernels/cpu/thread_pool.h"

namespace pm {
using namespace gemm_detail;
namespace {

// Rows of A per pass over B's panels. Each pass streams every panel slice of B through L2 once, so
// fewer, taller blocks read B fewer times: the weight gradients (B: thousands of rows of
// activations, 16 MB) ran at 78 GFLOP/s with 240 rows and 84 with 516 on Zen 3, the forward shapes
// unchanged at 92-94 (one thread, 2026-12-03).
constexpr int64_t kMBlock = 516;

enum class Isa { scalar, avx2, avx512 };

Isa detect_isa() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f")) return Isa::avx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::avx2;
  return Isa::scalar;
}

Isa g_isa = detect_isa();

int64_t tile_rows(Isa) { return 6; }

// ---- micro-kernels: C[MR][cols] (+)= A[MR][K] * Bp[K][cols], k = 0..K-1 in order ---------------
// A element (i, k) sits at Ap[k * ks + i * is]: a packed micro-panel (ks = MR, is = 1) or rows of
// A read in place (ks = 1, is = lda). Bp: B panel slice (k-major, row stride ldb). zero_start: the
// chain starts from 0 instead of C (beta = 0, first depth block). Every element follows
// c = fma(a_k, b_k, c) for k = 0..K-1: the same on every path. With a bias (zero_start only), the
// chain starts from bias[j] instead of 0 (padded to the tile's width).

// Where kernel_avx512 reads A's element (i, k): a packed micro-panel or rows in place, one stride
// apart (StridedA), or MR rows anywhere, each by its own pointer (RowPointersA: an expert's input
// rows where the all-to-all left them, read without copying them together first).
struct StridedA {
  const float* a;
  int64_t ks, is;
  float at(int64_t k, int i) const { return a[k * ks + i * is]; }
};
template <int MR>
struct RowPointersA {
  const float* row[MR];
  float at(int64_t k, int i) const { return row[i][k]; }
};

template <int MR, int NV, typename ARead>
__attribute__((target("avx512f"))) void kernel_avx512(int64_t K, const ARead A, const float* Bp, int64_t ldb, float* C,
                                                       int64_t ldc, bool zero_start, const float* bias) {
  __m512 c[MR][NV];
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < NV; ++v)
      c[i][v] = !zero_start ? _mm512_loadu_ps(C + i * ldc + 16 * v)
                            : (bias ? _mm512_loadu_ps(bias + 16 * v) : _mm512_setzero_ps());
  for (int64_t k = 0; k < K; ++k) {
    __m512 b[NV];
    for (int v = 0; v < NV; ++v) b[v] = _mm512_loadu_ps(Bp + k * ldb + 16 * v);
    for (int i = 0; i < MR; ++i) {
      __m512 a = _mm512_set1_ps(A.at(k, i));
      for (int v = 0; v < NV; ++v) c[i][v] = _mm512_fmadd_ps(a, b[v], c[i][v]);
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(C + i * ldc + 16 * v, c[i][v]);
}

template <int MR, int NV>
__attribute__((target("avx2,fma"))) void kernel_avx2(int64_t K, const float* Ap, int64_t ks, int64_t is,
                                                      const float* Bp, int64_t ldb, float* C,
                                                      int64_t ldc, bool zero_start, const float* bias) {
  __m256 c[MR][NV];
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < NV; ++v)
      c[i][v] = !zero_start ? _mm256_loadu_ps(C + i * ldc + 8 * v)
                            : (bias ? _mm256_loadu_ps(bias + 8 * v) : _mm256_setzero_ps());
  // The strides of A as constants where they are known (a packed micro-panel, or rows read in
  // place with their depth contiguous): runtime strides left too few registers for the addresses
  // and cost two reloads per depth (packed A ran 2-5% slower than A in place).
  // (the lambda names its target: it does not inherit the function's, and without -march=native
  // the intrinsics would not inline into it)
  auto loop = [&](auto ks_, auto is_) __attribute__((always_inline, target("avx2,fma"))) {
    for (int64_t k = 0; k < K; ++k) {
      __m256 b[NV];
      for (int v = 0; v < NV; ++v) b[v] = _mm256_loadu_ps(Bp + k * ldb + 8 * v);
      for (int i = 0; i < MR; ++i) {
        __m256 a = _mm256_set1_ps(Ap[k * ks_ + i * is_]);
        for (int v = 0; v < NV; ++v) c[i][v] = _mm256_fmadd_ps(a, b[v], c[i][v]);
      }
    }
  };
  using One = std::integral_constant<int64_t, 1>;
  if (ks == MR && is == 1)
    loop(std::integral_constant<int64_t, MR>{}, One{});
  else if (ks == 1)
    loop(One{}, is);
  else
    loop(ks, is);
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < NV; ++v) _mm256_storeu_ps(C + i * ldc + 8 * v, c[i][v]);
}

// A tile of fewer than 6 rows (the last micro-panel of a block; decoding's few rows) over NS
// 16-column strips at once, strip_stride apart: the same chain per element as kernel_avx2, without
// computing padding rows. With one row, one strip would leave two accumulator chains, each FMA
// waiting on the one before (latency-bound); NS strips give the FMA units 2 x R x NS chains.
template <int R, int NS>
__attribute__((target("avx2,fma"))) void kernel_avx2_rows(int64_t K, const float* Ap, int64_t ks, int64_t is,
                                                           const float* Bp, int64_t ldb, int64_t strip_stride,
                                                           float* C, int64_t ldc, bool zero_start, const float* bias) {
  static_assert(R * NS * 2 <= 12, "accumulators beyond the 16 ymm registers");
  __m256 c[R][NS][2];
  for (int i = 0; i < R; ++i)
    for (int s = 0; s < NS; ++s)
      for (int v = 0; v < 2; ++v)
        c[i][s][v] = !zero_start ? _mm256_loadu_ps(C + i * ldc + 16 * s + 8 * v)
                                 : (bias ? _mm256_loadu_ps(bias + 16 * s + 8 * v) : _mm256_setzero_ps());
  auto loop = [&](auto ks_, auto is_) __attribute__((always_inline, target("avx2,fma"))) {
    for (int64_t k = 0; k < K; ++k) {
      __m256 a[R];
      for (int i = 0; i < R; ++i) a[i] = _mm256_set1_ps(Ap[k * ks_ + i * is_]);
      for (int s = 0; s < NS; ++s)
        for (int v = 0; v < 2; ++v) {
          const __m256 b = _mm256_loadu_ps(Bp + s * strip_stride + k * ldb + 8 * v);
          for (int i = 0; i < R; ++i) c[i][s][v] = _mm256_fmadd_ps(a[i], b, c[i][s][v]);
        }
    }
  };
  if (ks == 6 && is == 1)  // a packed micro-panel: what a partial tile always reads
    loop(std::integral_constant<int64_t, 6>{}, std::integral_constant<int64_t, 1>{});
  else
    loop(ks, is);
  for (int i = 0; i < R; ++i)
    for (int s = 0; s < NS; ++s)
      for (int v = 0; v < 2; ++v) _mm256_storeu_ps(C + i * ldc + 16 * s + 8 * v, c[i][s][v]);
}

// rows (1 to 5) x width of a tile with kernel_avx2_rows, as many 16-column groups per call as
// registers allow; group g starts at strip0 + g * strip_stride, its depths ldb apart.
void tile_rows_avx2(int64_t rows, int64_t width, int64_t kc, const float* Ap, int64_t ks, int64_t is,
                    const float* strip0, int64_t S, int64_t strip_stride, float* C, int64_t ldc, bool zero_start,
                    const float* bias) {
  const int64_t per_call = rows == 1 ? 4 : rows == 2 ? 3 : rows == 3 ? 2 : 1;
  for (int64_t col = 0; col < width; col += 16 * per_call) {
    const int64_t strips = std::min(per_call, (width - col) / 16);
    const float* Bp = strip0 + (col / 16) * strip_stride;
    float* Cc = C + col;
    const float* b = bias ? bias + col : nullptr;
    auto call = [&](auto r, auto ns) {
      kernel_avx2_rows<decltype(r)::value, decltype(ns)::value>(kc, Ap, ks, is, Bp, S, strip_stride, Cc, ldc, zero_start, b);
    };
    using std::integral_constant;
    switch (rows * 8 + strips) {
      case 1 * 8 + 1: call(integral_constant<int, 1>{}, integral_constant<int, 1>{}); break;
      case 1 * 8 + 2: call(integral_constant<int, 1>{}, integral_constant<int, 2>{}); break;
      case 1 * 8 + 3: call(integral_constant<int, 1>{}, integral_constant<int, 3>{}); break;
      case 1 * 8 + 4: call(integral_constant<int, 1>{}, integral_constant<int, 4>{}); break;
      case 2 * 8 + 1: call(integral_constant<int, 2>{}, integral_constant<int, 1>{}); break;
      case 2 * 8 + 2: call(integral_constant<int, 2>{}, integral_constant<int, 2>{}); break;
      case 2 * 8 + 3: call(integral_constant<int, 2>{}, integral_constant<int, 3>{}); break;
      case 3 * 8 + 1: call(integral_constant<int, 3>{}, integral_constant<int, 1>{}); break;
      case 3 * 8 + 2: call(integral_constant<int, 3>{}, integral_constant<int, 2>{}); break;
      case 4 * 8 + 1: call(integral_constant<int, 4>{}, integral_constant<int, 1>{}); break;
      case 5 * 8 + 1: call(integral_constant<int, 5>{}, integral_constant<int, 1>{}); break;
      default: PM_CHECK(false, "no kernel for {} rows over {} strips", rows, strips);
    }
  }
}

void kernel_scalar(int64_t MR, int64_t width, int64_t K, const float* Ap, int64_t ks, int64_t is,
                   const float* Bp, int64_t ldb, float* C, int64_t ldc, bool zero_start,
                   const float* bias) {
  for (int64_t i = 0; i < MR; ++i)
    for (int64_t j = 0; j < width; ++j) {
      float c = !zero_start ? C[i * ldc + j] : (bias ? bias[j] : 0.0f);
      for (int64_t k = 0; k < K; ++k) c = std::fma(Ap[k * ks + i * is], Bp[k * ldb + j], c);
      C[i * ldc + j] = c;
    }
}

// Where the micro-kernel reads A from: element (i, k) at a[k * ks + i * is], or (rows not null;
// AVX-512 only) at rows[i][k0 + k].
struct AView {
  const float* a;
  int64_t ks, is;
  const float* const* rows = nullptr;
  int64_t k0 = 0;
};

// Whether run_tile computes a tile of fewer than MR rows by itself (AVX2 and scalar); the AVX-512
// kernels always compute MR rows (a partial tile runs on a padded copy).
bool computes_partial_rows(Isa isa) { return isa != Isa::avx512; }

// How many panels of B make packing A worth its pass. Every panel reads the whole A block again;
// packed, that is one contiguous stream per micro-panel, in place MR short strided streams that the
// prefetcher follows worse. AVX2 (Zen 4, two processes at once, 2026-12-04): packed ran 1.05-1.22x
// faster from 4 panels (N >= 256) and 0.90-0.97x with 2-3. AVX-512 (Intel Xeon family 6 model 207,
// bench/gemm_ab.sh, two processes at once, 2026-12-06): in place ran the experts' products of 8
// panels (N 512, depth 1024: a W2, dh W1^T) in 0.92-0.94x the time, those of 16 (N 1024, depth 512)
// the same (0.99-1.01x), the 2048^3 product of 32 1.01x slower.
int64_t min_panels_to_pack_a(Isa isa) { return isa == Isa::avx512 ? 16 : 4; }

// The same for bf16 rows and the AVX512_BF16 kernel (pairs_in_place below).
#ifndef GEMM_BF16_PAIRS_PANELS
#define GEMM_BF16_PAIRS_PANELS 16
#endif
constexpr int64_t kMinPanelsToPackPairs = GEMM_BF16_PAIRS_PANELS;

// One tile of `rows` (MR, or fewer where computes_partial_rows) x width (a multiple of 16, at most
// 64) of full columns, depths [k0, k0 + kc) of a B panel stored as strips of S columns (PackedB):
// every kernel call reads one strip's rows, ldb = S apart.
void run_tile(Isa isa, int64_t rows, int64_t width, int64_t kc, AView A, const float* panel, int64_t K, int64_t k0,
              int64_t S, float* C, int64_t ldc, bool zero_start, const float* bias) {
  auto strip_at = [&](int64_t col) { return panel + (col / S) * K * S + k0 * S + col % S; };
  auto bias_at = [&](int64_t col) { return bias ? bias + col : nullptr; };
  if (isa == Isa::avx2 && rows < 6) {
    // 16-column groups one strip apart (AVX2's packing), or side by side in one wide strip (a B
    // packed for AVX-512, S = 64: the whole tile is in it)
    PM_CHECK(S == 16 || S >= width, "a tile of {} columns over strips of {}", width, S);
    return tile_rows_avx2(rows, width, kc, A.a, A.ks, A.is, strip_at(0), S, S == 16 ? K * S : 16, C, ldc, zero_start,
                          bias);
  }
  switch (isa) {
    case Isa::avx512: {
      auto tile = [&](const auto a_read) {
        if (S == width) {  // one call for the whole tile
          const float* Bp = strip_at(0);
          switch (width / 16) {
            case 1: return kernel_avx512<6, 1>(kc, a_read, Bp, S, C, ldc, zero_start, bias);
            case 2: return kernel_avx512<6, 2>(kc, a_read, Bp, S, C, ldc, zero_start, bias);
            case 3: return kernel_avx512<6, 3>(kc, a_read, Bp, S, C, ldc, zero_start, bias);
            default: return kernel_avx512<6, 4>(kc, a_read, Bp, S, C, ldc, zero_start, bias);
          }
        }
        for (int64_t col = 0; col < width; col += 16)  // 16-column strips (packed for AVX2)
          kernel_avx512<6, 1>(kc, a_read, strip_at(col), S, C + col, ldc, zero_start, bias_at(col));
      };
      if (!A.rows) return tile(StridedA{A.a, A.ks, A.is});
      const float* const* r = A.rows;
      return tile(RowPointersA<6>{{r[0] + A.k0, r[1] + A.k0, r[2] + A.k0, r[3] + A.k0, r[4] + A.k0, r[5] + A.k0}});
    }
    case Isa::avx2:
      PM_CHECK(A.rows == nullptr, "AVX2 kernels read A packed or strided");
      // 16 ymm registers: 6 rows x 16 columns of accumulators (12), two of B and one broadcast of
      // A; a 3 x 32 tile needed 17 and spilled (2/3 of OpenBLAS's speed on Zen)
      for (int64_t col = 0; col < width; col += 16)
        kernel_avx2<6, 2>(kc, A.a, A.ks, A.is, strip_at(col), S, C + col, ldc, zero_start, bias_at(col));
      return;
    case Isa::scalar:
      PM_CHECK(A.rows == nullptr, "scalar kernels read A packed or strided");
      for (int64_t col = 0; col < width; col += 16)
        kernel_scalar(rows, 16, kc, A.a, A.ks, A.is, strip_at(col), S, C + col, ldc, zero_start, bias_at(col));
      return;
  }
}

// Packs rows [row0, row0 + rows) x depths [k0, k0 + kc) of op(A) into MR-row micro-panels,
// zero-padding the last micro-panel. Reads always run along memory (rows of A, or rows of A^T's
// storage), never down a column: strided reads cost a TLB miss per element on wide matrices.
void pack_a(Trans trans_a, RowSource A, int64_t row0, int64_t rows, int64_t k0, int64_t kc, int64_t MR,
            float* out) {
  const int64_t padded = (rows + MR - 1) / MR * MR;
  PM_CHECK(!A.scale || trans_a == Trans::no, "scaled rows of a transposed A");
  if (trans_a == Trans::no) {
    for (int64_t r = 0; r < padded; r += MR) {
      float* panel = out + r * kc;
      if (MR == 6 && r + MR <= rows) {
        const float* const six[6] = {A.row(row0 + r) + k0,     A.row(row0 + r + 1) + k0, A.row(row0 + r + 2) + k0,
                                     A.row(row0 + r + 3) + k0, A.row(row0 + r + 4) + k0, A.row(row0 + r + 5) + k0};
        interleave6(six, kc, panel, false, A.scale ? A.scale + row0 + r : nullptr);
        continue;
      }
      for (int64_t i = 0; i < MR; ++i) {
        if (r + i < rows) {
          const float* src = A.row(row0 + r + i) + k0;
          if (A.scale) {
            const float g = A.scale[row0 + r + i];
            for (int64_t k = 0; k < kc; ++k) panel[k * MR + i] = g * src[k];
          } else {
            for (int64_t k = 0; k < kc; ++k) panel[k * MR + i] = src[k];
          }
        } else {
          for (int64_t k = 0; k < kc; ++k) panel[k * MR + i] = 0.0f;
        }
      }
    }
    return;
  }
  // op(A)[row0.., k] is contiguous in storage row k. Blocks of 16 depths, and in them chunks of
  // 8 micro-panels' columns: each source row's chunk (48 floats, 3 cache lines) is read whole while
  // every micro-panel of the chunk receives 16 * MR contiguous values. Micro-panel by micro-panel
  // over all 16 rows read each line in 2-3 visits; rows 4 KB apart (a width of 1024 or 2048 floats)
  // share L1's sets, 16 rows overfilled its 12 ways, and each line came from L2 at every visit:
  // the output layer's weight gradient (2048 x 192 x 1536) ran at 0.85x the speed of 2032 x 192.
  constexpr int64_t kDepthBlock = 16, kChunkPanels = 8;
  const int64_t chunk = kChunkPanels * MR;
  for (int64_t kb = 0; kb < kc; kb += kDepthBlock) {
    const int64_t kend = std::min(kc, kb + kDepthBlock);
    const int64_t next_end = std::min(kc, kend + kDepthBlock);
    for (int64_t c = 0; c < padded; c += chunk) {
      const int64_t c_valid = std::min(chunk, rows - c);  // the chunk's columns that exist (> 0: c < rows)
      // The next block's source rows at this chunk's columns, fetched a block ahead: the weight
      // gradients read activations and inputs the forward wrote long before, and the 16 rows' slow
      // streams stalled this loop on its loads. The weight gradients of 32 DeepSeek-style experts
      // from evicted rows: 0.94-0.95x the time (bench/wgrad_cold.cpp).
      for (int64_t k = kend; k < next_end; ++k) {
        const float* next = A.row(k0 + k) + row0 + c;
        for (int64_t j = 0; j < c_valid; j += 16) fetch_into_l1(next + j);
        fetch_into_l1(next + c_valid - 1);
      }
      const int64_t c_end = std::min(padded, c + chunk);
      for (int64_t k = kb; k < kend; ++k) {
        const float* row = A.row(k0 + k) + row0;
        for (int64_t r = c; r < c_end; r += MR) {
          const int64_t valid = std::min(MR, rows - r);
          const float* src = row + r;
          float* dst = out + r * kc + k * MR;
          // a whole micro-panel's row: a fixed-size copy the compiler inlines (the loop below cost
          // the weight gradients' GEMMs up to a few percent, Zen 4 running AVX2)
          if (MR == 6 && valid == 6) {
            std::memcpy(dst, src, 6 * sizeof(float));
            continue;
          }
          for (int64_t i = 0; i < valid; ++i) dst[i] = src[i];
          for (int64_t i = valid; i < MR; ++i) dst[i] = 0.0f;
        }
      }
    }
  }
}

// interleave6's whole blocks of 8 depths; returns how many depths it laid out.
__attribute__((target("avx2"))) int64_t interleave6_avx2(const float* const (&rows)[6], int64_t kc, float* panel,
                                                        bool swap_pairs, const float* scale) {
  __m256 s[6];
  for (int i = 0; i < 6 && scale; ++i) s[i] = _mm256_set1_ps(scale[i]);
  int64_t k = 0;
  for (; k + 8 <= kc; k += 8) {
    __m256 r[8];
    for (int i = 0; i < 6; ++i) {
      const __m256 v = _mm256_loadu_ps(rows[i] + k);
      r[i] = swap_pairs ? _mm256_permute_ps(v, 0xB1) : scale ? _mm256_mul_ps(s[i], v) : v;  // [1 0 3 2]
    }
    r[6] = r[7] = _mm256_setzero_ps();
    transpose_8x8_in_registers(r);
    for (int j = 0; j < 8; ++j) {  // depth k + j: the first 6 values of column j
      float* dst = panel + (k + j) * 6;
      _mm_storeu_ps(dst, _mm256_castps256_ps128(r[j]));
      _mm_storel_pi(reinterpret_cast<__m64*>(dst + 4), _mm256_extractf128_ps(r[j], 1));
    }
  }
  return k;
}

// C's tile kPrefetchTiles tiles down the panel is fetched while this one computes: a tile's C
// rows (6 x 256 bytes, 6 cache lines apart) come from memory, where the hardware prefetcher does
// not follow them, and a tile that loads (beta 1, a second depth block) or writes them (its store
// misses) stalls on each otherwise. Interleaved in a 2-rank layer (2048 tokens, M 512, H 1024,
// 8 experts, docs/BENCHMARKS.md): bf16 0.961x with the next tile, 0.977x of that again two tiles
// ahead (three the same, four worse); fp32 0.976x. Prefetching for a write (prefetchw) was slower
// than a plain prefetch (1.014x), and prefetching only where the tile loads C gained half as much.
constexpr int64_t kPrefetchTiles = 2;
// And this tile's rows in the next panel are fetched into L2 now, a whole pass down the panel
// ahead (where this thread runs that panel): 32 MB of an expert's 192-row
// pieces written straight into rows no copy had touched (GemmExtras::c_rows; a DeepSeek-style
// shape, K 128, N 512, Xeon) took 0.98-1.02x the time of writing each piece into a buffer and
// copying it out with the two-tiles-ahead fetch alone, 0.89x with this one; contiguous C on the
// layer's expert shapes, the same (bench/gemm_ab.sh, docs/BENCHMARKS.md).

// Where the GEMM writes C: one matrix, rows ldc apart, or each row by its pointer
// (GemmExtras::c_rows).
struct CTarget {
  float* C;
  int64_t ldc;
  float* const* rows;
  uint16_t* const* rows16 = nullptr;  // bf16 rows by pointer (GemmExtras::c_rows16)
  bool anywhere() const { return rows || rows16; }
  float* row(int64_t i) const { return rows ? rows[i] : C + i * ldc; }  // (not for rows16)
  // The tile of `valid` rows from row i at column col, as a first row and the distance between its
  // rows; 0: its rows do not lie evenly apart, at least `width` floats, or are bf16 (then it goes
  // through the edge tiles' buffer).
  std::pair<float*, int64_t> tile(int64_t i, int64_t col, int64_t valid, int64_t width) const {
    if (rows16) return {nullptr, 0};
    if (!rows) return {C + i * ldc + col, ldc};
    float* first = rows[i] + col;
    if (valid < 2) return {first, 0};
    const int64_t ld = rows[i + 1] - rows[i];
    bool even = ld >= width;
    for (int64_t r = 2; r < valid && even; ++r) even = rows[i + r] == rows[i] + r * ld;
    return {first, even ? ld : 0};
  }
  // The lines of rows [i, i + valid), columns [col, col + cols), fetched with `fetch`.
  void prefetch(void (*fetch)(const void*), int64_t i, int64_t col, int64_t valid, int64_t cols) const {
    for (int64_t r = 0; r < valid; ++r)
      if (rows16)
        for (int64_t j = 0; j < cols; j += 32) fetch(rows16[i + r] + col + j);
      else
        for (int64_t j = 0; j < cols; j += 16) fetch(row(i + r) + col + j);
  }
  // Row i's `cols` values from column col, from `values` (rounded to bf16 into rows16).
  void put(int64_t i, int64_t col, const float* values, int64_t cols) const {
    if (rows16)
      floats_to_bf16(values, rows16[i] + col, cols);
    else
      std::memcpy(row(i) + col, values, cols * sizeof(float));
  }
};

thread_local FloatBuffer t_packed_a;
thread_local PackedB t_packed_b;

// dst[c][r] = src[r][c] for an 8 x 8 block (row strides in floats).
__attribute__((target("avx2"))) void transpose_8x8_avx2(const float* src, int64_t lds, float* dst, int64_t ldd) {
  __m256 r[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(src + i * lds);
  transpose_8x8_in_registers(r);
  for (int i = 0; i < 8; ++i) _mm256_storeu_ps(dst + i * ldd, r[i]);
}

void transpose_8x8(const float* src, int64_t lds, float* dst, int64_t ldd) {
  static const bool avx2 = __builtin_cpu_supports("avx2");
  if (avx2) return transpose_8x8_avx2(src, lds, dst, ldd);
  for (int i = 0; i < 8; ++i)
    for (int j = 0; j < 8; ++j) dst[j * ldd + i] = src[i * lds + j];
}

}  // namespace

int64_t PackedB::panel_width(int64_t p) const {
  int64_t cols = std::min(kPanel, N - p * kPanel);
  return (cols + 15) / 16 * 16;
}

namespace {

// One panel of a packed op(B) being filled: columns [col0, col0 + cols) of op(B), `width` wide
// (cols rounded up to 16, the tail zero) in strips of `strip` columns (PackedB).
struct PanelSlot {
  int64_t width, col0, cols, strip, K;
  float* dst;
  // Row k of strip s0 (the strip holding column s0): strip_cols(s0) values.
  float* strip_row(int64_t s0, int64_t k) const { return dst + s0 * K + k * strip; }
  int64_t strip_cols(int64_t s0) const { return std::min(strip, width - s0); }
  float& at(int64_t k, int64_t j) const { return dst[(j / strip) * K * strip + k * strip + j % strip]; }
};

// The strip width packing chooses: what the kernels of the current instruction set read best.
int64_t packing_strip() { return g_isa == Isa::avx512 ? kPanel : 16; }

// Sizes `out` for a K x N op(B) and calls fill(slot) once per panel.
template <typename Fill>
void pack_panels(int64_t K, int64_t N, PackedB& out, Fill fill) {
  out.K = K;
  out.N = N;
  out.bf16 = false;
  out.source_depth = K;
  out.strip = packing_strip();
  out.pairs.clear();
  out.data.resize(std::max<int64_t>(1, out.panels() * K * kPanel));
  for (int64_t p = 0; p < out.panels(); ++p) {
    const int64_t col0 = p * kPanel;
    fill(PanelSlot{out.panel_width(p), col0, std::min(kPanel, N - col0), out.strip_of(p), K,
                   out.data.data() + p * K * kPanel});
  }
}

}  // namespace

void gemm_detail::pack_b_rows(int64_t K, int64_t N, RowSource B, PackedB& out, float* column_sums) {
  // Row by row, each row across the panels: B's rows (a weight gradient's output gradients, rows
  // of 2 KB and more) are read front to back, which the hardware prefetcher follows; panel by
  // panel, each row was read in spans of 256 bytes a row apart (as pack_b_pair_words, gemm_bf16_pack.cpp).
  std::vector<PanelSlot> slots;
  pack_panels(K, N, out, [&](const PanelSlot& s) { slots.push_back(s); });
  // Row k + 4 fetched while row k is summed and packed: the rows (output gradients, pre-activation
  // gradients) come by pointer, and 85% of this loop's samples in a DeepSeek-style layer waited on
  // the column sums' loads. From evicted rows 0.968x the weight gradients' time (bench/wgrad_cold).
  constexpr int64_t kRowsAhead = 4;
  thread_local FloatBuffer scaled;  // a scaled source's row k, times its scale (RowSource::scale)
  if (B.scale) scaled.resize(N);
  for (int64_t k = 0; k < K; ++k) {
    const float* src_row = B.row(k);
    if (k + kRowsAhead < K)
      for (int64_t j = 0; j < N; j += 16) fetch_into_l1(B.row(k + kRowsAhead) + j);
    if (B.scale) {
      const float g = B.scale[k];
      for (int64_t j = 0; j < N; ++j) scaled[j] = g * src_row[j];
      src_row = scaled.data();
    }
    if (column_sums)  // row k after rows 0..k-1
      for (int64_t j = 0; j < N; ++j) column_sums[j] += src_row[j];
    for (const PanelSlot& s : slots) {
      const float* src = src_row + s.col0;
      for (int64_t s0 = 0; s0 < s.width; s0 += s.strip) {
        float* row = s.strip_row(s0, k);
        const int64_t n = std::clamp<int64_t>(s.cols - s0, 0, s.strip_cols(s0));
        if (n == 16) {  // a whole AVX2 strip: a fixed-size copy the compiler inlines (no memcpy call per row)
          std::memcpy(row, src + s0, 16 * sizeof(float));
          continue;
        }
        std::memcpy(row, src + s0, n * sizeof(float));
        for (int64_t j = n; j < s.strip_cols(s0); ++j) row[j] = 0.0f;
      }
    }
  }
}

void gemm_detail::pack_b_rows_bf16(int64_t K, int64_t N, RowSource B, PackedB& out) {
  const int64_t K2 = K + (K & 1);
  pack_panels(K2, N, out, [&](const PanelSlot& s) {
    for (int64_t k = 0; k < K2; ++k) {
      const int64_t d = k ^ 1;  // pair order
      for (int64_t s0 = 0; s0 < s.width; s0 += s.strip) {
        float* row = s.strip_row(s0, k);
        const int64_t n = d < K ? std::clamp<int64_t>(s.cols - s0, 0, s.strip_cols(s0)) : 0;
        if (n > 0 && B.is_bf16()) {
          const uint16_t* src = B.row16(d) + s.col0 + s0;
          for (int64_t j = 0; j < n; ++j) row[j] = bf16_to_float(src[j]);
        } else if (n > 0) {
          const float* src = B.row(d) + s.col0 + s0;
          for (int64_t j = 0; j < n; ++j) row[j] = round_to_bf16(src[j]);
        }
        for (int64_t j = n; j < s.strip_cols(s0); ++j) row[j] = 0.0f;
      }
    }
  });
  out.bf16 = true;
  out.source_depth = K;
}

void pack_b(Trans trans_b, int64_t K, int64_t N, const float* B, int64_t ldb, PackedB& out) {
  if (trans_b == Trans::no) return pack_b_rows(K, N, RowSource{B, ldb, nullptr}, out);
  pack_panels(K, N, out, [&](const PanelSlot& s) {
    const int64_t col0 = s.col0, cols = s.cols;
    // op(B)[k, col0 + j] = B[col0 + j, k]: transpose 8 x 8 blocks in registers (a block never
    // straddles two strips: strips are whole multiples of 8); the rest (edge columns, a depth
    // that is not a multiple of 8) element by element.
    const int64_t full_j = cols / 8 * 8, full_k = K / 8 * 8;
    for (int64_t j = 0; j < full_j; j += 8)
      for (int64_t k = 0; k < full_k; k += 8)
        transpose_8x8(B + (col0 + j) * ldb + k, ldb, &s.at(k, j), s.strip);
    for (int64_t k = 0; k < K; ++k) {
      for (int64_t j = (k < full_k ? full_j : 0); j < cols; ++j) s.at(k, j) = B[(col0 + j) * ldb + k];
      for (int64_t j = cols; j < s.width; ++j) s.at(k, j) = 0.0f;
    }
  });
}

void gemm_detail::gemm_packed_impl(Trans trans_a, int64_t M, RowSource A, const PackedB& B, float beta, float* C,
                                   int64_t ldc, const GemmExtras& extras, bool dot) {
  PM_CHECK(beta == 0.0f || beta == 1.0f, "gemm supports beta 0 or 1, got {}", beta);
  PM_CHECK(extras.bias == nullptr || beta == 0.0f, "a bias start needs beta 0");
  PM_CHECK(!A.is_bf16() || B.bf16, "an A stored in bf16 needs a bf16 GEMM");
  PM_CHECK(!extras.a_row_scale || (trans_a == Trans::no && !B.bf16 && !A.is_bf16()),
           "scaled rows of A need an fp32 GEMM of an A not transposed");
  A.scale = extras.a_row_scale;
  const int64_t N = B.N, K = B.K;
  if (M == 0 || N == 0) return;
  const CTarget target{C, ldc, extras.c_rows, extras.c_rows16};
  PM_CHECK(!(extras.c_rows && extras.c_rows16), "C's rows by pointer as floats or as bf16, not both");
  PM_CHECK(!target.anywhere() || (beta == 0.0f && extras.epilogue == nullptr),
           "C's rows by pointer take beta 0, no epilogue");
  if (K == 0) {
    const std::vector<float> zeros(extras.bias ? 0 : N, 0.0f);
    for (int64_t i = 0; i < M && beta == 0.0f; ++i) target.put(i, 0, extras.bias ? extras.bias : zeros.data(), N);
    if (extras.epilogue)
      for (int64_t i = 0; i < M; i += 64) (*extras.epilogue)(i, 0, std::min<int64_t>(64, M - i), N);
    return;
  }
  // (bf16 rows take the sums of a single depth block: deeper ones would round between blocks)
  const int64_t deepest_block = k_block_max(dot ? kKBlockBf16Dot : kKBlock);
  if (target.anywhere() &&
      (g_isa != Isa::avx512 || (B.bf16 && bf16_order_is_amx()) || (target.rows16 && K > deepest_block))) {
    // the kernels that write only a tile's valid rows, and AMX's tiles: into one matrix, then out
    thread_local FloatBuffer whole;
    whole.resize(M * N);
    GemmExtras into_whole = extras;
    into_whole.c_rows = nullptr;
    into_whole.c_rows16 = nullptr;
    gemm_packed_impl(trans_a, M, A, B, 0.0f, whole.data(), N, into_whole, dot);
    for (int64_t i = 0; i < M; ++i) target.put(i, 0, whole.data() + i * N, N);
    return;
  }
  if (B.bf16 && bf16_order_is_amx()) return gemm_amx_order(trans_a, M, A, B, beta, C, ldc, extras);
  if (!dot && B.bf16 && B.data.empty()) {  // packed for the pair words alone (pack_b_bf16), run on the fp32 kernels
    thread_local PackedB panels;
    float_panels_from_words(B, panels);
    return gemm_packed_impl(trans_a, M, A, panels, beta, C, ldc, extras, false);
  }
  // The bias, padded with zeros to whole panels, so the kernels can load full vectors of it.
  thread_local FloatBuffer padded_bias;
  if (extras.bias) {
    padded_bias.assign(B.panels() * kPanel, 0.0f);
    std::memcpy(padded_bias.data(), extras.bias, N * sizeof(float));
  }
  // Thread-local buffers are reached through pointers: the panel loop may run on pool threads.
  const float* bias_base = extras.bias ? padded_bias.data() : nullptr;

  const Isa isa = g_isa;
  const int64_t MR = tile_rows(isa);
  const int64_t m_block = kMBlock / MR * MR;
  // A is packed into micro-panels (one contiguous stream per block) where B has enough panels to
  // pay for the pass of packing (min_panels_to_pack_a), and read in place otherwise (rows given by
  // pointers: on AVX-512, whose kernel reads each of a tile's rows by its pointer). A transposed A,
  // bf16 (A is rounded as it is packed) and scaled rows (scaled as they are packed) are always
  // packed. Scaled in the packing, a DeepSeek-style expert's output gradients (gate * dy, B of 2
  // panels) took 0.85x the time of a scaled copy written first and read in place (a 32 MB copy
  // per pass), and 1.0x that of a scaled copy of each block kept in L2 (bench in docs/BENCHMARKS.md).
  const bool pack = trans_a == Trans::yes || (A.rows != nullptr && isa != Isa::avx512) || B.bf16 ||
                    B.panels() >= min_panels_to_pack_a(isa) || A.scale != nullptr;
  // bf16 rows are pair words already: the AVX512_BF16 kernel reads them in place by the same rule,
  // where the depth is even (an odd depth's last word would take a value past the row)
  const bool pairs_in_place = dot && trans_a == Trans::no && A.is_bf16() && B.source_depth % 2 == 0 &&
                              B.panels() < kMinPanelsToPackPairs && bf16_dot_reads_rows_in_place();
  const float* A_in_place = A.base;
  const int64_t lda = A.ld;
  const int64_t k_block = dot ? kKBlockBf16Dot : kKBlock, k_block_deepest = k_block_max(k_block);
  if (!dot) t_packed_a.resize(m_block * k_block_deepest);
  float* packed_a = t_packed_a.data();
  thread_local std::vector<uint32_t, AlignedAllocator<uint32_t>> t_packed_pairs;
  if (dot) t_packed_pairs.resize(m_block * k_block_deepest / 2);
  uint32_t* packed_pairs = t_packed_pairs.data();
  const bool parallel = worth_threads(2.0 * M * N * K);

  for (int64_t row0 = 0; row0 < M; row0 += m_block) {
    const int64_t rows = std::min(m_block, M - row0);
    for (int64_t k0 = 0, kc = 0; k0 < K; k0 += kc) {
      kc = K - k0 <= k_block_deepest ? K - k0 : k_block;
      const bool zero_start = beta == 0.0f && k0 == 0;
      const bool last_depth = k0 + kc == K;
      if (dot && !pairs_in_place) {
        pack_a_pairs(trans_a, A, row0, rows, k0, kc, B.source_depth, MR, packed_pairs);  // kc is even: K and k0 are
      } else if (dot) {
        const int64_t full = rows / MR * MR;  // the last, partial micro-panel packed with zero rows
        if (full < rows)
          pack_a_pairs(trans_a, A, row0 + full, rows - full, k0, kc, B.source_depth, MR, packed_pairs + full * kc / 2);
      } else if (B.bf16) {
        pack_a_bf16(trans_a, A, row0, rows, k0, kc, B.source_depth, MR, packed_a);
      } else if (pack) {
        pack_a(trans_a, A, row0, rows, k0, kc, MR, packed_a);
      } else if (rows % MR) {
        // the last, partial micro-panel is packed with zero rows so the kernel can run on it
        int64_t full = rows / MR * MR;
        pack_a(trans_a, A, row0 + full, rows - full, k0, kc, MR, packed_a + full * kc);
      }
      auto a_view = [&](int64_t r) -> AView {
        if (pack || r + MR > rows) return {packed_a + r * kc, MR, 1};
        if (A.rows) return {nullptr, 0, 0, A.rows + row0 + r, k0};
        return {A_in_place + (row0 + r) * lda + k0, 1, lda};
      };
      // A's rows by pointer, read in place (not packed): the next tile's rows, this depth block,
      // are fetched into L2 while a tile runs down the thread's first panel. They lie anywhere,
      // where the hardware prefetcher starts over at each one, and come from memory on that first
      // panel (the later panels find them in L2). Rows one after another (a router's inputs) it
      // follows: fetching those too made the router's product slower.
      const bool a_in_place = ((dot && pairs_in_place) || (!dot && !pack)) && (A.rows || A.rows16);
      auto fetch_next_rows_of_a = [&](int64_t r) {
        const int64_t end = std::min(rows / MR * MR, r + 2 * MR);  // whole micro-panels: the rest is packed
        for (int64_t i = r + MR; i < end; ++i) {
          const char* row = dot ? reinterpret_cast<const char*>(A.row16(row0 + i) + k0)
                                : reinterpret_cast<const char*>(A.rows[row0 + i] + k0);
          const int64_t bytes = kc * (dot ? 2 : 4);
          for (int64_t b = 0; b < bytes; b += 64) fetch_into_l2(row + b);
        }
      };
      auto panels = [&](int64_t p_begin, int64_t p_end) {
        alignas(64) float edge[6 * kPanel];
        for (int64_t p = p_begin; p < p_end; ++p) {
          const int64_t width = B.panel_width(p), col0 = p * kPanel;
          const int64_t cols = std::min(kPanel, N - col0);
          const uint32_t* Bwords = dot ? B.pair_panel(p) + k0 / 2 * width : nullptr;
          const float* bias = bias_base ? bias_base + col0 : nullptr;
          // rows of the tile computed: all MR, or only the valid ones where the kernels can
          const bool partial = !dot && computes_partial_rows(isa);
          auto tile = [&](int64_t r, int64_t valid, float* Cd, int64_t ldd) {
            if (dot && pairs_in_place && r + MR <= rows) {
              const uint16_t* const six[6] = {A.row16(row0 + r) + k0,     A.row16(row0 + r + 1) + k0,
                                              A.row16(row0 + r + 2) + k0, A.row16(row0 + r + 3) + k0,
                                              A.row16(row0 + r + 4) + k0, A.row16(row0 + r + 5) + k0};
              run_tile_bf16(width, kc / 2, six, Bwords, B, Cd, ldd, zero_start, bias);
            } else if (dot) {
              run_tile_bf16(width, kc / 2, packed_pairs + r * kc / 2, Bwords, B, Cd, ldd, zero_start, bias);
            } else
              run_tile(isa, partial ? valid : MR, width, kc, a_view(r), B.panel(p), K, k0, B.strip_of(p), Cd, ldd,
                       zero_start, bias);
          };
          for (int64_t r = 0; r < rows; r += MR) {
            const int64_t valid = std::min(MR, rows - r);
            const auto [Ct, ld] = target.tile(row0 + r, col0, valid, width);
            if (r + kPrefetchTiles * MR < rows)
              target.prefetch(fetch_into_l1, row0 + r + kPrefetchTiles * MR, col0,
                              std::min(MR, rows - r - kPrefetchTiles * MR), cols);
            if (p + 1 < p_end)  // this tile's rows in the next panel, into L2 (the comment after kPrefetchTiles)
              target.prefetch(fetch_into_l2, row0 + r, col0 + kPanel, valid, std::min(kPanel, N - col0 - kPanel));
            if (a_in_place && p == p_begin) fetch_next_rows_of_a(r);
            if (ld != 0 && cols == width && (valid == MR || partial)) {
              tile(r, valid, Ct, ld);  // in place: a partial tile reads and writes only its valid rows
            } else {
              // Edge tile: run the same kernel on a padded copy, keep the valid part. (A zero start
              // reads no C: every tile of bf16 rows comes this way.)
              for (int64_t i = 0; i < MR && !zero_start; ++i)
                for (int64_t j = 0; j < width; ++j)
                  edge[i * width + j] = (i < valid && j < cols) ? target.row(row0 + r + i)[col0 + j] : 0.0f;
              tile(r, valid, edge, width);
              for (int64_t i = 0; i < valid; ++i) target.put(row0 + r + i, col0, edge + i * width, cols);
            }
            if (last_depth && extras.epilogue) (*extras.epilogue)(row0 + r, col0, valid, cols);
          }
        }
      };
      if (parallel)
        parallel_for(B.panels(), panels);
      else
        panels(0, B.panels());
    }
  }
}

bool gemm_detail::isa_is_avx512() { return g_isa == Isa::avx512; }

bool gemm_detail::worth_threads(double flops) { return compute_threads() > 1 && flops > 1.6e7; }

PackedB& gemm_detail::scratch_packed_b() { return t_packed_b; }

void gemm_detail::interleave6(const float* const (&rows)[6], int64_t kc, float* panel, bool swap_pairs,
                              const float* scale) {
  static const bool avx2 = __builtin_cpu_supports("avx2");
  PM_CHECK(!(swap_pairs && scale), "interleave6 scales float rows only");
  for (int64_t k = avx2 ? interleave6_avx2(rows, kc, panel, swap_pairs, scale) : 0; k < kc; ++k)
    for (int i = 0; i < 6; ++i) {
      const float v = rows[i][swap_pairs ? k ^ 1 : k];
      panel[k * 6 + i] = scale ? scale[i] * v : v;
    }
}

void gemm_packed(Trans trans_a, int64_t M, const float* A, int64_t lda, const PackedB& B, float beta,
                 float* C, int64_t ldc, const GemmExtras& extras) {
  gemm_packed_impl(trans_a, M, RowSource{A, lda, nullptr}, B, beta, C, ldc, extras, use_bf16_dot(B));
}

void gemm_packed_rows(int64_t M, const float* const* a_rows, const PackedB& B, float beta, float* C, int64_t ldc,
                      const GemmExtras& extras) {
  gemm_packed_impl(Trans::no, M, RowSource{nullptr, 0, a_rows}, B, beta, C, ldc, extras, use_bf16_dot(B));
}

void gemm(Trans trans_a, Trans trans_b, int64_t M, int64_t N, int64_t K, const float* A, int64_t lda,
          const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  if (M == 0 || N == 0) return;
  if (gemm_unpacked(trans_a, trans_b, M, N, K, A, lda, B, ldb, beta, C, ldc)) return;  // (gemm_unpacked.cpp)
  pack_b(trans_b, K, N, B, ldb, t_packed_b);
  gemm_packed(trans_a, M, A, lda, t_packed_b, beta, C, ldc);
}

void gemm_bias(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb,
               const float* bias, float* C, int64_t ldc) {
  if (M == 0 || N == 0) return;
  if (M <= 64 || K <= 64) {  // where gemm may run unpacked (gemm_unpacked.cpp), which takes no bias
    for (int64_t i = 0; i < M && bias; ++i) std::memcpy(C + i * ldc, bias, N * sizeof(float));
    return gemm(Trans::no, Trans::no, M, N, K, A, lda, B, ldb, bias ? 1.0f : 0.0f, C, ldc);
  }
  pack_b(Trans::no, K, N, B, ldb, t_packed_b);
  gemm_packed(Trans::no, M, A, lda, t_packed_b, 0.0f, C, ldc, {bias, nullptr});
}

void gemm_tn_rows(int64_t M, int64_t N, int64_t K, const float* const* a_rows, const float* const* b_rows,
                  float beta, float* C, int64_t ldc, float* b_column_sums, const float* b_row_scale) {
  const RowSource B{nullptr, 0, b_rows, nullptr, nullptr, b_row_scale};
  if (M == 0 || N == 0) return add_rows_in_order(K, N, B, b_column_sums);
  pack_b_rows(K, N, B, t_packed_b, b_column_sums);
  gemm_packed_impl(Trans::yes, M, RowSource{nullptr, 0, a_rows}, t_packed_b, beta, C, ldc, {}, false);
}

std::string gemm_isa() {
  switch (g_isa) {
    case Isa::avx512: return "avx512";
    case Isa::avx2: return "avx2";
    case Isa::scalar: return "scalar";
  }
  return "?";
}

void force_gemm_isa(const std::string& isa) {
  Isa best = detect_isa();
  if (isa.empty()) {
    g_isa = best;
  } else if (isa == "avx2") {
    PM_CHECK(best != Isa::scalar, "this CPU has no AVX2");
    g_isa = Isa::avx2;
  } else if (isa == "scalar") {
    g_isa = Isa::scalar;
  } else {
    PM_CHECK(isa == "avx512" && best == Isa::avx512, "cannot use gemm instruction set '{}'", isa);
    g_isa = Isa::avx512;
  }
}

}  // namespace pm
