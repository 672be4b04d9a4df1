// Choosing a layer's pipeline degrees: fixed, planned from a profile, or measured.
//
//   fixed   the user's number;
//   auto    with a profile: the planner's prediction (forward and backward separately); with
//           `refine` the planner's best few are also timed on the first iterations and the
//           fastest measured wins; without a profile: every candidate is timed and the fastest
//           wins. Timing runs one untimed pass at each candidate first, and the fewest chunks
//           within kPlanTolerance of the fastest median win (perf/degree_tuner.h). Measurements
//           take the slowest rank, so every rank makes the same choice.
#pragma once

#include <functional>
#include <optional>
#include <string>
#include <utility>

#include "perf/planner.h"

namespace pm {

// A degree as the user wrote it: a number, or 0 for "auto".
int parse_degree(const std::string& text, const char* flag);

struct DegreeChoice {
  int forward = 1, backward = 1;                   // what runs
  int planned_forward = 0, planned_backward = 0;   // the planner's pick (0: no profile)
  std::optional<LayerPlan> plan;
  bool measured = false;                           // decided or refined by timing
};

// measure(fwd_degree, bwd_degree) runs a pass (or a few) and returns its (forward, backward)
// seconds, slowest rank; called once per candidate untimed, then `rounds` times per candidate,
// interleaved, each round starting at another candidate, the rounds' drift divided out
// (perf/degree_tuner.h: training's own trials). refine: how many degrees to time, the planner's
// pick and its next best predictions (0 or 1: trust the planner).
DegreeChoice choose_degrees(int forward_request, int backward_request, const PerfProfile* profile,
                            const MoeShape& shape, int refine,
                            const std::function<std::pair<double, double>(int, int)>& measure, int rounds = 3,
                            const MoeStrategy& strategy = moe_strategy("ep"));

}  // namespace pm
