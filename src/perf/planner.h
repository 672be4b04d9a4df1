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

// The rule: per direction, the smallest candidate degree predicted within `tolerance` of the
// fastest. (Ranks that predict apart take the slowest rank's prediction per candidate first.)
LayerPlan pick_degrees(std::vector<DegreePrediction> candidates, double tolerance = kPlanTolerance);

// Re-planning a layer that already runs at some degrees (perhaps timed by the refinement): keep
// each direction's current degree unless `plan` predicts it slower than its own pick by more than
// `margin`. Predicted differences below the models' error are no evidence against degrees that
// were measured (seen in training at 1 Gbit/s: the refinement timed 3/4, the re-plan from the
// routing moved the backward to a predicted-equal 2, and the run was 6% slower than a fixed 4),
// and a layer does not flap between degrees as its routing drifts a little.
constexpr double kReplanMargin = 0.05;
LayerPlan keep_current_within(LayerPlan plan, int current_forward, int current_backward, double margin = kReplanMargin);

// The same choice for one layer from the rows its last pass really routed (MoeLayer::plan_pass):
// an imbalanced layer's busiest rank and link set its time, not the balanced share.
LayerPlan plan_layer_from_pass(const PerfProfile& profile, const MoeLayer& layer, const MoePass& pass,
                               double tolerance = kPlanTolerance);

// ScMoE's window: a layer whose experts wait behind `slot` dense tasks laid beside its dispatch,
// the rest of the dense tasks running beside its combine, and a task that reads the layer's
// output and the last dense task's at the end. dense_s: the dense tasks' seconds, in their order
// (measured: the profile has no model of attention or the MLP); the layer's own tasks as the
// profile predicts them, the communication lane's times by comm_scale (what the last pass
// measured over what the profile predicts, comm_scale_for: the profile's network model may be off
// for this run, and the run has just measured it). Predicted seconds of that window.
double predict_window(const PerfProfile& profile, const MoeShape& shape, int degree, int slot,
                      const std::vector<double>& dense_s, bool forward, const MoeStrategy& strategy = moe_strategy("ep"),
                      double comm_scale = 1.0);
// measured_comm_s: a pass's communication-lane seconds at `degree`; returns it over the profile's
// prediction of the same (in [0.25, 4]: a measurement far outside that is not the network).
double comm_scale_for(const PerfProfile& profile, const MoeShape& shape, int degree, bool forward,
                      double measured_comm_s, const MoeStrategy& strategy = moe_strategy("ep"));

struct WindowPlan {
  int degree = 1, slot = 0;
  double predicted_s = 0;
  double comm_scale = 1.0;  // the communication's measured over predicted time it planned with
};
// The slot and degree of the shortest predicted window: the smallest degree within `tolerance`
// of the fastest (each degree at its best slot).
WindowPlan plan_window(const PerfProfile& profile, const MoeShape& shape, const std::vector<double>& dense_s,
                       bool forward, double tolerance = kPlanTolerance,
                       const MoeStrategy& strategy = moe_strategy("ep"), double comm_scale = 1.0);

}  // namespace pm
