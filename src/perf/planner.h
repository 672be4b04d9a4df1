// The planner: predicts a layer's forward and backward time for each candidate pipeline degree by
// simulating the layer's own task graphs with the profile's models, and picks, for each direction
// separately, the smallest degree predicted within `tolerance` of the fastest.
#pragma once

#include <cstdint>
#include <vector>

#include "moe/moe_layer.h"
#include "perf/perf_profile.h"

namespace pm {

struct DegreePrediction {
  int degree = 1;
  double forward_s = 0, backward_s = 0;
};

struct LayerPlan {
  std::vector<DegreePrediction> candidates;
  int forward_degree = 1, backward_degree = 1;
  double forward_s = 0, backward_s = 0;
};

// 1, 2, 3, 4, 6, 8, 12, 16, as far as the capacity allows.
std::vector<int> candidate_degrees(int64_t capacity);

// Predicted seconds of one direction at one degree (balanced routing assumed), by simulating the
// strategy's own tasks.
double predict_layer(const PerfProfile& profile, const MoeShape& shape, int degree, bool forward,
                     const MoeStrategy& strategy = moe_strategy("ep"));

// 1%: a predicted gain smaller than that is well inside the models' error.
constexpr double kPlanTolerance = 0.01;
LayerPlan plan_layer(const PerfProfile& profile, const MoeShape& shape, double tolerance = kPlanTolerance,
                     const MoeStrategy& strategy = moe_strategy("ep"));

}  // namespace pm
