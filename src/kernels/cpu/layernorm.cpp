#include "kernels/cpu/layernorm.h"

#include <cmath>

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

}  // namespace

void layernorm_forward(const float* x, const float* gamma, const float* beta, int64_t rows, int64_t D,
                       float eps, float* y, float* mean, float* rstd) {
  in_row_blocks(rows, [&]<int R>(int64_t r0) {
    const float* xb = x + r0 * D;
    // two passes in double: exact enough to match a float64 reference to 1e-6
    double m[R] = {}, v[R] = {};
    for (int64_t i = 0; i < D; ++i)
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) m[r] += xb[r * D + i];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) m[r] /= static_cast<double>(D);
    for (int64_t i = 0; i < D; ++i)
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
    for (int64_t i = 0; i < D; ++i)
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
    for (int64_t i = 0; i < D; ++i)
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
    for (int64_t i = 0; i < D; ++i)
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
