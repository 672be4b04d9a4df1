#include "perf/planner.h"

#include "moe/routing.h"

namespace pm {

std::vector<int> candidate_degrees(int64_t capacity) {
  std::vector<int> out;
  for (int r : {1, 2, 3, 4, 6, 8, 12, 16})
    if (r <= capacity) out.push_back(r);
  return out;
}

double predict_layer(const PerfProfile& profile, const MoeShape& shape, int degree, bool forward,
                     const MoeStrategy& strategy) {
  TaskGraph graph;
  if (forward)
    strategy.plan_forward(graph, {}, shape, degree);
  else
    strategy.plan_backward(graph, {}, shape, degree);
  return simulate(graph, [&](const Task& t) { return profile.predict(t); }, profile.interference).makespan_s;
}

LayerPlan plan_layer(const PerfProfile& profile, const MoeShape& s, double tolerance, const MoeStrategy& strategy) {
  LayerPlan plan;
  double best_fwd = 0, best_bwd = 0;
  for (int r : candidate_degrees(s.capacity())) {
    DegreePrediction p{r, predict_layer(profile, s, r, true, strategy), predict_layer(profile, s, r, false, strategy)};
    if (plan.candidates.empty() || p.forward_s < best_fwd) best_fwd = p.forward_s;
    if (plan.candidates.empty() || p.backward_s < best_bwd) best_bwd = p.backward_s;
    plan.candidates.push_back(p);
  }
  // The smallest degree within the tolerance of the fastest: once the link is saturated the
  // predictions go flat, and a few more chunks for a gain far below the model's error only add
  // per-chunk costs the linear models do not see (measured: high degrees lose on flat curves).
  bool fwd_set = false, bwd_set = false;
  for (const DegreePrediction& p : plan.candidates) {
    if (!fwd_set && p.forward_s <= best_fwd * (1 + tolerance))
      plan.forward_degree = p.degree, plan.forward_s = p.forward_s, fwd_set = true;
    if (!bwd_set && p.backward_s <= best_bwd * (1 + tolerance))
      plan.backward_degree = p.degree, plan.backward_s = p.backward_s, bwd_set = true;
  }
  return plan;
}

}  // namespace pm
