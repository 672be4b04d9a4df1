#include <gtest/gtest.h>

#include "core/rng.h"
#include "perf/linear_fit.h"

namespace pm {
namespace {

TEST(LinearFit, RecoversNonNegativeCoefficientsOnWildlyScaledFeatures) {
  // t = 2e-4 + 5e-5 * calls + 1e-11 * flops + 0 * bytes, with 1% noise
  Rng rng(5, 5);
  std::vector<std::vector<double>> X;
  std::vector<double> y;
  for (int i = 0; i < 200; ++i) {
    double calls = 1 + static_cast<int>(rng.uniform() * 8), flops = rng.uniform() * 4e9, bytes = rng.uniform() * 1e7;
    X.push_back({1, calls, flops, bytes});
    y.push_back((2e-4 + 5e-5 * calls + 1e-11 * flops) * (1 + 0.01 * rng.normal()));
  }
  LinearFit f = fit_nonnegative(X, y);
  EXPECT_NEAR(f.coef[2], 1e-11, 2e-13);
  EXPECT_NEAR(f.coef[0] + f.coef[1] * 4, 2e-4 + 5e-5 * 4, 1e-4);
  for (double c : f.coef) EXPECT_GE(c, 0);
  EXPECT_GT(f.r2, 0.99);
  EXPECT_LT(f.median_rel_err, 0.02);
}

TEST(LinearFit, ClampsATermTheDataWouldMakeNegative) {
  // y falls with x2 in this data, but a negative cost per byte is impossible: it stays 0
  std::vector<std::vector<double>> X = {{1, 1, 10}, {1, 2, 20}, {1, 3, 5}, {1, 4, 1}};
  std::vector<double> y = {1.0, 1.8, 3.1, 4.2};
  LinearFit f = fit_nonnegative(X, y);
  for (double c : f.coef) EXPECT_GE(c, 0);
  EXPECT_GT(f.coef[1], 0.9);
}

TEST(LinearFit, AlwaysZeroFeaturesStayOut) {
  std::vector<std::vector<double>> X = {{1, 0, 2}, {1, 0, 4}, {1, 0, 6}};
  std::vector<double> y = {3, 5, 7};
  LinearFit f = fit_nonnegative(X, y);
  EXPECT_NEAR(f.coef[0], 1, 1e-6);
  EXPECT_EQ(f.coef[1], 0);
  EXPECT_NEAR(f.coef[2], 1, 1e-6);
}

}  // namespace
}  // namespace pm
