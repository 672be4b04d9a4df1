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

}  // namespace pm
