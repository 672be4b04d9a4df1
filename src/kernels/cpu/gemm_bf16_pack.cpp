// Operands of bf16 GEMMs in bf16 form (gemm_bf16.cpp runs them): rounded to bf16 as they are
// packed, either as float panels in pair order (what the fp32 kernels read on CPUs without
// AVX512_BF16) or as vdpbf16ps's 32-bit pair words (the even depth in the low half), straight from
// the source rows where the AVX512_BF16 kernel runs.
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "core/bf16_lanes.h"
#include "core/error.h"
#include "core/tensor.h"
#include "kernels/cpu/gemm.h"
#include "kernels/cpu/gemm_internal.h"

namespace pm {
using namespace gemm_detail;
namespace {

// A float rounded to bf16 (float_to_bf16's rule: nearest even, NaN to 0x7fc0) in the high half of
// a word, the low half zero. Branch-free, so that the loops below vectorise.
inline uint32_t rounded_high(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, 4);
  const bool nan = (bits & 0x7fffffffu) > 0x7f800000u;
  const uint32_t rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) & 0xffff0000u;
  return nan ? 0x7fc00000u : rounded;
}

// A value as the float it stands for (bf16 widened exactly).
inline float widened(float v) { return v; }
inline float widened(uint16_t v) { return bf16_to_float(v); }

// out[j] = the pair word of even[j] and odd[j] (odd null: a zero odd member), rounded to bf16.
void pair_words(const float* even, const float* odd, int64_t n, uint32_t* out) {
  int64_t j = 0;
  if (odd) {
#if defined(__AVX512BW__)
    for (; j + 16 <= n; j += 16)
      _mm512_storeu_si512(out + j, pair_words16(_mm512_loadu_ps(even + j), _mm512_loadu_ps(odd + j)));
#endif
    for (; j < n; ++j) out[j] = rounded_high(odd[j]) | (rounded_high(even[j]) >> 16);
  } else {
    for (; j < n; ++j) out[j] = rounded_high(even[j]) >> 16;
  }
}
void pair_words(const uint16_t* even, const uint16_t* odd, int64_t n, uint32_t* out) {
  if (odd)
    for (int64_t j = 0; j < n; ++j) out[j] = (static_cast<uint32_t>(odd[j]) << 16) | even[j];
  else
    for (int64_t j = 0; j < n; ++j) out[j] = even[j];
}

// 16 depths of a float row at a time as 8 pair words (floats16_to_bf16's 16 bf16 values in order
// are the words, the even depth low); returns the pairs written.
__attribute__((target("avx512f"))) int64_t row_pair_words_avx512(const float* src, int64_t full, uint32_t* out) {
  int64_t q = 0;
  for (; q + 8 <= full; q += 8)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + q), floats16_to_bf16(_mm512_loadu_ps(src + 2 * q)));
  return q;
}

// The `pairs` words of one row's depths [0, have) (zero past them): consecutive depths pair up.
void row_pair_words(const float* src, int64_t have, int64_t pairs, uint32_t* out) {
  static const bool avx512 = __builtin_cpu_supports("avx512f");
  const int64_t full = have / 2;
  for (int64_t q = avx512 ? row_pair_words_avx512(src, full, out) : 0; q < full; ++q) out[q] = rounded_high(src[2 * q + 1]) | (rounded_high(src[2 * q]) >> 16);
  if (have % 2) out[full] = rounded_high(src[have - 1]) >> 16;
  std::fill(out + (have + 1) / 2, out + pairs, 0u);
}
void row_pair_words(const uint16_t* src, int64_t have, int64_t pairs, uint32_t* out) {
  // a bf16 row in memory is already its pair words (little-endian: the even depth in the low half)
  std::memcpy(out, src, have * sizeof(uint16_t));
  std::memset(reinterpret_cast<char*>(out) + have * sizeof(uint16_t), 0, (2 * pairs - have) * sizeof(uint16_t));
}

