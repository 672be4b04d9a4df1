#include "perf/planner.h"

#include <algorithm>
#include <functional>
#include <map>

#include "core/error.h"
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

LayerPlan pick_degrees(std::vector<DegreePrediction> candidates, double tolerance) {
  LayerPlan plan;
  double best_fwd = 0, best_bwd = 0;
  for (const DegreePrediction& p : candidates) {
    if (&p == &candidates.front() || p.forward_s < best_fwd) best_fwd = p.forward_s;
    if (&p == &candidates.front() || p.backward_s < best_bwd) best_bwd = p.backward_s;
  }
  plan.candidates = std::move(candidates);
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

LayerPlan keep_current_within(LayerPlan plan, int current_forward, int current_backward, double margin) {
  for (const DegreePrediction& p : plan.candidates) {
    if (p.degree == current_forward && p.forward_s <= plan.forward_s * (1 + margin))
      plan.forward_degree = p.degree, plan.forward_s = p.forward_s;
    if (p.degree == current_backward && p.backward_s <= plan.backward_s * (1 + margin))
      plan.backward_degree = p.degree, plan.backward_s = p.backward_s;
  }
  return plan;
}

namespace {

double simulated_s(const PerfProfile& profile, const TaskGraph& graph) {
  return simulate(graph, [&](const Task& t) { return profile.predict(t); }, profile.interference).makespan_s;
}

// Every candidate degree's predictions (predict(degree, forward)), and the choice.
LayerPlan plan_from(int64_t capacity, double tolerance, const std::function<double(int, bool)>& predict) {
  std::vector<DegreePrediction> candidates;
  for (int r : candidate_degrees(capacity)) candidates.push_back({r, predict(r, true), predict(r, false)});
  return pick_degrees(std::move(candidates), tolerance);
}

}  // namespace

LayerPlan plan_layer(const PerfProfile& profile, const MoeShape& s, double tolerance, const MoeStrategy& strategy) {
  return plan_from(s.capacity(), tolerance,
                   [&](int r, bool forward) { return predict_layer(profile, s, r, forward, strategy); });
}

LayerPlan plan_layer_from_pass(const PerfProfile& profile, const MoeLayer& layer, const MoePass& pass,
                               double tolerance) {
  const MoeShape shape = layer.shape().with_tokens(pass.routing().tokens);
  return plan_from(shape.capacity(), tolerance, [&](int r, bool forward) {
    TaskGraph graph;
    layer.plan_pass(graph, pass, r, forward);
    return simulated_s(profile, graph);
  });
}

double comm_scale_for(const PerfProfile& profile, const MoeShape& shape, int degree, bool forward,
                      double measured_comm_s, const MoeStrategy& strategy) {
  TaskGraph graph;
  if (forward)
    strategy.plan_forward(graph, {}, shape, degree);
  else
    strategy.plan_backward(graph, {}, shape, degree);
  double predicted = 0;
  for (const Task& t : graph.tasks())
    if (t.lane == lanes::comm) predicted += profile.predict(t);
  if (!(predicted > 0) || !(measured_comm_s > 0)) return 1.0;
  return std::clamp(measured_comm_s / predicted, 0.25, 4.0);
}

double predict_window(const PerfProfile& profile, const MoeShape& shape, int degree, int slot,
                      const std::vector<double>& dense_s, bool forward, const MoeStrategy& strategy,
                      double comm_scale) {
  const int n = static_cast<int>(dense_s.size());
  PM_REQUIRE(slot >= 0 && slot <= n, "predict_window: slot {} outside 0..{}", slot, n);
  TaskGraph graph;
  std::map<int, double> measured;  // task id -> seconds, for the dense tasks
  int last = -1;
  auto dense = [&](TaskGraph& g, int i) {
    last = g.add({"dense", lanes::compute, "measured", -1, {}, last < 0 ? std::vector<int>{} : std::vector<int>{last}, {}});
    measured[last] = dense_s[i];
  };
  Between between = [&](TaskGraph& g) {
    for (int i = 0; i < slot; ++i) dense(g, i);
  };
  PassTasks layer = forward ? strategy.plan_forward(graph, {}, shape, degree, between)
                            : strategy.plan_backward(graph, {}, shape, degree, between);
  for (int i = slot; i < n; ++i) dense(graph, i);
  std::vector<int> end = layer.grads;  // the backward's weight gradients are compute work too
  end.push_back(layer.output);
  if (last >= 0) end.push_back(last);
  graph.add({"reads the output", lanes::compute, "measured", -1, {}, end, {}});
  return simulate(graph,
                  [&](const Task& t) {
                    auto it = measured.find(&t - graph.tasks().data());
                    if (it != measured.end()) return it->second;
                    if (t.cost == "measured") return 0.0;
                    return profile.predict(t) * (t.lane == lanes::comm ? comm_scale : 1.0);
                  },
                  profile.interference)
      .makespan_s;
}

WindowPlan plan_window(const PerfProfile& profile, const MoeShape& shape, const std::vector<double>& dense_s,
                       bool forward, double tolerance, const MoeStrategy& strategy, double comm_scale) {
  std::vector<WindowPlan> best_per_degree;
  double fastest = 0;
  for (int r : candidate_degrees(shape.capacity())) {
    WindowPlan best{r, 0, 0};
    for (int slot = 0; slot <= static_cast<int>(dense_s.size()); ++slot) {
      double t = predict_window(profile, shape, r, slot, dense_s, forward, strategy, comm_scale);
      if (slot == 0 || t < best.predicted_s) best.slot = slot, best.predicted_s = t;
    }
    if (best_per_degree.empty() || best.predicted_s < fastest) fastest = best.predicted_s;
    best_per_degree.push_back(best);
  }
  for (const WindowPlan& p : best_per_degree)
    if (p.predicted_s <= fastest * (1 + tolerance)) return p;
  return best_per_degree.front();
}

}  // namespace pm
