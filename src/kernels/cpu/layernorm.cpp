#include "kernels/cpu/layernorm.h"

#include <cmath>
#include <cstring>

namespace pm {

namespace {

// Each row's statistics are sums in double over its values in order: one chain of dependent adds
// per row, each waiting on the one before it (a token's 192 values took 1.5 ns each in the demo
// model's norms). The norms below run kRows rows side by side, each row's chains in its own
// registers, so that the core overlaps them: every sum keeps its order, the same bits.
constexpr int64_t kRows = 8;

// The rows [r0, r0 + R) of x through fn(R rows at once) for whole blocks, then fn(1 row) for each
// row left; fn is a template on R.
template <typename Fn>
void in_row_blocks(int64_t rows, Fn&& fn) {
  int64_t r0 = 0;
  for (; r0 + kRows <= rows; r0 += kRows) fn.template operator()<kRows>(r0);
  for (; r0 < rows; ++r0) fn.template operator()<1>(r0);
}

// A block's 8 rows side by side: the sums of the 8 rows are one vector of 8 doubles, a lane per
// row, and each step adds one column of the block (a value of every row). The columns come 8 at a
// time, loaded as rows and transposed in registers: gathering each column value by value (what
// GCC made of the loops over the rows) cost more than the arithmetic. Every lane's operations and
// their order are the scalar loop's: the same bits.
typedef float Floats8 __attribute__((vector_size(8 * sizeof(float))));
typedef double Doubles8 __attribute__((vector_size(8 * sizeof(double))));

[[gnu::always_inline]] inline Floats8 load8(const float* p) {
  Floats8 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
[[gnu::always_inline]] inline Doubles8 widen(const Floats8& v) { return __builtin_convertvector(v, Doubles8); }

// r[i][j] -> r[j][i]
[[gnu::always_inline]] inline void transpose8(Floats8 (&r)[8]) {
  Floats8 t[8], u[8];
  for (int i = 0; i < 8; i += 2) {
    t[i] = __builtin_shufflevector(r[i], r[i + 1], 0, 8, 1, 9, 4, 12, 5, 13);
    t[i + 1] = __builtin_shufflevector(r[i], r[i + 1], 2, 10, 3, 11, 6, 14, 7, 15);
  }
  for (int i = 0; i < 8; i += 4)
    for (int k = 0; k < 2; ++k) {
      u[i + 2 * k] = __builtin_shufflevector(t[i + k], t[i + k + 2], 0, 1, 8, 9, 4, 5, 12, 13);
      u[i + 2 * k + 1] = __builtin_shufflevector(t[i + k], t[i + k + 2], 2, 3, 10, 11, 6, 7, 14, 15);
    }
  for (int j = 0; j < 4; ++j) {
    r[j] = __builtin_shufflevector(u[j], u[j + 4], 0, 1, 2, 3, 8, 9, 10, 11);
    r[j + 4] = __builtin_shufflevector(u[j], u[j + 4], 4, 5, 6, 7, 12, 13, 14, 15);
  }
}

// Columns [0, 8) of the 8 rows from p, D apart: c[j] holds column j (lane r: row r).
[[gnu::always_inline]] inline void columns8(const float* p, int64_t D, Floats8 (&c)[8]) {
  for (int r = 0; r < 8; ++r) c[r] = load8(p + r * D);
  transpose8(c);
}

}  // namespace

void layernorm_forward(const float* x, const float* gamma, const float* beta, int64_t rows, int64_t D,
                       float eps, float* y, float* mean, float* rstd) {
  in_row_blocks(rows, [&]<int R>(int64_t r0) {
    const float* xb = x + r0 * D;
    // two passes in double: exact enough to match a float64 reference to 1e-6
    double m[R] = {}, v[R] = {};
    int64_t whole = 0;  // the columns the vectors of 8 rows take, then the rest one by one
    if constexpr (R == 8) {
      Doubles8 mv = {};
      for (; whole + 8 <= D; whole += 8) {
        Floats8 c[8];
        columns8(xb + whole, D, c);
        for (int j = 0; j < 8; ++j) mv += widen(c[j]);
      }
      std::memcpy(m, &mv, sizeof(m));
    }
    for (int64_t i = whole; i < D; ++i)
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) m[r] += xb[r * D + i];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) m[r] /= static_cast<double>(D);
    if constexpr (R == 8) {
      Doubles8 mv, vv = {};
      std::memcpy(&mv, m, sizeof(m));
      for (int64_t i = 0; i < whole; i += 8) {
        Floats8 c[8];
        columns8(xb + i, D, c);
        for (int j = 0; j < 8; ++j) {
          const Doubles8 d = widen(c[j]) - mv;
          vv += d * d;
        }
      }
      std::memcpy(v, &vv, sizeof(v));
    }
    for (int64_t i = whole; i < D; ++i)
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) v[r] += (xb[r * D + i] - m[r]) * (xb[r * D + i] - m[r]);
    for (int r = 0; r < R; ++r) {
      v[r] /= static_cast<double>(D);
      const float s = static_cast<float>(1.0 / std::sqrt(v[r] + eps));
      const float mf = static_cast<float>(m[r]);
      mean[r0 + r] = mf;
      rstd[r0 + r] = s;
      const float* xr = xb + r * D;
      float* yr = y + (r0 + r) * D;
      for (int64_t i = 0; i < D; ++i) yr[i] = (xr[i] - mf) * s * gamma[i] + beta[i];
    }
  });
}

