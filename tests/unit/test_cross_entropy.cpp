// The softmax cross-entropy kernel against log-sum-exp in float64, and its vocabulary-parallel form
// (three phases over column shards) against the whole row.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "core/rng.h"
#include "kernels/cpu/cross_entropy.h"
#include "kernels/cpu/fast_math.h"

namespace pm {
namespace {

struct Rows {
  int64_t rows, V;
  std::vector<float> logits;
  std::vector<int32_t> targets;
};

// Vocabularies that are and are not multiples of the kernel's 8- and 32-wide steps, logits spread
// wide enough that some exponentials underflow to the clamp.
Rows random_rows(int64_t rows, int64_t V, float spread, uint64_t seed) {
  Rows r{rows, V, std::vector<float>(rows * V), std::vector<int32_t>(rows)};
  Rng rng(seed, 0);
  rng.fill_normal(r.logits.data(), rows * V, 0.0f, spread);
  for (auto& t : r.targets) t = static_cast<int32_t>(rng.uniform() * V);
  return r;
}

class CrossEntropy : public ::testing::TestWithParam<int64_t> {};

TEST_P(CrossEntropy, LossAndGradientMatchFloat64) {
  const int64_t V = GetParam();
  for (float spread : {0.5f, 4.0f, 30.0f}) {
    Rows r = random_rows(7, V, spread, 100 + V);
    std::vector<float> losses(r.rows), only_loss(r.rows), d(r.rows * V);
    const float scale = 0.25f;
    cross_entropy(r.logits.data(), r.targets.data(), r.rows, V, losses.data(), d.data(), scale);
    cross_entropy(r.logits.data(), r.targets.data(), r.rows, V, only_loss.data(), nullptr, scale);
    for (int64_t i = 0; i < r.rows; ++i) {
      const float* z = r.logits.data() + i * V;
      double max = z[0], sum = 0;
      for (int64_t j = 0; j < V; ++j) max = std::max(max, static_cast<double>(z[j]));
      for (int64_t j = 0; j < V; ++j) sum += std::exp(z[j] - max);
      const double loss = std::log(sum) + max - z[r.targets[i]];
      EXPECT_NEAR(losses[i], loss, 1e-5 * (1 + loss)) << "V " << V << " spread " << spread << " row " << i;
      EXPECT_EQ(losses[i], only_loss[i]) << "the loss without its gradient differs";
      for (int64_t j = 0; j < V; ++j) {
        const double want = (std::exp(z[j] - max) / sum - (j == r.targets[i] ? 1.0 : 0.0)) * scale;
        ASSERT_NEAR(d[i * V + j], want, 1e-6) << "V " << V << " spread " << spread << " row " << i << " col " << j;
      }
    }
  }
}

TEST_P(CrossEntropy, ShardsGiveTheWholeRowsLossAndGradient) {
  const int64_t V = std::max<int64_t>(GetParam(), 2);  // two shards need two columns
  Rows r = random_rows(5, V, 3.0f, 200 + V);
  std::vector<float> losses(r.rows), d(r.rows * V);
  cross_entropy(r.logits.data(), r.targets.data(), r.rows, V, losses.data(), d.data(), 1.0f);
  // two shards [0, cut) and [cut, V), each with its own copy of its columns, reduced as ranks would
  const int64_t cut = (V + 1) / 2;
  const int64_t widths[2] = {cut, V - cut}, los[2] = {0, cut};
  std::vector<float> shard[2], max[2], dshard[2], shard_losses(r.rows);
  std::vector<double> sums[2];
  for (int s = 0; s < 2; ++s) {
    shard[s].resize(r.rows * widths[s]);
    for (int64_t i = 0; i < r.rows; ++i)
      for (int64_t j = 0; j < widths[s]; ++j) shard[s][i * widths[s] + j] = r.logits[i * V + los[s] + j];
    max[s].resize(r.rows);
    shard_row_max(shard[s].data(), r.rows, widths[s], max[s].data());
  }
  std::vector<float> global_max(r.rows);
  for (int64_t i = 0; i < r.rows; ++i) global_max[i] = std::max(max[0][i], max[1][i]);
  for (int s = 0; s < 2; ++s) {
    sums[s].resize(2 * r.rows);
    shard_exp_sums(shard[s].data(), r.targets.data(), r.rows, widths[s], los[s], global_max.data(), sums[s].data());
  }
  std::vector<double> total(2 * r.rows);
  for (int64_t k = 0; k < 2 * r.rows; ++k) total[k] = sums[0][k] + sums[1][k];
  for (int s = 0; s < 2; ++s) {
    dshard[s].resize(r.rows * widths[s]);
    shard_cross_entropy(shard[s].data(), r.targets.data(), r.rows, widths[s], los[s], global_max.data(), total.data(),
                        shard_losses.data(), dshard[s].data(), 1.0f);
  }
  for (int64_t i = 0; i < r.rows; ++i) {
    EXPECT_NEAR(shard_losses[i], losses[i], 1e-5 * (1 + losses[i])) << "row " << i;
    for (int s = 0; s < 2; ++s)
      for (int64_t j = 0; j < widths[s]; ++j)
        ASSERT_NEAR(dshard[s][i * widths[s] + j], d[i * V + los[s] + j], 1e-7) << "row " << i << " col " << los[s] + j;
  }
}

// The bits the kernel defines, written out one value at a time: each exponential exp_approx(z -
// max), summed in double into 32 running sums (value i into sum i mod 32), the sums added in
// order; the gradient e * (1 / sum) * scale, less scale at the target. The sums in double are
// checked as the vocabulary-parallel phase returns them (a float loss seldom shows their order).
// Fails if the vector loop sums in another order or skips a value.
TEST_P(CrossEntropy, GivesTheWrittenOutSumsBits) {
  const int64_t V = GetParam();
  const Rows r = random_rows(5, V, 4.0f, 11);
  std::vector<float> losses(r.rows), d(r.rows * V), want_d(r.rows * V), maxes(r.rows);
  std::vector<double> sums(2 * r.rows);
  const float scale = 1.0f / 3;
  cross_entropy(r.logits.data(), r.targets.data(), r.rows, V, losses.data(), d.data(), scale);
  shard_row_max(r.logits.data(), r.rows, V, maxes.data());
  shard_exp_sums(r.logits.data(), r.targets.data(), r.rows, V, 0, maxes.data(), sums.data());
  for (int64_t row = 0; row < r.rows; ++row) {
    const float* z = r.logits.data() + row * V;
    const float max = *std::max_element(z, z + V);
    double lanes[32] = {};
    for (int64_t i = 0; i < V; ++i) lanes[i % 32] += exp_approx(z[i] - max);
    double sum = 0;
    for (double l : lanes) sum += l;
    EXPECT_EQ(0, std::memcmp(&sum, &sums[2 * row], sizeof(double))) << "row " << row << "'s sum";
    const float loss = static_cast<float>(std::log(sum) + max - z[r.targets[row]]);
    EXPECT_EQ(0, std::memcmp(&loss, &losses[row], sizeof(float))) << "row " << row;
    const float inv = static_cast<float>(1.0 / sum);
    for (int64_t i = 0; i < V; ++i) want_d[row * V + i] = exp_approx(z[i] - max) * inv * scale;
    want_d[row * V + r.targets[row]] -= scale;
  }
  EXPECT_EQ(0, std::memcmp(want_d.data(), d.data(), d.size() * sizeof(float)));
}

INSTANTIATE_TEST_SUITE_P(Vocabularies, CrossEntropy, ::testing::Values(1, 7, 8, 31, 32, 33, 100, 2048, 2053),
                         [](const ::testing::TestParamInfo<int64_t>& p) { return std::string("V").append(std::to_string(p.param)); });

}  // namespace
}  // namespace pm
