// Sixteen floats rounded to bf16 at once, with float_to_bf16's bits (tensor.h).
//
// AVX512_BF16's vcvtneps2bf16 rounds to nearest even as float_to_bf16 does, in one instruction
// where the integer rounding takes seven, but it flushes denormals to zero and keeps a NaN's sign
// and payload where float_to_bf16 gives 0x7fc0. A vector holding either (one vfpclassps, almost
// never true) takes the integer rounding instead: the same bits on every path. The instruction is
// used where the build targets it (-march=native on a CPU with AVX512_BF16, PIPEMOE_NATIVE); other
// builds run the integer rounding. (target attributes: callable from functions compiled for
// AVX-512 in a build that is not; the masked forms: GCC 12 warns of the plain ones' undefined
// source.)
#pragma once

#if defined(__x86_64__) && !defined(__CUDACC__)
#include <immintrin.h>

namespace pm {

#if defined(__AVX512BF16__) && defined(__AVX512DQ__)
#define PM_BF16_ROUNDING_INSTRUCTION 1
#endif

// Which rounding this build runs (bench/bf16_rounding.cpp says so).
#ifdef PM_BF16_ROUNDING_INSTRUCTION
constexpr bool kBf16RoundingInstruction = true;

// Whether vcvtneps2bf16 gives float_to_bf16's bits for all of v: no NaN (quiet 0x01, signalling
// 0x80) and no denormal (0x20).
[[gnu::always_inline]] inline bool bf16_instruction_exact(__m512 v) {
  return _mm512_fpclass_ps_mask(v, 0x01 | 0x20 | 0x80) == 0;
}
#else
constexpr bool kBf16RoundingInstruction = false;
#endif

// float_to_bf16 of each lane, as 16 bf16 in order.
[[gnu::always_inline]] __attribute__((target("avx512f"))) inline __m256i floats16_to_bf16(__m512 v) {
#ifdef PM_BF16_ROUNDING_INSTRUCTION
  if (__builtin_expect(bf16_instruction_exact(v), 1)) return (__m256i)_mm512_cvtneps_pbh(v);
#endif
  const __mmask16 all = 0xffff;
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_maskz_srli_epi32(all, bits, 16), _mm512_set1_epi32(1));
  const __m512i biased = _mm512_add_epi32(_mm512_add_epi32(bits, _mm512_set1_epi32(0x7fff)), lsb);
  const __mmask16 nan =
      _mm512_cmpgt_epu32_mask(_mm512_and_si512(bits, _mm512_set1_epi32(0x7fffffff)), _mm512_set1_epi32(0x7f800000));
  const __m512i high = _mm512_mask_mov_epi32(_mm512_maskz_srli_epi32(all, biased, 16), nan, _mm512_set1_epi32(0x7fc0));
  return _mm512_maskz_cvtepi32_epi16(all, high);
}

// 16 pair words of the bf16 GEMM (gemm_bf16_pack.cpp): lane j holds float_to_bf16(even[j]) in its
// low half and float_to_bf16(odd[j]) in its high half.
[[gnu::always_inline]] __attribute__((target("avx512f,avx512bw"))) inline __m512i pair_words16(__m512 even,
                                                                                              __m512 odd) {
#ifdef PM_BF16_ROUNDING_INSTRUCTION
  if (__builtin_expect(bf16_instruction_exact(even) && bf16_instruction_exact(odd), 1)) {
    // both rounded into one register (even's 16 in the low half), then interleaved word by word
    const __m512i words = (__m512i)_mm512_cvtne2ps_pbh(odd, even);
    const __m512i order = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6,
                                           21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    return _mm512_permutexvar_epi16(order, words);
  }
#endif
  const __mmask16 all = 0xffff;
  const __m512i low = _mm512_maskz_cvtepu16_epi32(all, floats16_to_bf16(even));
  const __m512i high = _mm512_maskz_cvtepu16_epi32(all, floats16_to_bf16(odd));
  return _mm512_or_si512(low, _mm512_maskz_slli_epi32(all, high, 16));
}

}  // namespace pm
#endif
