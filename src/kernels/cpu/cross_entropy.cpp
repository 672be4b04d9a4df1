#include "kernels/cpu/cross_entropy.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "kernels/cpu/fast_math.h"

namespace pm {
namespace {

typedef float Vec8 __attribute__((vector_size(8 * sizeof(float))));

// Elements per step of the row loops: four vectors side by side (each exp is a long chain of
// dependent operations; one vector at a time left the core waiting on it, as in elementwise.cpp).
constexpr int64_t kStep = 32;

// The largest logit of a row: a maximum is the same in any order.
float row_max(const float* z, int64_t V) {
  float m = z[0];
  int64_t i = 0;
  if (V >= 8) {
    Vec8 mv;
    std::memcpy(&mv, z, sizeof(Vec8));
    for (i = 8; i + 8 <= V; i += 8) {
      Vec8 x;
      std::memcpy(&x, z + i, sizeof(Vec8));
      mv = mv > x ? mv : x;
    }
    for (int j = 0; j < 8; ++j) m = std::max(m, mv[j]);
  }
  for (; i < V; ++i) m = std::max(m, z[i]);
  return m;
}

// e[i] = exp(z[i] - max) for the row, and their sum in double: 32 running sums, element i into sum
// i mod 32, added at the end in that order. A fixed order (the same bits wherever the row is and
// whoever computes it) that does not wait on one add after another as a single running sum did.
double row_exps(const float* z, int64_t V, float max, float* e) {
  double lanes[kStep] = {};
  const Vec8 m = {max, max, max, max, max, max, max, max};
  int64_t i = 0;
  for (; i + kStep <= V; i += kStep) {
    Vec8 x[4];
    std::memcpy(x, z + i, sizeof(x));
    for (int v = 0; v < 4; ++v) x[v] = exp_approx(x[v] - m);
    std::memcpy(e + i, x, sizeof(x));
    for (int j = 0; j < kStep; ++j) lanes[j] += e[i + j];
  }
  for (; i < V; ++i) {
    e[i] = exp_approx(z[i] - max);
    lanes[i % kStep] += e[i];
  }
  double sum = 0;
  for (int j = 0; j < kStep; ++j) sum += lanes[j];
  return sum;
}

// d[i] = e[i] * inv * scale, in place (e may be d).
void scale_row(float* d, int64_t V, float inv, float scale) {
  for (int64_t i = 0; i < V; ++i) d[i] = d[i] * inv * scale;
}

// A row's exponentials where the caller keeps none (the loss without its gradient).
float* scratch_row(int64_t V) {
  thread_local std::vector<float> row;
  if (static_cast<int64_t>(row.size()) < V) row.resize(V);
  return row.data();
}

}  // namespace

void cross_entropy(const float* logits, const int32_t* targets, int64_t rows, int64_t V, float* losses,
                   float* dlogits, float scale) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* z = logits + r * V;
    const float max = row_max(z, V);
    float* e = dlogits ? dlogits + r * V : scratch_row(V);
    const double sum = row_exps(z, V, max, e);
    losses[r] = static_cast<float>(std::log(sum) + max - z[targets[r]]);
    if (!dlogits) continue;
    scale_row(e, V, static_cast<float>(1.0 / sum), scale);
    e[targets[r]] -= scale;
  }
}

void shard_row_max(const float* logits, int64_t rows, int64_t V, float* max) {
  for (int64_t r = 0; r < rows; ++r) max[r] = row_max(logits + r * V, V);
}

void shard_exp_sums(const float* logits, const int32_t* targets, int64_t rows, int64_t V, int64_t lo, const float* max,
                    double* sums) {
  float* e = scratch_row(V);
  for (int64_t r = 0; r < rows; ++r) {
    const float* z = logits + r * V;
    const int64_t t = targets[r] - lo;
    sums[2 * r] = row_exps(z, V, max[r], e);
    sums[2 * r + 1] = t >= 0 && t < V ? z[t] : 0.0;
  }
}

void shard_cross_entropy(const float* logits, const int32_t* targets, int64_t rows, int64_t V, int64_t lo,
                         const float* max, const double* sums, float* losses, float* dlogits, float scale) {
  for (int64_t r = 0; r < rows; ++r) {
    const double sum = sums[2 * r];
    losses[r] = static_cast<float>(std::log(sum) + max[r] - sums[2 * r + 1]);
    if (!dlogits) continue;
    float* d = dlogits + r * V;
    row_exps(logits + r * V, V, max[r], d);
    scale_row(d, V, static_cast<float>(1.0 / sum), scale);
    const int64_t t = targets[r] - lo;
    if (t >= 0 && t < V) d[t] -= scale;
  }
}

}  // namespace pm
