#include "perf/degree_choice.h"

#include <algorithm>

#include "core/error.h"
#include "core/stats.h"

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
                            const MoeShape& shape, int refine,
                            const std::function<std::pair<double, double>(int, int)>& measure, int rounds,
                            const MoeStrategy& strategy) {
  DegreeChoice choice;
  choice.forward = forward_request;
  choice.backward = backward_request;
  if (forward_request > 0 && backward_request > 0) return choice;

  std::vector<int> fwd_candidates, bwd_candidates;
  if (profile) {
    choice.plan = plan_layer(*profile, shape, kPlanTolerance, strategy);
    choice.planned_forward = choice.plan->forward_degree;
    choice.planned_backward = choice.plan->backward_degree;
    // the planner's pick, then its next best predictions, `refine` degrees in all
    auto best = [&](bool forward) {
      std::vector<DegreePrediction> c = choice.plan->candidates;
      std::stable_sort(c.begin(), c.end(), [&](const auto& a, const auto& b) {
        return forward ? a.forward_s < b.forward_s : a.backward_s < b.backward_s;
      });
      std::vector<int> out = {forward ? choice.planned_forward : choice.planned_backward};
      for (const DegreePrediction& p : c)
        if (static_cast<int>(out.size()) < refine && p.degree != out[0]) out.push_back(p.degree);
      return out;
    };
    fwd_candidates = best(true);
    bwd_candidates = best(false);
  } else {
    fwd_candidates = bwd_candidates = candidate_degrees(shape.capacity());
  }
  if (forward_request == 0) choice.forward = fwd_candidates[0];
  if (backward_request == 0) choice.backward = bwd_candidates[0];
  bool time_fwd = forward_request == 0 && fwd_candidates.size() > 1;
  bool time_bwd = backward_request == 0 && bwd_candidates.size() > 1;
  if (!time_fwd && !time_bwd) return choice;

  // Time candidates in pairs (forward i with backward i) so that each pass serves both searches,
  // in `rounds` interleaved rounds (the host's speed drifts: every candidate sees the same drift),
  // and keep the smallest median.
  choice.measured = true;
  std::size_t n = std::max(time_fwd ? fwd_candidates.size() : 1, time_bwd ? bwd_candidates.size() : 1);
  std::vector<std::vector<double>> fwd_s(n), bwd_s(n);
  for (int round = 0; round < std::max(1, rounds); ++round)
    for (std::size_t i = 0; i < n; ++i) {
      int f = time_fwd ? fwd_candidates[std::min(i, fwd_candidates.size() - 1)] : choice.forward;
      int b = time_bwd ? bwd_candidates[std::min(i, bwd_candidates.size() - 1)] : choice.backward;
      auto [fs, bs] = measure(f, b);
      fwd_s[i].push_back(fs);
      bwd_s[i].push_back(bs);
    }
  double best_fwd = 0, best_bwd = 0;
  for (std::size_t i = 0; i < n; ++i) {
    double fs = summarize(fwd_s[i]).median, bs = summarize(bwd_s[i]).median;
    if (time_fwd && i < fwd_candidates.size() && (i == 0 || fs < best_fwd)) best_fwd = fs, choice.forward = fwd_candidates[i];
    if (time_bwd && i < bwd_candidates.size() && (i == 0 || bs < best_bwd)) best_bwd = bs, choice.backward = bwd_candidates[i];
  }
  return choice;
}

}  // namespace pm
