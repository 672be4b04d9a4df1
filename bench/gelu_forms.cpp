// GeLU with its derivative, as the forward's tile epilogue computes them (kernels/cpu/fast_math.h:
// erf as a rational function, exp for the density, separate multiplies and adds), against an
// alternative measured before deciding not to build it (docs/BENCHMARKS.md, "Fewer bytes around
// the expert GEMMs: measured, not kept"): Phi(x) from erfc(|x| / sqrt 2) = exp(-x^2 / 2) Q(t),
// t = 1 / (1 + 0.4 |x| / sqrt 2), Q a degree-8 polynomial fitted here for relative error (3e-8 in
// float64), so one exp serves Phi and the density, every polynomial step a fused multiply-add.
// Prints ns per value on a tile in L1 (three vectors side by side, as gelu_tile_lanes runs) and
// each form's largest error against float64 erfc. AVX-512 only.
//
//   (built with the tree: build/bench/gelu_forms)
//   build/bench/gelu_forms
#include <immintrin.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <vector>

#include "kernels/cpu/fast_math.h"
#include "kernels/cpu/lanes.h"
using namespace pm;
using lanes::Lanes;

namespace {

#if defined(__AVX512F__)
Lanes fma16(Lanes a, Lanes b, Lanes c) {
  __m512 x, y, z;
  std::memcpy(&x, &a, 64), std::memcpy(&y, &b, 64), std::memcpy(&z, &c, 64);
  x = _mm512_fmadd_ps(x, y, z);
  std::memcpy(&a, &x, 64);
  return a;
}
Lanes splat(float v) { return Lanes{} + v; }

// The alternative: GeLU into g, GeLU' into d.
[[gnu::always_inline]] inline void gelu_erfc_fma(Lanes x, Lanes& g, Lanes& d) {
  __m512 xv;
  std::memcpy(&xv, &x, 64);
  // (the masked forms: the plain ones start from an undefined register, which GCC warns about)
  const __m512 ten = _mm512_set1_ps(10.0f);  // Phi(-10) ~ 8e-24 (a real version would take 0 past it)
  const __m512 av = _mm512_mask_min_ps(ten, 0xffff, _mm512_abs_ps(xv), ten);
  Lanes a;
  std::memcpy(&a, &av, 64);
  const Lanes z = a * 0.70710678118654752f;
  const Lanes t = 1.0f / fma16(z, splat(0.4f), splat(1.0f));
  const float q[9] = {0.00014215684495655183f, 0.2229312517148384f, 0.24861648511185508f,
                      0.09894852288272543f,    0.49141839462804193f, -0.47848476042674765f,
                      0.7650479891368893f,     -0.4293574522972269f, 0.08073738201314079f};
  Lanes Q = splat(q[8]);
  for (int i = 7; i >= 0; --i) Q = fma16(Q, t, splat(q[i]));
  // E = exp(-a^2 / 2): exp_approx's reduction and polynomial in fused steps, 2^n by vscalefps
  const Lanes y = (a * a) * -0.5f;
  const Lanes n = fma16(y, splat(1.44269504088896341f), splat(12582912.0f)) - 12582912.0f;
  Lanes r = fma16(n, splat(-0.693145751953125f), y);
  r = fma16(n, splat(-1.42860682030941723e-06f), r);
  Lanes p = splat(1.0f / 5040.0f);
  for (float c : {1.0f / 720.0f, 1.0f / 120.0f, 1.0f / 24.0f, 1.0f / 6.0f, 0.5f, 1.0f, 1.0f}) p = fma16(p, r, splat(c));
  __m512 pv, nv;
  std::memcpy(&pv, &p, 64), std::memcpy(&nv, &n, 64);
  pv = _mm512_maskz_scalef_ps(0xffff, pv, nv);
  Lanes E;
  std::memcpy(&E, &pv, 64);
  const Lanes tail = (E * Q) * 0.5f;  // Phi(-|x|)
  __m512 phi;
  std::memcpy(&phi, &tail, 64);
  const __mmask16 positive = _mm512_cmp_ps_mask(xv, _mm512_setzero_ps(), _CMP_GT_OQ);
  phi = _mm512_mask_sub_ps(phi, positive, _mm512_set1_ps(1.0f), phi);
  Lanes Phi;
  std::memcpy(&Phi, &phi, 64);
  g = x * Phi;
  d = fma16(x, E * 0.39894228040143268f, Phi);
}

template <bool Alternative>
double ns_per_value(std::vector<float>& x, std::vector<float>& grad, std::vector<float>& out) {
  const int reps = 20000;
  const auto start = std::chrono::steady_clock::now();
  for (int rep = 0; rep < reps; ++rep) {
    for (size_t i = 0; i + 48 <= x.size(); i += 48) {
      Lanes in[3], g[3], d[3];
      for (int k = 0; k < 3; ++k) std::memcpy(&in[k], &x[i + 16 * k], 64);
      if constexpr (Alternative) {
        for (int k = 0; k < 3; ++k) gelu_erfc_fma(in[k], g[k], d[k]);
      } else {
        for (int k = 0; k < 3; ++k) g[k] = gelu(in[k]);
        for (int k = 0; k < 3; ++k) d[k] = gelu_grad(in[k]);
      }
      for (int k = 0; k < 3; ++k) std::memcpy(&out[i + 16 * k], &g[k], 64), std::memcpy(&grad[i + 16 * k], &d[k], 64);
    }
    asm volatile("" ::: "memory");
  }
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() * 1e9 / reps / x.size();
}
#endif

}  // namespace

