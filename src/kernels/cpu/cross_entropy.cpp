#include "kernels/cpu/cross_entropy.h"

#include <cmath>

#include "kernels/cpu/fast_math.h"

namespace pm {

void cross_entropy(const float* logits, const int32_t* targets, int64_t rows, int64_t V, float* losses,
                   float* dlogits, float scale) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* z = logits + r * V;
    float max = z[0];
    for (int64_t i = 1; i < V; ++i) max = std::max(max, z[i]);
    double sum = 0;
    for (int64_t i = 0; i < V; ++i) sum += exp_approx(z[i] - max);
    double log_sum = std::log(sum) + max;
    losses[r] = static_cast<float>(log_sum - z[targets[r]]);
    if (!dlogits) continue;
    float* d = dlogits + r * V;
    float inv = static_cast<float>(1.0 / sum);
    for (int64_t i = 0; i < V; ++i) d[i] = exp_approx(z[i] - max) * inv * scale;
    d[targets[r]] -= scale;
  }
}

void shard_row_max(const float* logits, int64_t rows, int64_t V, float* max) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* z = logits + r * V;
    float m = z[0];
    for (int64_t i = 1; i < V; ++i) m = std::max(m, z[i]);
    max[r] = m;
  }
}

void shard_exp_sums(const float* logits, const int32_t* targets, int64_t rows, int64_t V, int64_t lo, const float* max,
                    double* sums) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* z = logits + r * V;
    double sum = 0;
    for (int64_t i = 0; i < V; ++i) sum += exp_approx(z[i] - max[r]);
    const int64_t t = targets[r] - lo;
    sums[2 * r] = sum;
    sums[2 * r + 1] = t >= 0 && t < V ? z[t] : 0.0;
  }
}

void shard_cross_entropy(const float* logits, const int32_t* targets, int64_t rows, int64_t V, int64_t lo,
                         const float* max, const double* sums, float* losses, float* dlogits, float scale) {
  for (int64_t r = 0; r < rows; ++r) {
    const double sum = sums[2 * r];
    losses[r] = static_cast<float>(std::log(sum) + max[r] - sums[2 * r + 1]);
    if (!dlogits) continue;
    const float* z = logits + r * V;
    float* d = dlogits + r * V;
    const float inv = static_cast<float>(1.0 / sum);
    for (int64_t i = 0; i < V; ++i) d[i] = exp_approx(z[i] - max[r]) * inv * scale;
    const int64_t t = targets[r] - lo;
    if (t >= 0 && t < V) d[t] -= scale;
  }
}

}  // namespace pm
