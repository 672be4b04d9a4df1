#include "kernels/cpu/cross_entropy.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "kernels/cpu/fast_math.h"
#include "kernels/cpu/lanes.h"

namespace pm {
namespace {

using lanes::Lanes;
typedef double Doubles8 __attribute__((vector_size(8 * sizeof(double))));

// Elements per step of the row loops: two vectors of 16 side by side (each exp is a long chain of
// dependent operations; one vector at a time left the core waiting on it, as in elementwise.cpp).
constexpr int64_t kStep = 32;

// The largest logit of a row: a maximum is the same in any order.
float row_max(const float* z, int64_t V) {
  float m = z[0];
  int64_t i = 0;
  if (V >= 16) {
    Lanes mv = lanes::load16(z);
    for (i = 16; i + 16 <= V; i += 16) {
      const Lanes x = lanes::load16(z + i);
      mv = mv > x ? mv : x;
    }
    for (int j = 0; j < 16; ++j) m = std::max(m, mv[j]);
  }
  for (; i < V; ++i) m = std::max(m, z[i]);
  return m;
}

// 8 of a vector's floats, from lane `first` on, widened to double (exactly).
template <int first>
[[gnu::always_inline]] inline Doubles8 widen8(const Lanes& x) {
  return __builtin_convertvector(
      __builtin_shufflevector(x, x, first, first + 1, first + 2, first + 3, first + 4, first + 5, first + 6, first + 7),
      Doubles8);
}

// e[i] = exp(z[i] - max) for the row, and their sum in double: 32 running sums, element i into sum
// i mod 32, added at the end in that order. A fixed order (the same bits wherever the row is and
// whoever computes it) that does not wait on one add after another as a single running sum did.
// The 32 sums are four vectors of 8 doubles: with vectors of 8 floats and the sums added one by
// one, the loss and its gradient took 1.6x the time (1536 x 2048 logits, Zen 5: 0.66 ns a value).
double row_exps(const float* z, int64_t V, float max, float* e) {
  Doubles8 sums[4] = {};
  int64_t i = 0;
  for (; i + kStep <= V; i += kStep) {
    const Lanes x0 = exp_approx(lanes::load16(z + i) - max), x1 = exp_approx(lanes::load16(z + i + 16) - max);
    std::memcpy(e + i, &x0, sizeof(x0));
    std::memcpy(e + i + 16, &x1, sizeof(x1));
    sums[0] += widen8<0>(x0);
    sums[1] += widen8<8>(x0);
    sums[2] += widen8<0>(x1);
    sums[3] += widen8<8>(x1);
  }
  double lanes[kStep];
  std::memcpy(lanes, sums, sizeof(lanes));
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