// Six float rows' first `pairs` / 8 * 8 depth pairs as one micro-panel of pair words
// (panel[q * 6 + i] = the word of rows[i][2q], rows[i][2q + 1]), in one pass: 16 depths of each
// row rounded in a register (floats16_to_bf16, core/bf16_lanes.h), narrowed to 8 words and
// transposed with the other rows' (interleave6's register transpose). Returns the pairs laid out.
// Rounding rows into a buffer first and interleaving it after took 0.8 ns a value: a bf16 GEMM
// whose A is float (the input gradient's second product, from dh) spent 3.5% of a bf16 layer there.
__attribute__((target("avx512f"))) int64_t pair_words_x6_avx512(const float* const (&rows)[6], int64_t pairs,
                                                                uint32_t* panel) {
  int64_t q = 0;
  for (; q + 8 <= pairs; q += 8) {
    __m256 r[8];
    for (int i = 0; i < 6; ++i)  // 16 bf16 = 8 words, even depth low
      r[i] = _mm256_castsi256_ps(floats16_to_bf16(_mm512_loadu_ps(rows[i] + 2 * q)));
    r[6] = r[7] = _mm256_setzero_ps();
    transpose_8x8_in_registers(r);
    for (int j = 0; j < 8; ++j) {  // pair q + j: the first 6 words of column j
      float* dst = reinterpret_cast<float*>(panel + (q + j) * 6);
      _mm_storeu_ps(dst, _mm256_castps256_ps128(r[j]));
      _mm_storel_pi(reinterpret_cast<__m64*>(dst + 4), _mm256_extractf128_ps(r[j], 1));
    }
  }
  return q;
}

// A transposed A's block of `lines` depth lines (depths or depth pairs) from line `first` on, each
// [padded] values over the block's rows, into the micro-panels of `out` ([padded / MR][depth][MR]):
// MR values per micro-panel and line.
template <typename T>
void lines_into_micro_panels(const T* block, int64_t first, int64_t lines, int64_t padded, int64_t MR, int64_t depth,
                             T* out) {
  for (int64_t r = 0; r < padded; r += MR)
    for (int64_t l = 0; l < lines; ++l) {
      const T* src = block + l * padded + r;
      T* dst = out + r * depth + (first + l) * MR;
      if (MR == 6)
        std::memcpy(dst, src, 6 * sizeof(T));  // a fixed size: inlined moves
      else
        std::memcpy(dst, src, MR * sizeof(T));
    }
}

// panel[k * MR + i] = rows[i * kc + (k ^ 1)] for k < kc (even): MR rounded rows laid out as one
// pair-swapped micro-panel.
void interleave_pair_swapped(const float* rows, int64_t MR, int64_t kc, float* panel) {
  if (MR == 6) {
    const float* const six[6] = {rows, rows + kc, rows + 2 * kc, rows + 3 * kc, rows + 4 * kc, rows + 5 * kc};
    return interleave6(six, kc, panel, true);
  }
  for (int64_t k = 0; k < kc; ++k)
    for (int64_t i = 0; i < MR; ++i) panel[k * MR + i] = rows[i * kc + (k ^ 1)];
}

// A transposed A's depth pairs [first, first + count) as lines of words over its rows (words[l *
// padded + r]: the word of op(A)[row0 + r] at depths k0 + 2 (first + l), + 1), zero past the `have`
// depths and the `rows` rows: what both packings of a transposed A lay out from.
void transposed_pair_lines(RowSource A, int64_t row0, int64_t rows, int64_t padded, int64_t k0, int64_t have,
                           int64_t first, int64_t count, uint32_t* words) {
  // The storage rows two pairs on, this span of them, fetched while a pair is made: a weight
  // gradient's activations lie wherever the forward left them (an expert's inputs in the
  // all-to-all's rows), so the hardware prefetcher starts over at each row.
  constexpr int64_t kPairsAhead = 2;
  const int64_t span_bytes = rows * (A.is_bf16() ? 2 : 4);
  auto fetch_row = [&](int64_t d) {
    const char* r = A.is_bf16() ? reinterpret_cast<const char*>(A.row16(k0 + d) + row0)
                                : reinterpret_cast<const char*>(A.row(k0 + d) + row0);
    for (int64_t b = 0; b < span_bytes; b += 64) fetch_into_l1(r + b);
  };
  for (int64_t l = 0; l < count; ++l) {
    uint32_t* dst = words + l * padded;
    const int64_t even = 2 * (first + l), odd = even + 1;
    for (int64_t d = even + 2 * kPairsAhead; d < std::min(even + 2 * kPairsAhead + 2, have); ++d) fetch_row(d);
    if (even >= have) {
      std::fill(dst, dst + padded, 0u);
      continue;
    }
    if (A.is_bf16())
      pair_words(A.row16(k0 + even) + row0, odd < have ? A.row16(k0 + odd) + row0 : nullptr, rows, dst);
    else
      pair_words(A.row(k0 + even) + row0, odd < have ? A.row(k0 + odd) + row0 : nullptr, rows, dst);
    std::fill(dst + rows, dst + padded, 0u);
  }
}

