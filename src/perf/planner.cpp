#include "perf/planner.h"

#include "moe/layer_graph.h"
#include "moe/routing.h"

namespace pm {

std::vector<int> candidate_degrees(int64_t capacity) {
  std::vector<int> out;
  for (int r : {1, 2, 3, 4, 6, 8, 12, 16})
    if (r <= capacity) out.push_back(r);
  return out;
}

double predict_layer(const PerfProfile& profile, const LayerShape& s, int degree, bool forward) {
  LayerGraphSizes sizes = balanced_sizes(s.tokens, s.model_dim, s.hidden, s.experts, s.top_k,
                                         s.capacity_factor, s.ranks, degree);
  TaskGraph graph = forward ? build_forward_graph(sizes, nullptr) : build_backward_graph(sizes, nullptr);
  return simulate(graph, [&](const Task& t) { return profile.predict(t); }, profile.interference).makespan_s;
}

LayerPlan plan_layer(const PerfProfile& profile, const LayerShape& s) {
  LayerPlan plan;
  int64_t capacity = expert_capacity(s.top_k, s.capacity_factor, s.tokens, s.experts);
  for (int r : candidate_degrees(capacity)) {
    DegreePrediction p{r, predict_layer(profile, s, r, true), predict_layer(profile, s, r, false)};
    plan.candidates.push_back(p);
    if (plan.candidates.size() == 1 || p.forward_s < plan.forward_s) plan.forward_degree = r, plan.forward_s = p.forward_s;
    if (plan.candidates.size() == 1 || p.backward_s < plan.backward_s) plan.backward_degree = r, plan.backward_s = p.backward_s;
  }
  return plan;
}

}  // namespace pm
