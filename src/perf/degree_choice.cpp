#include "perf/degree_choice.h"

#include <algorithm>

#include "core/error.h"
#include "perf/degree_tuner.h"

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
  // in `rounds` interleaved rounds, each starting at another candidate, and keep the fastest
  // median with the rounds' drift taken out: the same trials as training's (perf/degree_tuner.h).
  choice.measured = true;
  // One untimed pass at each candidate first: a degree's first pass makes its chunks' buffers, and
  // at a run's start the first passes were the slowest (page faults, cold caches), which taking
  // out each round's level cannot correct where it falls on one candidate.
  const std::vector<int> fwd_timed = time_fwd ? fwd_candidates : std::vector<int>{choice.forward},
                         bwd_timed = time_bwd ? bwd_candidates : std::vector<int>{choice.backward};
  for (std::size_t i = 0; i < std::max(fwd_timed.size(), bwd_timed.size()); ++i)
    measure(fwd_timed[i < fwd_timed.size() ? i : 0], bwd_timed[i < bwd_timed.size() ? i : 0]);
  DegreeTuner tuner(std::max(1, rounds));
  tuner.start(0, fwd_timed, bwd_timed);
  DegreeTuner::Decision decided;
  for (bool done = false; !done;) {
    const auto [f, b] = tuner.next(0);
    const auto [fs, bs] = measure(f, b);
    done = tuner.record(0, fs, bs, decided);
  }
  choice.forward = decided.forward;
  choice.backward = decided.backward;
  return choice;
}

}  // namespace pm
