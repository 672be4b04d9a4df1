#include "kernels/cpu/layernorm.h"

#include <cmath>

namespace pm {

void layernorm_forward(const float* x, const float* gamma, const float* beta, int64_t rows, int64_t D,
                       float eps, float* y, float* mean, float* rstd) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * D;
    // two passes in double: exact enough to match a float64 reference to 1e-6
    double m = 0;
    for (int64_t i = 0; i < D; ++i) m += xr[i];
    m /= static_cast<double>(D);
    double v = 0;
    for (int64_t i = 0; i < D; ++i) v += (xr[i] - m) * (xr[i] - m);
    v /= static_cast<double>(D);
    float s = static_cast<float>(1.0 / std::sqrt(v + eps));
    float mf = static_cast<float>(m);
    mean[r] = mf;
    rstd[r] = s;
    float* yr = y + r * D;
    for (int64_t i = 0; i < D; ++i) yr[i] = (xr[i] - mf) * s * gamma[i] + beta[i];
  }
}

void layernorm_backward(const float* x, const float* gamma, const float* mean, const float* rstd,
                        const float* dy, int64_t rows, int64_t D, float* dx, float* dgamma, float* dbeta) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * D;
    const float* dyr = dy + r * D;
    float* dxr = dx + r * D;
    const float m = mean[r], s = rstd[r];
    // xhat = (x - m) s; dxhat = dy gamma; dx = s (dxhat - mean(dxhat) - xhat mean(dxhat xhat))
    double sum_dxhat = 0, sum_dxhat_xhat = 0;
    for (int64_t i = 0; i < D; ++i) {
      float xhat = (xr[i] - m) * s;
      float dxhat = dyr[i] * gamma[i];
      sum_dxhat += dxhat;
      sum_dxhat_xhat += dxhat * xhat;
      dgamma[i] += dyr[i] * xhat;
      dbeta[i] += dyr[i];
    }
    float a = static_cast<float>(sum_dxhat / D), b = static_cast<float>(sum_dxhat_xhat / D);
    for (int64_t i = 0; i < D; ++i) {
      float xhat = (xr[i] - m) * s;
      dxr[i] = s * (dyr[i] * gamma[i] - a - xhat * b);
    }
  }
}

}  // namespace pm

namespace pm {

void rmsnorm_forward(const float* x, const float* gamma, int64_t rows, int64_t D, float eps, float* y, float* rstd) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * D;
    double ms = 0;  // in double, as LayerNorm's statistics
    for (int64_t i = 0; i < D; ++i) ms += static_cast<double>(xr[i]) * xr[i];
    ms /= static_cast<double>(D);
    const float s = static_cast<float>(1.0 / std::sqrt(ms + eps));
    rstd[r] = s;
    float* yr = y + r * D;
    for (int64_t i = 0; i < D; ++i) yr[i] = xr[i] * s * gamma[i];
  }
}

void rmsnorm_backward(const float* x, const float* gamma, const float* rstd, const float* dy, int64_t rows, int64_t D,
                      float* dx, float* dgamma) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * D;
    const float* dyr = dy + r * D;
    float* dxr = dx + r * D;
    const float s = rstd[r];
    // xhat = x s; dxhat = dy gamma; dx = s (dxhat - xhat mean(dxhat xhat))
    double sum_dxhat_xhat = 0;
    for (int64_t i = 0; i < D; ++i) {
      const float xhat = xr[i] * s;
      sum_dxhat_xhat += dyr[i] * gamma[i] * xhat;
      dgamma[i] += dyr[i] * xhat;
    }
    const float b = static_cast<float>(sum_dxhat_xhat / D);
    for (int64_t i = 0; i < D; ++i) dxr[i] = s * (dyr[i] * gamma[i] - xr[i] * s * b);
  }
}

}  // namespace pm
