#include "kernels/cpu/attention.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "kernels/cpu/fast_math.h"
#include "kernels/cpu/gemm.h"

namespace pm {

// Per (sequence, head): row-strided views into qkv (ld = D + 2 Dkv) and out (ld = D), GEMMs on
// them; query head h reads key/value head h / group.
void attention_forward(const float* qkv, int64_t B, int64_t S, int64_t heads, int64_t kv_heads, int64_t hd, float* probs,
                       float* out) {
  const int64_t D = heads * hd, Dkv = kv_heads * hd, ld = D + 2 * Dkv, group = heads / kv_heads;
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < heads; ++h) {
      const float* q = qkv + b * S * ld + h * hd;
      const float* k = qkv + b * S * ld + D + (h / group) * hd;
      const float* v = k + Dkv;
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

void attention_decode(const float* qkv, float* k_cache, float* v_cache, const int64_t* pos, const int64_t* rows,
                      int64_t B, int64_t S_max, int64_t heads, int64_t kv_heads, int64_t hd, float* out) {
  const int64_t D = heads * hd, Dkv = kv_heads * hd, ld = D + 2 * Dkv, group = heads / kv_heads;
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  std::vector<float> row(S_max), acc(hd);
  for (int64_t b = 0; b < B; ++b) {
    const int64_t t = pos[b];
    const int64_t cache_row = rows ? rows[b] : b;
    float* kc = k_cache + cache_row * S_max * Dkv;
    float* vc = v_cache + cache_row * S_max * Dkv;
    for (int64_t i = 0; i < Dkv; ++i)
      kc[i * S_max + t] = qkv[b * ld + D + i], vc[t * Dkv + i] = qkv[b * ld + D + Dkv + i];
    for (int64_t h = 0; h < heads; ++h) {
      const float* q = qkv + b * ld + h * hd;
      const float* kh = kc + (h / group) * hd * S_max;  // this head's keys, [hd, S_max]
      // scores: the GEMM's chain, one fused multiply-add per k in order from zero. The keys are kept
      // transposed, so that consecutive positions lie side by side: 32, then 8 positions at a time
      // advance together in vector lanes, each lane its own chain
      int64_t j = 0;
      for (; j + 32 <= t + 1; j += 32) {
        float c[32] = {};
        for (int64_t k = 0; k < hd; ++k)
          for (int u = 0; u < 32; ++u) c[u] = std::fma(q[k], kh[k * S_max + j + u], c[u]);
        for (int u = 0; u < 32; ++u) row[j + u] = c[u];
      }
      for (; j + 8 <= t + 1; j += 8) {
        float c[8] = {};
        for (int64_t k = 0; k < hd; ++k)
          for (int u = 0; u < 8; ++u) c[u] = std::fma(q[k], kh[k * S_max + j + u], c[u]);
        for (int u = 0; u < 8; ++u) row[j + u] = c[u];
      }
      for (; j <= t; ++j) {
        float c = 0.0f;
        for (int64_t k = 0; k < hd; ++k) c = std::fma(q[k], kh[k * S_max + j], c);
        row[j] = c;
      }
      float max = row[0] * scale;
      for (int64_t j = 0; j <= t; ++j) max = std::max(max, row[j] * scale);
      float sum = 0;
      for (int64_t j = 0; j <= t; ++j) {
        row[j] = exp_approx(row[j] * scale - max);
        sum += row[j];
      }
      float inv = 1.0f / sum;
      for (int64_t j = 0; j <= t; ++j) row[j] *= inv;
      // out = P V: the GEMM's chain over positions in order (the causal zeros after t add nothing),
      // every output element's chain advanced one position at a time (vectorised over d)
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (int64_t p = 0; p <= t; ++p) {
        const float w = row[p], *v = vc + p * Dkv + (h / group) * hd;
        for (int64_t d = 0; d < hd; ++d) acc[d] = std::fma(w, v[d], acc[d]);
      }
      std::copy(acc.begin(), acc.end(), out + b * D + h * hd);
    }
  }
}

void attention_backward(const float* qkv, const float* probs, const float* dout, int64_t B, int64_t S,
                        int64_t heads, int64_t kv_heads, int64_t hd, float* dqkv) {
  const int64_t D = heads * hd, Dkv = kv_heads * hd, ld = D + 2 * Dkv, group = heads / kv_heads;
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  std::vector<float> dp(S * S);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < heads; ++h) {
      const float* q = qkv + b * S * ld + h * hd;
      const float* k = qkv + b * S * ld + D + (h / group) * hd;
      const float* v = k + Dkv;
      const float* p = probs + (b * heads + h) * S * S;
      const float* dO = dout + b * S * D + h * hd;
      float* dq = dqkv + b * S * ld + h * hd;
      float* dk = dqkv + b * S * ld + D + (h / group) * hd;
      float* dv = dk + Dkv;
      // a key/value head's gradients: the sum over its group's query heads, in head order
      const float into = h % group == 0 ? 0.0f : 1.0f;
      gemm(Trans::yes, Trans::no, S, hd, S, p, S, dO, D, into, dv, ld);        // dV = P^T dO
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
      gemm(Trans::yes, Trans::no, S, hd, S, dp.data(), S, q, ld, into, dk, ld);  // dK = dS^T Q
    }
}

}  // namespace pm