// The 16 x 16 words of r transposed in registers: lane j of r[i] goes to lane i of r[j].
__attribute__((target("avx512f"))) inline void transpose_16x16_words(__m512i (&r)[16]) {
  const __mmask16 all = 0xffff;  // (masked forms: GCC 12 warns of the plain ones' undefined source)
  const __mmask8 all8 = 0xff;
  __m512i t[16];
  for (int i = 0; i < 16; i += 2) {  // per 128-bit lane: rows i, i + 1 interleaved
    t[i] = _mm512_maskz_unpacklo_epi32(all, r[i], r[i + 1]);
    t[i + 1] = _mm512_maskz_unpackhi_epi32(all, r[i], r[i + 1]);
  }
  for (int g = 0; g < 16; g += 4) {  // r[g + m], 128-bit lane L: rows g..g + 3 of column 4L + m
    r[g] = _mm512_maskz_unpacklo_epi64(all8, t[g], t[g + 2]);
    r[g + 1] = _mm512_maskz_unpackhi_epi64(all8, t[g], t[g + 2]);
    r[g + 2] = _mm512_maskz_unpacklo_epi64(all8, t[g + 1], t[g + 3]);
    r[g + 3] = _mm512_maskz_unpackhi_epi64(all8, t[g + 1], t[g + 3]);
  }
  for (int m = 0; m < 4; ++m) {  // the 4 x 4 transpose of 128-bit lanes: column 4L + m from lane L of each
    const __m512i x0 = _mm512_maskz_shuffle_i32x4(all, r[m], r[4 + m], 0x44);
    const __m512i x1 = _mm512_maskz_shuffle_i32x4(all, r[m], r[4 + m], 0xee);
    const __m512i x2 = _mm512_maskz_shuffle_i32x4(all, r[8 + m], r[12 + m], 0x44);
    const __m512i x3 = _mm512_maskz_shuffle_i32x4(all, r[8 + m], r[12 + m], 0xee);
    t[m] = _mm512_maskz_shuffle_i32x4(all, x0, x2, 0x88);
    t[4 + m] = _mm512_maskz_shuffle_i32x4(all, x0, x2, 0xdd);
    t[8 + m] = _mm512_maskz_shuffle_i32x4(all, x1, x3, 0x88);
    t[12 + m] = _mm512_maskz_shuffle_i32x4(all, x1, x3, 0xdd);
  }
  for (int i = 0; i < 16; ++i) r[i] = t[i];
}

// 16 values of a storage row of A from column `col` as bf16 (`valid` of them, zeros after; a null
// row: zeros), rounded as float_to_bf16 rounds where the row is float.
__attribute__((target("avx512f,avx512bw,avx512vl"))) inline __m512i widened_bf16x16(RowSource A, int64_t row,
                                                                                     bool present, int64_t col,
                                                                                     __mmask16 valid) {
  if (!present) return _mm512_setzero_si512();
  const __m256i h = A.is_bf16() ? _mm256_maskz_loadu_epi16(valid, A.row16(row) + col)
                                : floats16_to_bf16(_mm512_maskz_loadu_ps(valid, A.row(row) + col));
  return _mm512_maskz_cvtepu16_epi32(0xffff, h);
}

