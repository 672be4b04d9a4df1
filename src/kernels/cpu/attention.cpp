#include "kernels/cpu/attention.h"

#include <cmath>
#include <vector>

#include "kernels/cpu/fast_math.h"
#include "kernels/cpu/gemm.h"

namespace pm {

// Per (sequence, head): row-strided views into qkv (ld = 3D) and out (ld = D), GEMMs on them.
void attention_forward(const float* qkv, int64_t B, int64_t S, int64_t heads, int64_t hd, float* probs, float* out) {
  const int64_t D = heads * hd, ld = 3 * D;
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < heads; ++h) {
      const float* q = qkv + b * S * ld + h * hd;
      const float* k = q + D;
      const float* v = q + 2 * D;
      float* p = probs + (b * heads + h) * S * S;
      gemm(Trans::no, Trans::yes, S, S, hd, q, ld, k, ld, 0.0f, p, S);  // scores
      for (int64_t i = 0; i < S; ++i) {
        float* row = p + i * S;
        float max = row[0] * scale;
        for (int64_t j = 0; j <= i; ++j) max = std::max(max, row[j] * scale);
        float sum = 0;
        for (int64_t j = 0; j <= i; ++j) {
          row[j] = exp_approx(row[j] * scale - max);
          sum += row[j];
        }
        float inv = 1.0f / sum;
        for (int64_t j = 0; j <= i; ++j) row[j] *= inv;
        for (int64_t j = i + 1; j < S; ++j) row[j] = 0.0f;  // causal: no looking ahead
      }
      gemm(Trans::no, Trans::no, S, hd, S, p, S, v, ld, 0.0f, out + b * S * D + h * hd, D);
    }
}

void attention_backward(const float* qkv, const float* probs, const float* dout, int64_t B, int64_t S,
                        int64_t heads, int64_t hd, float* dqkv) {
  const int64_t D = heads * hd, ld = 3 * D;
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  std::vector<float> dp(S * S);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < heads; ++h) {
      const float* q = qkv + b * S * ld + h * hd;
      const float* k = q + D;
      const float* v = q + 2 * D;
      const float* p = probs + (b * heads + h) * S * S;
      const float* dO = dout + b * S * D + h * hd;
      float* dq = dqkv + b * S * ld + h * hd;
      float* dk = dq + D;
      float* dv = dq + 2 * D;
      gemm(Trans::yes, Trans::no, S, hd, S, p, S, dO, D, 0.0f, dv, ld);        // dV = P^T dO
      gemm(Trans::no, Trans::yes, S, S, hd, dO, D, v, ld, 0.0f, dp.data(), S);  // dP = dO V^T
      for (int64_t i = 0; i < S; ++i) {                                         // softmax backward
        float* row = dp.data() + i * S;
        const float* pr = p + i * S;
        float inner = 0;
        for (int64_t j = 0; j <= i; ++j) inner += pr[j] * row[j];
        for (int64_t j = 0; j <= i; ++j) row[j] = pr[j] * (row[j] - inner) * scale;
        for (int64_t j = i + 1; j < S; ++j) row[j] = 0.0f;
      }
      gemm(Trans::no, Trans::no, S, hd, S, dp.data(), S, k, ld, 0.0f, dq, ld);   // dQ = dS K
      gemm(Trans::yes, Trans::no, S, hd, S, dp.data(), S, q, ld, 0.0f, dk, ld);  // dK = dS^T Q
    }
}

}  // namespace pm
