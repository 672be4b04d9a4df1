#include "perf/degree_choice.h"

#include <algorithm>

#include "core/error.h"
#include "moe/routing.h"

namespace pm {

int parse_degree(const std::string& text, const char* flag) {
  if (text == "auto") return 0;
  std::size_t used = 0;
  int value = 0;
  try {
    value = std::stoi(text, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  PM_REQUIRE(used == text.size() && value >= 1, "{} must be a positive number of chunks or 'auto', got '{}'", flag, text);
  return value;
}

DegreeChoice choose_degrees(int forward_request, int backward_request, const PerfProfile* profile,
                            const LayerShape& shape, int refine,
                            const std::function<std::pair<double, double>(int, int)>& measure) {
  DegreeChoice choice;
  choice.forward = forward_request;
  choice.backward = backward_request;
  if (forward_request > 0 && backward_request > 0) return choice;

  std::vector<int> fwd_candidates, bwd_candidates;
  if (profile) {
    choice.plan = plan_layer(*profile, shape);
    choice.planned_forward = choice.plan->forward_degree;
    choice.planned_backward = choice.plan->backward_degree;
    // the planner's best `refine` degrees for each direction
    auto best = [&](bool forward) {
      std::vector<DegreePrediction> c = choice.plan->candidates;
      std::sort(c.begin(), c.end(), [&](const auto& a, const auto& b) {
        return forward ? a.forward_s < b.forward_s : a.backward_s < b.backward_s;
      });
      std::vector<int> out;
      for (int i = 0; i < std::max(1, refine) && i < static_cast<int>(c.size()); ++i) out.push_back(c[i].degree);
      return out;
    };
    fwd_candidates = best(true);
    bwd_candidates = best(false);
  } else {
    int64_t capacity = expert_capacity(shape.top_k, shape.capacity_factor, shape.tokens, shape.experts);
    fwd_candidates = bwd_candidates = candidate_degrees(capacity);
  }
  if (forward_request == 0) choice.forward = fwd_candidates[0];
  if (backward_request == 0) choice.backward = bwd_candidates[0];
  bool time_fwd = forward_request == 0 && fwd_candidates.size() > 1;
  bool time_bwd = backward_request == 0 && bwd_candidates.size() > 1;
  if (!time_fwd && !time_bwd) return choice;

  // Time candidates in pairs (forward i with backward i) so that each pass serves both searches.
  choice.measured = true;
  double best_fwd = 0, best_bwd = 0;
  std::size_t n = std::max(time_fwd ? fwd_candidates.size() : 1, time_bwd ? bwd_candidates.size() : 1);
  for (std::size_t i = 0; i < n; ++i) {
    int f = time_fwd ? fwd_candidates[std::min(i, fwd_candidates.size() - 1)] : choice.forward;
    int b = time_bwd ? bwd_candidates[std::min(i, bwd_candidates.size() - 1)] : choice.backward;
    auto [fs, bs] = measure(f, b);
    if (time_fwd && (i == 0 || fs < best_fwd)) best_fwd = fs, choice.forward = f;
    if (time_bwd && (i == 0 || bs < best_bwd)) best_bwd = bs, choice.backward = b;
  }
  return choice;
}

}  // namespace pm