// pack_a_row_words of a transposed A (a weight gradient's activations), 16 depth pairs by 16 rows
// at a time: the 32 storage rows' 16 values read, made into words and transposed in registers, each
// of the 16 rows' 16 words stored as one 64-byte line. The scalar path went through a buffer of
// words and moved them one at a time: the amx order's layer backward 0.985x the time with this
// (10 interleaved rounds). Reading each storage row whole, all of A's rows packed at once, was no
// faster (1.013x): the packed block no longer stayed in L2 for the tiles. pairs: a multiple of 16.
__attribute__((target("avx512f,avx512bw,avx512vl"))) void transposed_row_words_avx512(
    RowSource A, int64_t row0, int64_t rows, int64_t k0, int64_t have, int64_t pairs, int64_t padded_rows,
    uint32_t* out) {
  for (int64_t qb = 0; qb < pairs; qb += 16)
    for (int64_t i0 = 0; i0 < padded_rows; i0 += 16) {
      const int64_t n = std::clamp<int64_t>(rows - i0, 0, 16), col = row0 + i0;
      const __mmask16 valid = static_cast<__mmask16>((1u << n) - 1);
      __m512i r[16];
      // the next block's 32 storage rows, a line each per 64 bytes of this span: the spans are a row
      // apart, which the hardware prefetcher does not follow (the layer's backward 0.979x the time,
      // 10 interleaved rounds; its weight gradients' products alone 0.97-1.00x)
      if (qb + 16 < pairs && (!A.is_bf16() || i0 % 32 == 0))
        for (int64_t d = 2 * (qb + 16); d < std::min(2 * (qb + 32), have); ++d)
          A.is_bf16() ? __builtin_prefetch(A.row16(k0 + d) + col) : __builtin_prefetch(A.row(k0 + d) + col);
      for (int l = 0; l < 16; ++l) {
        const int64_t even = 2 * (qb + l), odd = even + 1;
        const __m512i low = widened_bf16x16(A, k0 + even, n > 0 && even < have, col, valid);
        const __m512i high = widened_bf16x16(A, k0 + odd, n > 0 && odd < have, col, valid);
        r[l] = _mm512_or_si512(low, _mm512_maskz_slli_epi32(0xffff, high, 16));
      }
      transpose_16x16_words(r);
      for (int i = 0; i < 16; ++i) _mm512_storeu_si512(out + (i0 + i) * pairs + qb, r[i]);
    }
}

}  // namespace

void gemm_detail::pack_a_bf16(Trans trans_a, RowSource A, int64_t row0, int64_t rows, int64_t k0, int64_t kc,
                              int64_t depth, int64_t MR, float* out) {
  const int64_t padded = (rows + MR - 1) / MR * MR;
  const int64_t have = std::clamp<int64_t>(depth - k0, 0, kc);  // depths of this block the source has
  // n values of a source row from `col`, rounded (one vectorised pass), then zeros up to `width`
  auto round_row = [&](int64_t row, int64_t col, int64_t n, int64_t width, float* dst) {
    if (n > 0 && A.is_bf16()) {
      const uint16_t* src = A.row16(row) + col;
      for (int64_t k = 0; k < n; ++k) dst[k] = bf16_to_float(src[k]);
    } else if (n > 0) {
      const float* src = A.row(row) + col;
      for (int64_t k = 0; k < n; ++k) dst[k] = round_to_bf16(src[k]);
    }
    std::fill(dst + n, dst + width, 0.0f);
  };
  thread_local std::vector<float> rounded;
  if (trans_a == Trans::no) {
    // each micro-panel's MR rows rounded ([MR][kc]), then laid out pair-swapped
    rounded.resize(MR * kc);
    for (int64_t r = 0; r < padded; r += MR) {
      const int64_t valid = std::min(MR, rows - r);
      for (int64_t i = 0; i < MR; ++i) round_row(row0 + r + i, k0, i < valid ? have : 0, kc, rounded.data() + i * kc);
      interleave_pair_swapped(rounded.data(), MR, kc, out + r * kc);
    }
    return;
  }
  // op(A)[row, d] is contiguous in storage row d. Blocks of 16 depths: each depth's span of this
  // block's rows rounded in one pass ([16][padded], in L1), then MR values per micro-panel and depth.
  constexpr int64_t kDepthBlock = 16;
  rounded.resize(kDepthBlock * padded);
  for (int64_t kb = 0; kb < kc; kb += kDepthBlock) {
    const int64_t kend = std::min(kc, kb + kDepthBlock);  // even, as kc: k ^ 1 stays in the block
    for (int64_t k = kb; k < kend; ++k) {
      const int64_t d = k ^ 1;
      round_row(k0 + d, row0, d < have ? rows : 0, padded, rounded.data() + (k - kb) * padded);
    }
    lines_into_micro_panels(rounded.data(), kb, kend - kb, padded, MR, kc, out);
  }
}