void layernorm_backward(const float* x, const float* gamma, const float* mean, const float* rstd,
                        const float* dy, int64_t rows, int64_t D, float* dx, float* dgamma, float* dbeta) {
  in_row_blocks(rows, [&]<int R>(int64_t r0) {
    const float* xb = x + r0 * D;
    const float* dyb = dy + r0 * D;
    // xhat = (x - m) s; dxhat = dy gamma; dx = s (dxhat - mean(dxhat) - xhat mean(dxhat xhat))
    double sum_dxhat[R] = {}, sum_dxhat_xhat[R] = {};
    int64_t whole = 0;
    if constexpr (R == 8) {
      Doubles8 sa = {}, sb = {};
      for (; whole + 8 <= D; whole += 8) {
        const Floats8 g = load8(gamma + whole);
        Floats8 dxhat[8], product[8];
        for (int r = 0; r < 8; ++r) {
          const Floats8 xhat = (load8(xb + r * D + whole) - mean[r0 + r]) * rstd[r0 + r];
          dxhat[r] = load8(dyb + r * D + whole) * g;
          product[r] = dxhat[r] * xhat;
        }
        transpose8(dxhat);
        transpose8(product);
        for (int j = 0; j < 8; ++j) sa += widen(dxhat[j]), sb += widen(product[j]);
      }
      std::memcpy(sum_dxhat, &sa, sizeof(sum_dxhat));
      std::memcpy(sum_dxhat_xhat, &sb, sizeof(sum_dxhat_xhat));
    }
    for (int64_t i = whole; i < D; ++i)
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const float xhat = (xb[r * D + i] - mean[r0 + r]) * rstd[r0 + r];
        const float dxhat = dyb[r * D + i] * gamma[i];
        sum_dxhat[r] += dxhat;
        sum_dxhat_xhat[r] += dxhat * xhat;
      }
    // then row by row, across the row (the parameters' gradients gather the rows in order)
    for (int r = 0; r < R; ++r) {
      const float m = mean[r0 + r], s = rstd[r0 + r];
      const float a = static_cast<float>(sum_dxhat[r] / D), b = static_cast<float>(sum_dxhat_xhat[r] / D);
      const float* __restrict xr = xb + r * D;
      const float* __restrict dyr = dyb + r * D;
      float* __restrict dxr = dx + (r0 + r) * D;
      float* __restrict dg = dgamma;
      float* __restrict dbt = dbeta;
      for (int64_t i = 0; i < D; ++i) {  // (restrict: GCC vectorises these loops only knowing the rows apart)
        const float xhat = (xr[i] - m) * s;
        dg[i] += dyr[i] * xhat;
        dbt[i] += dyr[i];
      }
      for (int64_t i = 0; i < D; ++i) {
        const float xhat = (xr[i] - m) * s;
        dxr[i] = s * (dyr[i] * gamma[i] - a - xhat * b);
      }
    }
  });
}

