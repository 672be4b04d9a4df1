// The MoE layers' pipeline degrees while a model trains at degree auto with a profile: each layer
// planned from the rows its own last pass routed (after the first step and every
// degree_replan_every steps, as the router learns), and then refined on the training steps
// themselves by timing the planner's closest candidates (perf/degree_tuner.h), where that is
// predicted to cost under 1% of the rest of the run (degree_tune "auto"; "on", "off").
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "comm/communicator.h"
#include "model/gpt.h"
#include "model/train_config.h"
#include "perf/degree_tuner.h"
#include "perf/perf_profile.h"

namespace pm {

class LayerDegrees {
 public:
  // stage_comm: the ranks that hold these layers (every one decides alike).
  LayerDegrees(GptModel& model, const PerfProfile& profile, Communicator& stage_comm, const TrainConfig& config);

  // Before a step: the degrees of the layers being timed.
  void before_step();
  // After step `done` (1-based) of a run ending at step `last`; step_ms: that step's time, the
  // same on every rank. Records the timed layers' seconds, and re-plans when it is time.
  void after_step(int64_t done, int64_t last, double step_ms, bool first_of_run);

  double planning_ms() const { return planning_ms_; }
  nlohmann::json summary() const;  // the final JSON's "degree_tuning"

 private:
  // Each layer's plan from its routing, the slowest rank's predictions (so every rank picks alike).
  std::vector<LayerPlan> plans_from_routing();
  void record_trials();
  void replan(int64_t done, int64_t last, double step_ms);

  GptModel& model_;
  const PerfProfile& profile_;
  Communicator& comm_;
  const TrainConfig& config_;
  DegreeTuner tuner_;
  std::map<int, std::pair<int, int>> fallback_;  // per layer: the planner's degrees of its last tuning
  bool tune_decided_ = false, tune_on_ = false;
  int tunings_ = 0, tuned_steps_ = 0, changed_by_timing_ = 0;
  double predicted_cost_s_ = 0;
  double planning_ms_ = 0;
};

}  // namespace pm