void gemm_detail::pack_a_pairs(Trans trans_a, RowSource A, int64_t row0, int64_t rows, int64_t k0, int64_t kc,
                               int64_t depth, int64_t MR, uint32_t* out) {
  const int64_t padded = (rows + MR - 1) / MR * MR, pairs = kc / 2;
  const int64_t have = std::clamp<int64_t>(depth - k0, 0, kc);  // depths of this block the source has
  thread_local std::vector<uint32_t> words;
  static const bool avx512 = __builtin_cpu_supports("avx512f");
  if (trans_a == Trans::no) {
    // each micro-panel's MR rows as words ([MR][pairs]), then interleaved ([pairs][MR])
    words.resize(MR * pairs);
    for (int64_t r = 0; r < padded; r += MR) {
      const int64_t valid = std::min(MR, rows - r);
      if (MR == 6 && valid == 6 && have == kc && A.is_bf16()) {
        // bf16 rows are their pair words already: interleaved straight from the source rows (no
        // copy into `words` first)
        const uint16_t* src[6];
        const float* six[6];
        for (int i = 0; i < 6; ++i) {
          src[i] = A.row16(row0 + r + i) + k0;
          six[i] = reinterpret_cast<const float*>(src[i]);
        }
        const int64_t whole = pairs / 8 * 8;  // interleave6's register transposes move the bits as floats
        interleave6(six, whole, reinterpret_cast<float*>(out + r * pairs), false);
        for (int64_t q = whole; q < pairs; ++q)
          for (int i = 0; i < 6; ++i) std::memcpy(out + r * pairs + q * 6 + i, src[i] + 2 * q, sizeof(uint32_t));
        continue;
      }
      if (MR == 6 && valid == 6 && have == kc && avx512) {
        const float* six[6];
        for (int i = 0; i < 6; ++i) six[i] = A.row(row0 + r + i) + k0;
        uint32_t* panel = out + r * pairs;
        for (int64_t q = pair_words_x6_avx512(six, pairs, panel); q < pairs; ++q)
          for (int i = 0; i < 6; ++i) panel[q * 6 + i] = rounded_high(six[i][2 * q + 1]) | (rounded_high(six[i][2 * q]) >> 16);
        continue;
      }
      for (int64_t i = 0; i < MR; ++i) {
        uint32_t* dst = words.data() + i * pairs;
        if (i >= valid)
          std::fill(dst, dst + pairs, 0u);
        else if (A.is_bf16())
          row_pair_words(A.row16(row0 + r + i) + k0, have, pairs, dst);
        else
          row_pair_words(A.row(row0 + r + i) + k0, have, pairs, dst);
      }
      uint32_t* panel = out + r * pairs;
      int64_t q = 0;
      if (MR == 6) {
        // whole blocks of 8 pairs through interleave6's register transposes (AVX2: the words' bits
        // are moved as floats, never computed with)
        const float* six[6];
        for (int i = 0; i < 6; ++i) six[i] = reinterpret_cast<const float*>(words.data() + i * pairs);
        q = pairs / 8 * 8;
        interleave6(six, q, reinterpret_cast<float*>(panel), false);
      }
      for (; q < pairs; ++q)
        for (int64_t i = 0; i < MR; ++i) panel[q * MR + i] = words[i * pairs + q];
    }
    return;
  }
  // op(A)[row, d] is storage row d: blocks of 16 depth pairs, each pair's span of this block's rows
  // as words ([16][padded], in L1), then MR words per micro-panel and pair.
  constexpr int64_t kPairBlock = 16;
  words.resize(kPairBlock * padded);
  for (int64_t qb = 0; qb < pairs; qb += kPairBlock) {
    const int64_t qend = std::min(pairs, qb + kPairBlock);
    transposed_pair_lines(A, row0, rows, padded, k0, have, qb, qend - qb, words.data());
    lines_into_micro_panels(words.data(), qb, qend - qb, padded, MR, pairs, out);
  }
}

void gemm_detail::pack_a_row_words(Trans trans_a, RowSource A, int64_t row0, int64_t rows, int64_t k0, int64_t kc,
                                   int64_t depth, int64_t padded_rows, uint32_t* out) {
  const int64_t pairs = kc / 2;
  const int64_t have = std::clamp<int64_t>(depth - k0, 0, kc);  // depths of this block the source has
  if (trans_a == Trans::no) {
    for (int64_t i = 0; i < padded_rows; ++i) {
      uint32_t* dst = out + i * pairs;
      if (i >= rows)
        std::fill(dst, dst + pairs, 0u);
      else if (A.is_bf16())
        row_pair_words(A.row16(row0 + i) + k0, have, pairs, dst);
      else
        row_pair_words(A.row(row0 + i) + k0, have, pairs, dst);
    }
    return;
  }
  // op(A)[row, d] is storage row d
  static const bool avx512bw = __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
  if (avx512bw && pairs % 16 == 0) return transposed_row_words_avx512(A, row0, rows, k0, have, pairs, padded_rows, out);
  // blocks of 16 depth pairs, each pair's words over the rows ([16][padded_rows], in L1), then
  // transposed into the rows
  constexpr int64_t kPairBlock = 16;
  thread_local std::vector<uint32_t> words;
  words.resize(kPairBlock * padded_rows);
  for (int64_t qb = 0; qb < pairs; qb += kPairBlock) {
    const int64_t qn = std::min(kPairBlock, pairs - qb);
    transposed_pair_lines(A, row0, rows, padded_rows, k0, have, qb, qn, words.data());
    for (int64_t i = 0; i < padded_rows; ++i)
      for (int64_t l = 0; l < qn; ++l) out[i * pairs + qb + l] = words[l * padded_rows + i];
  }
}