void rmsnorm_forward(const float* x, const float* gamma, int64_t rows, int64_t D, float eps, float* y, float* rstd) {
  in_row_blocks(rows, [&]<int R>(int64_t r0) {
    const float* xb = x + r0 * D;
    double ms[R] = {};  // in double, as LayerNorm's statistics
    int64_t whole = 0;
    if constexpr (R == 8) {
      Doubles8 sv = {};
      for (; whole + 8 <= D; whole += 8) {
        Floats8 c[8];
        columns8(xb + whole, D, c);
        for (int j = 0; j < 8; ++j) {
          const Doubles8 d = widen(c[j]);
          sv += d * d;
        }
      }
      std::memcpy(ms, &sv, sizeof(ms));
    }
    for (int64_t i = whole; i < D; ++i)
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) ms[r] += static_cast<double>(xb[r * D + i]) * xb[r * D + i];
    for (int r = 0; r < R; ++r) {
      const float s = static_cast<float>(1.0 / std::sqrt(ms[r] / static_cast<double>(D) + eps));
      rstd[r0 + r] = s;
      const float* xr = xb + r * D;
      float* yr = y + (r0 + r) * D;
      for (int64_t i = 0; i < D; ++i) yr[i] = xr[i] * s * gamma[i];
    }
  });
}

void rmsnorm_backward(const float* x, const float* gamma, const float* rstd, const float* dy, int64_t rows, int64_t D,
                      float* dx, float* dgamma) {
  in_row_blocks(rows, [&]<int R>(int64_t r0) {
    const float* xb = x + r0 * D;
    const float* dyb = dy + r0 * D;
    // xhat = x s; dxhat = dy gamma; dx = s (dxhat - xhat mean(dxhat xhat))
    double sum_dxhat_xhat[R] = {};
    int64_t whole = 0;
    if constexpr (R == 8) {
      Doubles8 sv = {};
      for (; whole + 8 <= D; whole += 8) {
        const Floats8 g = load8(gamma + whole);
        Floats8 product[8];
        for (int r = 0; r < 8; ++r)
          product[r] = load8(dyb + r * D + whole) * g * (load8(xb + r * D + whole) * rstd[r0 + r]);
        transpose8(product);
        for (int j = 0; j < 8; ++j) sv += widen(product[j]);
      }
      std::memcpy(sum_dxhat_xhat, &sv, sizeof(sum_dxhat_xhat));
    }
    for (int64_t i = whole; i < D; ++i)
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const float xhat = xb[r * D + i] * rstd[r0 + r];
        sum_dxhat_xhat[r] += dyb[r * D + i] * gamma[i] * xhat;
      }
    for (int r = 0; r < R; ++r) {  // row by row, as LayerNorm's backward
      const float s = rstd[r0 + r];
      const float b = static_cast<float>(sum_dxhat_xhat[r] / D);
      const float* __restrict xr = xb + r * D;
      const float* __restrict dyr = dyb + r * D;
      float* __restrict dxr = dx + (r0 + r) * D;
      float* __restrict dg = dgamma;
      for (int64_t i = 0; i < D; ++i) dg[i] += dyr[i] * (xr[i] * s);
      for (int64_t i = 0; i < D; ++i) dxr[i] = s * (dyr[i] * gamma[i] - xr[i] * s * b);
    }
  });
}

}  // namespace pm
