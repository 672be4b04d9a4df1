// The planner: predicts a layer's forward and backward time for each candidate pipeline degree by
// simulating the layer's own task graphs with the profile's models, and picks the fastest degree
// for each direction separately.
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

LayerPlan plan_layer(const PerfProfile& profile, const LayerShape& shape);

}  // namespace pm