namespace {

// A packed fp32 op(B) into bf16 form: rounded, depths in pair order, K rounded up to even.
void to_bf16_panels(const PackedB& fp32, PackedB& out) {
  const int64_t K = fp32.K, K2 = K + (K & 1);
  out.K = K2;
  out.N = fp32.N;
  out.bf16 = true;
  out.source_depth = K;
  out.strip = fp32.strip;
  out.data.resize(std::max<int64_t>(1, out.panels() * K2 * kPanel));
  for (int64_t p = 0; p < out.panels(); ++p) {
    const int64_t width = out.panel_width(p), S = out.strip_of(p);
    for (int64_t s0 = 0; s0 < width; s0 += S) {  // strip by strip: rows of S values in both
      const float* src = fp32.panel(p) + s0 * K;
      float* dst = out.data.data() + p * K2 * kPanel + s0 * K2;
      for (int64_t k = 0; k < K2; ++k) {
        const int64_t d = k ^ 1;
        float* row = dst + k * S;
        if (d >= K) {
          std::memset(row, 0, S * sizeof(float));
          continue;
        }
        const float* from = src + d * S;
        for (int64_t j = 0; j < S; ++j) row[j] = round_to_bf16(from[j]);
      }
    }
  }
  add_bf16_pairs(out);
}

thread_local PackedB t_packed_b_fp32;  // pack_b's result on its way to bf16

}  // namespace

void gemm_detail::add_bf16_pairs(PackedB& out) {
  const int64_t K2 = out.K;
  if (!bf16_pair_words_wanted()) {
    out.pairs.clear();
    return;
  }
  // the AVX512_BF16 kernel's words (PackedB::pairs), whatever the strips. Panel row 2q holds depth
  // 2q + 1 and row 2q + 1 depth 2q (pair order), both already rounded.
  out.pair_tiles = bf16_order_is_amx();
  out.pairs.assign(std::max<int64_t>(1, out.panels() * out.pair_rows() * kPanel), 0u);
  for (int64_t p = 0; p < out.panels(); ++p) {
    const int64_t width = out.panel_width(p), S = out.strip_of(p);
    uint32_t* words = out.pairs.data() + p * out.pair_rows() * kPanel;
    for (int64_t s0 = 0; s0 < width; s0 += S) {
      const float* strip = out.panel(p) + s0 * K2;  // [K2][S]
      for (int64_t q = 0; q < K2 / 2; ++q) {
        const float* odd = strip + 2 * q * S;
        const float* even = odd + S;
        for (int64_t j = 0; j < S; ++j) {
          uint32_t o, e;
          std::memcpy(&o, odd + j, 4);
          std::memcpy(&e, even + j, 4);
          words[out.pair_word_offset(width, q, s0 + j)] = (o & 0xffff0000u) | (e >> 16);
        }
      }
    }
  }
}

void gemm_detail::float_panels_from_words(const PackedB& B, PackedB& out) {
  out.K = B.K, out.N = B.N, out.bf16 = true, out.source_depth = B.source_depth;
  out.strip = kPanel;  // each panel [K][width]: every kernel takes any strip
  out.pairs.clear();
  out.data.resize(std::max<int64_t>(1, out.panels() * out.K * kPanel));
  for (int64_t p = 0; p < out.panels(); ++p) {
    const int64_t width = out.panel_width(p);
    const uint32_t* words = B.pair_panel(p);
    float* panel = out.data.data() + p * out.K * kPanel;
    for (int64_t q = 0; q < out.K / 2; ++q)
      for (int64_t j = 0; j < width; ++j) {
        const uint32_t word = words[B.pair_word_offset(width, q, j)];
        const uint32_t odd = word & 0xffff0000u, even = word << 16;  // panel rows 2q and 2q + 1 (pair order)
        std::memcpy(panel + 2 * q * width + j, &odd, 4);
        std::memcpy(panel + (2 * q + 1) * width + j, &even, 4);
      }
  }
}

