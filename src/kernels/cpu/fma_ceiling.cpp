#include "kernels/cpu/fma_ceiling.h"

#include <immintrin.h>

#include "core/clock.h"
#include "kernels/cpu/gemm.h"

namespace pm {
namespace {

// Twelve independent chains: as many accumulators as the GEMM micro-kernels keep, enough to cover
// the FMA latency on every x86 core of this decade. The empty asm keeps the compiler from
// shortening or hoisting the chains; it costs no instruction. (Written out per instruction set:
// the target attribute does not reach into templates or lambdas, whose FMAs would then be calls.)
#define PM_FMA_CHAINS(V, SET1, FMADD)                                                                   \
  const V a = SET1(0.999f), b = SET1(1e-4f);                                                          \
  V c0 = SET1(0.5f), c1 = c0, c2 = c0, c3 = c0, c4 = c0, c5 = c0, c6 = c0, c7 = c0, c8 = c0, c9 = c0,     \
    c10 = c0, c11 = c0;                                                                               \
  Stopwatch watch;                                                                                    \
  for (int64_t k = 0; k < iterations; ++k) {                                                          \
    c0 = FMADD(a, c0, b), c1 = FMADD(a, c1, b), c2 = FMADD(a, c2, b), c3 = FMADD(a, c3, b);             \
    c4 = FMADD(a, c4, b), c5 = FMADD(a, c5, b), c6 = FMADD(a, c6, b), c7 = FMADD(a, c7, b);             \
    c8 = FMADD(a, c8, b), c9 = FMADD(a, c9, b), c10 = FMADD(a, c10, b), c11 = FMADD(a, c11, b);         \
    asm volatile("" : "+x"(c0), "+x"(c1), "+x"(c2), "+x"(c3), "+x"(c4), "+x"(c5), "+x"(c6), "+x"(c7),  \
                 "+x"(c8), "+x"(c9), "+x"(c10), "+x"(c11));                                           \
  }                                                                                                   \
  return watch.elapsed_s();

__attribute__((target("avx2,fma"))) double seconds_avx2(int64_t iterations) {
  PM_FMA_CHAINS(__m256, _mm256_set1_ps, _mm256_fmadd_ps)
}

__attribute__((target("avx512f"))) double seconds_avx512(int64_t iterations) {
  PM_FMA_CHAINS(__m512, _mm512_set1_ps, _mm512_fmadd_ps)
}

// vdpbf16ps: per 32-bit lane, two bf16 products added into an fp32 accumulator (4 FLOPs).
__attribute__((target("avx512f,avx512bf16"))) double seconds_bf16_dot(int64_t iterations) {
  const __m512bh a = (__m512bh)_mm512_set1_epi32(0x3f7f3f7f), b = (__m512bh)_mm512_set1_epi32(0x38d138d1);
  __m512 c0 = _mm512_set1_ps(0.5f), c1 = c0, c2 = c0, c3 = c0, c4 = c0, c5 = c0, c6 = c0, c7 = c0, c8 = c0,
         c9 = c0, c10 = c0, c11 = c0;
  Stopwatch watch;
  for (int64_t k = 0; k < iterations; ++k) {
    c0 = _mm512_dpbf16_ps(c0, a, b), c1 = _mm512_dpbf16_ps(c1, a, b), c2 = _mm512_dpbf16_ps(c2, a, b);
    c3 = _mm512_dpbf16_ps(c3, a, b), c4 = _mm512_dpbf16_ps(c4, a, b), c5 = _mm512_dpbf16_ps(c5, a, b);
    c6 = _mm512_dpbf16_ps(c6, a, b), c7 = _mm512_dpbf16_ps(c7, a, b), c8 = _mm512_dpbf16_ps(c8, a, b);
    c9 = _mm512_dpbf16_ps(c9, a, b), c10 = _mm512_dpbf16_ps(c10, a, b), c11 = _mm512_dpbf16_ps(c11, a, b);
    asm volatile("" : "+v"(c0), "+v"(c1), "+v"(c2), "+v"(c3), "+v"(c4), "+v"(c5), "+v"(c6), "+v"(c7), "+v"(c8),
                 "+v"(c9), "+v"(c10), "+v"(c11));
  }
  return watch.elapsed_s();
}

#undef PM_FMA_CHAINS

// Calibrates on a short run, then times one of about `seconds`: `flops` per iteration.
template <typename Run>
double ceiling_gflops(Run run, double flops, double seconds) {
  int64_t iterations = 1 << 16;
  double s = run(iterations);
  while (s < 0.01) s = run(iterations *= 4);
  iterations = static_cast<int64_t>(iterations * (seconds / s)) + 1;
  s = run(iterations);
  return iterations * flops / s / 1e9;
}

}  // namespace

double fma_ceiling_gflops(double seconds) {
  const std::string isa = gemm_isa();
  if (isa == "scalar") return 0.0;  // no vector FMA: nothing to compare against
  const bool wide = isa == "avx512";
  const int lanes = wide ? 16 : 8;
  return ceiling_gflops([&](int64_t n) { return wide ? seconds_avx512(n) : seconds_avx2(n); }, 12.0 * lanes * 2.0,
                        seconds);
}

double bf16_dot_ceiling_gflops(double seconds) {
  __builtin_cpu_init();
  if (!__builtin_cpu_supports("avx512f") || !__builtin_cpu_supports("avx512bf16")) return 0.0;
  return ceiling_gflops(seconds_bf16_dot, 12.0 * 16 * 4.0, seconds);
}

}  // namespace pm
