// Branch-free exp and erf in float32 that the compiler can vectorise.
//
// glibc's erff costs ~18 ns per element here: for exact GeLU on an expert's hidden activations
// that is as long as the expert GEMM itself. These versions run in a few cycles per element, give
// the same bits scalar or SIMD (no FMA contraction: we build with -ffp-contract=off), and stay
// within a few float32 ulps of the true function:
//   exp_approx: relative error < 3e-7 on [-87, 88] (range reduction by ln 2, Taylor degree 7);
//   erf_approx: absolute error < 4e-7 (rational fit x P(x^2)/Q(x^2) on |x| <= 4, fitted by
//               iterated weighted least squares; beyond 4 erf is +-1 in float32).
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>
#if defined(__AVX512F__) && !defined(__CUDACC__)
#include <immintrin.h>
#endif

// The CUDA backend (kernels/cuda) compiles the float versions for the GPU too (nvcc -fmad=false:
// the same IEEE operations in the same order, so a GPU computes the CPU's bits).
#ifdef __CUDACC__
#define PM_HOST_DEVICE __host__ __device__
#else
#define PM_HOST_DEVICE
#endif

namespace pm {

// Each function is written once for a float and for a GCC vector of floats
// (float __attribute__((vector_size(...)))): a vector computes, lane by lane, the same IEEE
// operations in the same order as the float version, so a loop over vectors (elementwise.cpp)
// gives the bits of the scalar one.
namespace fast_math_detail {

template <typename T>
[[gnu::always_inline]] PM_HOST_DEVICE inline T splat(float v) {
  if constexpr (std::is_same_v<T, float>)
    return v;
  else
    return T{} + v;
}

// x clamped to [lo, hi] (a NaN stays NaN).
template <typename T>
[[gnu::always_inline]] PM_HOST_DEVICE inline T clamp(T x, float lo, float hi) {
  if constexpr (std::is_same_v<T, float>) {
    return x < lo ? lo : (x > hi ? hi : x);
  }
#if defined(__AVX512F__) && !defined(__CUDACC__)
  else if constexpr (sizeof(T) == sizeof(__m512)) {
    // x86's max and min return their second operand when either is NaN, so x goes second: the
    // choice below, in two instructions where the masks took four.
    __m512 v;
    std::memcpy(&v, &x, sizeof(T));
    const __m512 l = _mm512_set1_ps(lo), h = _mm512_set1_ps(hi);
    // (the masked forms: the plain ones start from an undefined register, which GCC warns about)
    v = _mm512_mask_min_ps(h, 0xffff, h, _mm512_mask_max_ps(l, 0xffff, l, v));
    T r;
    std::memcpy(&r, &v, sizeof(T));
    return r;
  }
#endif
  else {
    // the same choice by masks (GCC turns ?: on vectors into a branch per lane)
    using Ints = decltype(x < x);
    const T l = splat<T>(lo), h = splat<T>(hi);
    const Ints below = x < l, above = x > h;
    Ints bits, lb, hb;
    std::memcpy(&bits, &x, sizeof(T));
    std::memcpy(&lb, &l, sizeof(T));
    std::memcpy(&hb, &h, sizeof(T));
    bits = (below & lb) | (~below & ((above & hb) | (~above & bits)));
    T r;
    std::memcpy(&r, &bits, sizeof(T));
    return r;
  }
}

// 2^n for n holding whole numbers in [-126, 127].
template <typename T>
[[gnu::always_inline]] PM_HOST_DEVICE inline T pow2(T n) {
  if constexpr (std::is_same_v<T, float>) {
    int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
    float scale;
    std::memcpy(&scale, &bits, 4);
    return scale;
  } else {
    using Ints = decltype(n < n);
    Ints bits = (__builtin_convertvector(n, Ints) + 127) << 23;
    T scale;
    std::memcpy(&scale, &bits, sizeof(T));
    return scale;
  }
}

}  // namespace fast_math_detail

template <typename T>
[[gnu::always_inline]] PM_HOST_DEVICE inline T exp_approx(T x) {
  using namespace fast_math_detail;
  x = clamp(x, -87.0f, 88.0f);
  const float log2e = 1.44269504088896341f;
  const float ln2_hi = 0.693145751953125f;       // ln 2 split so that n * ln2_hi is exact
  const float ln2_lo = 1.42860682030941723e-06f;
  const float round_magic = 12582912.0f;          // 1.5 * 2^23: adding it rounds to an integer
  T n = (x * log2e + round_magic) - round_magic;
  T r = (x - n * ln2_hi) - n * ln2_lo;            // |r| <= ln2 / 2
  T p = splat<T>(1.0f / 5040.0f);
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  return p * pow2(n);
}

template <typename T>
[[gnu::always_inline]] PM_HOST_DEVICE inline T erf_approx(T x) {
  using namespace fast_math_detail;
  x = clamp(x, -4.0f, 4.0f);
  T s = x * x;
  T num = splat<T>(2.0446964198000903e-06f);
  num = num * s + 0.0002837437827576381f;
  num = num * s + 0.0037412974412986909f;
  num = num * s + 0.052666108929911686f;
  num = num * s + 0.18991097744069979f;
  num = num * s + 1.1283791500833458f;
  T den = splat<T>(3.7979990724538951e-05f);
  den = den * s + 0.0011556761365341592f;
  den = den * s + 0.014918948717542041f;
  den = den * s + 0.11388914486309165f;
  den = den * s + 0.50163705656960378f;
  den = den * s + 1.0f;
  return x * num / den;
}

// GeLU, exact (erf) form: x * Phi(x).
template <typename T>
[[gnu::always_inline]] PM_HOST_DEVICE inline T gelu(T x) {
  return 0.5f * x * (1.0f + erf_approx(x * 0.70710678118654752f));
}

// d/dx GeLU(x) = Phi(x) + x * phi(x).
template <typename T>
[[gnu::always_inline]] PM_HOST_DEVICE inline T gelu_grad(T x) {
  T cdf = 0.5f * (1.0f + erf_approx(x * 0.70710678118654752f));
  T pdf = 0.39894228040143268f * exp_approx(-0.5f * x * x);
  return cdf + x * pdf;
}

// sigmoid(x) = 1 / (1 + e^-x); exp_approx clamps, so large |x| gives 0 or 1, never NaN.
template <typename T>
[[gnu::always_inline]] PM_HOST_DEVICE inline T sigmoid_approx(T x) {
  return 1.0f / (1.0f + exp_approx(-x));
}

}  // namespace pm
