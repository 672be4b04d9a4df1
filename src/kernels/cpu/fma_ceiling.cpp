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

#undef PM_FMA_CHAINS

}  // namespace

double fma_ceiling_gflops(double seconds) {
  const std::string isa = gemm_isa();
  if (isa == "scalar") return 0.0;  // no vector FMA: nothing to compare against
  const bool wide = isa == "avx512";
  const int lanes = wide ? 16 : 8;
  auto run = [&](int64_t iterations) { return wide ? seconds_avx512(iterations) : seconds_avx2(iterations); };
  // calibrate on a short run, then time one of about `seconds`
  int64_t iterations = 1 << 16;
  double s = run(iterations);
  while (s < 0.01) s = run(iterations *= 4);
  iterations = static_cast<int64_t>(iterations * (seconds / s)) + 1;
  s = run(iterations);
  return iterations * 12.0 * lanes * 2.0 / s / 1e9;
}

}  // namespace pm