void gemm_detail::pack_b_pair_words(int64_t K, int64_t N, RowSource B, PackedB& out, float* column_sums) {
  const int64_t K2 = K + (K & 1), pairs = K2 / 2;
  PM_CHECK(out.K == K2, "pack_b_pair_words: the packing's depth {} is not {}", out.K, K2);
  out.pair_tiles = bf16_order_is_amx();
  out.pairs.resize(std::max<int64_t>(1, out.panels() * out.pair_rows() * kPanel));
  // Pair by pair, each pair's two rows whole across the panels: B's rows (activation gradients the
  // backward wrote, rows of 4 KB and more) are read front to back, which the hardware prefetcher
  // follows. Panel by panel, each row was read in spans of 256 bytes, a page apart from the last
  // span read: a wait on memory per span (the amx order's layer spent 5% of its time here).
  alignas(64) uint32_t row[kPanel];
  // one pair's words of one panel (zeros past its columns): in the dot order where they go, in the
  // amx order into a row first, then 16 columns at a time into their tiles (a pair_words call per
  // 16 columns left one weight gradient's product, u^T dh, 1.06-1.17x slower than with rows of pairs)
  auto put = [&](int64_t q, int64_t p, const auto* even, const auto* odd) {
    const int64_t width = out.panel_width(p), col0 = p * kPanel, cols = std::min(kPanel, N - col0);
    uint32_t* words = out.pairs.data() + p * out.pair_rows() * kPanel;
    uint32_t* w = out.pair_tiles ? row : words + out.pair_word_offset(width, q, 0);
    pair_words(even + col0, odd ? odd + col0 : nullptr, cols, w);
    std::fill(w + cols, w + width, 0u);
    if (out.pair_tiles)
      for (int64_t j = 0; j < width; j += 16) std::memcpy(words + out.pair_word_offset(width, q, j), row + j, 64);
  };
  // the column sums in row order: the even row, then the odd one
  auto add = [&](const auto* r) {
    if (column_sums && r)
      for (int64_t j = 0; j < N; ++j) column_sums[j] += widened(r[j]);
  };
  // scaled float rows (RowSource::scale): each pair's two rows as the bf16 values a copy of the
  // scaled rows would hold, made here in L1 (the packing and the sums then read them as bf16 rows)
  thread_local std::vector<uint16_t> scaled;
  if (B.scale) scaled.resize(2 * N);
  // Rows 2 (q + 2) and 2 (q + 2) + 1 fetched while pair q is packed, as pack_b_rows fetches its
  // rows ahead: the two rows of a pair are read side by side, so each stream skips a row at every
  // step, and the hardware prefetcher loses it at each new row (perf: pair_words' samples on its loads).
  constexpr int64_t kPairsAhead = 2;
  const int64_t row_bytes = N * (B.is_bf16() ? 2 : 4);
  auto fetch_row = [&](int64_t k) {
    const char* r = B.is_bf16() ? reinterpret_cast<const char*>(B.row16(k)) : reinterpret_cast<const char*>(B.row(k));
    for (int64_t b = 0; b < row_bytes; b += 64) fetch_into_l1(r + b);
  };
  for (int64_t q = 0; q < pairs; ++q) {
    const bool has_odd = 2 * q + 1 < K;
    for (int64_t k = 2 * (q + kPairsAhead); k < std::min(2 * (q + kPairsAhead) + 2, K); ++k) fetch_row(k);
    auto both = [&](const auto* even, const auto* odd) {
      for (int64_t p = 0; p < out.panels(); ++p) put(q, p, even, odd);
      add(even);
      add(odd);
    };
    if (B.is_bf16()) {
      both(B.row16(2 * q), has_odd ? B.row16(2 * q + 1) : nullptr);
    } else if (B.scale) {
      for (int64_t k = 2 * q; k < 2 * q + (has_odd ? 2 : 1); ++k)
        scaled_floats_to_bf16(B.scale[k], B.row(k), scaled.data() + (k - 2 * q) * N, N);
      both(scaled.data(), has_odd ? scaled.data() + N : nullptr);
    } else {
      both(B.row(2 * q), has_odd ? B.row(2 * q + 1) : nullptr);
    }
  }
  for (int64_t p = 0; p < out.panels(); ++p) {  // the last block's padding
    const int64_t width = out.panel_width(p);
    uint32_t* words = out.pairs.data() + p * out.pair_rows() * kPanel;
    for (int64_t q = pairs; q < out.pair_rows(); ++q)
      for (int64_t j = 0; j < width; j += 16) std::fill_n(words + out.pair_word_offset(width, q, j), 16, 0u);
  }
}