int main() {
#if defined(__AVX512F__)
  std::vector<float> x(6 * 64 * 2), grad(x.size()), out(x.size());  // two 6 x 64 tiles: in L1
  for (size_t i = 0; i < x.size(); ++i) x[i] = static_cast<float>(static_cast<int>(i % 97) - 48) * 0.07f;
  std::vector<double> today, other;
  for (int round = 0; round < 7; ++round) {
    today.push_back(ns_per_value<false>(x, grad, out));
    other.push_back(ns_per_value<true>(x, grad, out));
  }
  std::sort(today.begin(), today.end());
  std::sort(other.begin(), other.end());
  // largest error on [-12, 12]: relative for GeLU where |GeLU| > 1e-7, absolute for GeLU' (it
  // crosses zero near -0.75)
  double err[2][2] = {};
  for (double v = -12.0; v < 12.0; v += 0.0007) {
    const float xf = static_cast<float>(v);
    const double X = xf, Phi = 0.5 * std::erfc(-X / std::sqrt(2.0));
    const double G = X * Phi, D = Phi + X * std::exp(-X * X / 2) / std::sqrt(2 * M_PI);
    Lanes g, d;
    gelu_erfc_fma(Lanes{} + xf, g, d);
    const float forms[2][2] = {{gelu(xf), gelu_grad(xf)}, {g[0], d[0]}};
    for (int f = 0; f < 2; ++f) {
      if (std::abs(G) > 1e-7) err[f][0] = std::max(err[f][0], std::abs(forms[f][0] - G) / std::abs(G));
      err[f][1] = std::max(err[f][1], std::abs(forms[f][1] - D));
    }
  }
  std::printf("GeLU and GeLU' of a tile in L1, medians of 7 rounds\n");
  std::printf("%-28s %12s %22s %22s\n", "form", "ns per value", "GeLU max rel error", "GeLU' max abs error");
  std::printf("%-28s %12.3f %22.3g %22.3g\n", "today (fast_math.h)", today[3], err[0][0], err[0][1]);
  std::printf("%-28s %12.3f %22.3g %22.3g\n", "erfc form, fused steps", other[3], err[1][0], err[1][1]);
  return 0;
#else
  std::printf("gelu_forms: needs AVX-512\n");
  return 0;
#endif
}
