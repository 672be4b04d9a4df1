// The planner: predicts a layer's forward and backward time for each candidate pipeline degree by
// simulating the layer's own task graphs with the profile's models, and picks, for each direction
// separately, the smallest degree predicted within `tolerance` of the fastest.
#pragma once

#include <cstdint>
#include <vector>

#include "perf/perf_profile.h"

namespace pm {

struct LayerShape {
  int64_t tokens = 0;  // per rank
  int64_t model_dim = 0;
  int64_t hidden = 0;
  int experts = 0;
  int top_k = 1;
  double capacity_factor = 1.0;
  int ranks = 1;
};

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

// Predicted seconds of one direction at one degree (balanced routing assumed).
double predict_layer(const PerfProfile& profile, const LayerShape& shape, int degree, bool forward);

// 1%: a predicted gain smaller than that is well inside the models' error.
constexpr double kPlanTolerance = 0.01;
LayerPlan plan_layer(const PerfProfile& profile, const LayerShape& shape, double tolerance = kPlanTolerance);

}  // namespace pm