namespace {

// The kernel's words of op(B) = the transpose of B[N, K] (ldb >= K), 16 columns at a time: column
// j's words are storage row j's values in pairs, rounded (row_pair_words), so 16 whole rows, one
// after another in memory, become 16 lines of words in L1, and each 16 x 16 block of those is
// transposed in registers into 16 pairs' words of the 16 columns: 64 contiguous bytes in either
// order's layout. Packing the floats first, then rounding them and making the words from the
// panels word by word, took 3-4 times as long; reading the 16 rows side by side, 128 bytes of
// each at a time, left the loads waiting on memory (a training step's backward packing 4.4 ms
// in a DeepSeek-style layer, where the forward's took 1.9).
__attribute__((target("avx512f,avx512bw,avx512vl"))) void transposed_pair_words_avx512(int64_t K, int64_t N,
                                                                                        const float* B, int64_t ldb,
                                                                                        PackedB& out) {
  const int64_t pairs = out.pair_rows();  // a multiple of 16; words from K / 2 on are zero
  thread_local std::vector<uint32_t> lines;
  lines.resize(16 * pairs);
  for (int64_t p = 0; p < out.panels(); ++p) {
    const int64_t width = out.panel_width(p), col0 = p * kPanel, cols = std::min(kPanel, N - col0);
    uint32_t* words = out.pairs.data() + p * pairs * kPanel;
    for (int64_t j0 = 0; j0 < width; j0 += 16) {
      for (int64_t l = 0; l < 16; ++l) {
        uint32_t* line = lines.data() + l * pairs;
        if (j0 + l < cols)
          row_pair_words(B + (col0 + j0 + l) * ldb, K, pairs, line);
        else
          std::fill(line, line + pairs, 0u);
      }
      for (int64_t q0 = 0; q0 < pairs; q0 += 16) {
        __m512i r[16];
        for (int l = 0; l < 16; ++l) r[l] = _mm512_loadu_si512(lines.data() + l * pairs + q0);
        transpose_16x16_words(r);
        for (int i = 0; i < 16; ++i) _mm512_storeu_si512(words + out.pair_word_offset(width, q0 + i, j0), r[i]);
      }
    }
  }
}

}  // namespace

void gemm_detail::pack_b_bf16_forms(Trans trans_b, int64_t K, int64_t N, const float* B, int64_t ldb, PackedB& out,
                                    bool panels, bool words) {
  static const bool avx512bw = __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
  if (trans_b == Trans::yes && words && !panels && avx512bw) {
    out.K = K + (K & 1), out.N = N, out.bf16 = true, out.source_depth = K;
    out.data.clear();
    out.pair_tiles = bf16_order_is_amx();
    out.pairs.resize(std::max<int64_t>(1, out.panels() * out.pair_rows() * kPanel));
    return transposed_pair_words_avx512(K, N, B, ldb, out);
  }
  if (trans_b == Trans::yes) {
    pack_b(trans_b, K, N, B, ldb, t_packed_b_fp32);
    to_bf16_panels(t_packed_b_fp32, out);
    if (!panels) out.data.clear();
    return;
  }
  // op(B) = B: the rounded panels and the kernel's words, each straight from B's rows
  const RowSource rows{B, ldb, nullptr};
  if (panels) {
    pack_b_rows_bf16(K, N, rows, out);
  } else {
    out.K = K + (K & 1), out.N = N, out.bf16 = true, out.source_depth = K;
    out.data.clear();
  }
  if (words) pack_b_pair_words(K, N, rows, out);
}

void pack_b_bf16(Trans trans_b, int64_t K, int64_t N, const float* B, int64_t ldb, PackedB& out) {
  // Where bf16 GEMMs run on the kernel's words (AVX512_BF16, AMX's order), only those: the float
  // panels are the fp32 kernels' (a CPU without the instructions). Experts' weights are packed
  // again after every optimizer step: a DeepSeek-style layer's (32 experts a rank) took 20 ms a
  // step for both forms, about a quarter of its forward and backward.
  const bool words = bf16_pair_words_wanted();
  pack_b_bf16_forms(trans_b, K, N, B, ldb, out, !words || !bf16_words_run_here(), words);
}

}  // namespace pm
