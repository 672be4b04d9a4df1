// The backbone's norms over the last dimension:
//   LayerNorm: y = (x - mean) / sqrt(var + eps) * gamma + beta
//   RMSNorm (Zhang & Sennrich 2019; Llama, Mixtral, DeepSeek, Qwen): y = x / sqrt(mean(x^2) + eps) * gamma
#pragma once

#include <cstdint>

namespace pm {

// x[rows, D] -> y[rows, D]; keeps mean[rows] and rstd[rows] (1 / sqrt(var + eps)) for backward.
void layernorm_forward(const float* x, const float* gamma, const float* beta, int64_t rows, int64_t D,
                       float eps, float* y, float* mean, float* rstd);

// dy -> dx (overwritten); dgamma and dbeta are added to.
void layernorm_backward(const float* x, const float* gamma, const float* mean, const float* rstd,
                        const float* dy, int64_t rows, int64_t D, float* dx, float* dgamma, float* dbeta);

// x[rows, D] -> y[rows, D]; keeps rstd[rows] (1 / sqrt(mean(x^2) + eps)) for backward.
void rmsnorm_forward(const float* x, const float* gamma, int64_t rows, int64_t D, float eps, float* y, float* rstd);

// dy -> dx (overwritten); dgamma is added to.
void rmsnorm_backward(const float* x, const float* gamma, const float* rstd, const float* dy, int64_t rows, int64_t D,
                      float* dx, float* dgamma);

}  // namespace pm
