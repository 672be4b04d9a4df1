// Online refinement of each MoE layer's pipeline degrees, on the training steps themselves.
//
// The planner predicts from a profile taken on other passes of the layer alone. Inside a training
// step the layer runs beside the dense blocks and the gradient all-reduces, and waits for the
// slowest rank; there the candidates may rank otherwise (docs/BENCHMARKS.md: at 1 Gbit/s the
// backward's all-to-alls took 1.13-1.33x their model at every degree, which favours more chunks
// than predicted). So the candidates the planner predicts close to its best are run on real steps,
// in interleaved rounds (each candidate once per round, each round starting at another), and the
// fastest by drift-corrected median (core/round_medians.h) wins, or the fewest chunks within
// kPlanTolerance of it (the planner's rule: a gain inside the noise does not pay for more chunks).
// Degrees change time, never results: a tuning step computes exactly what any other degree would.
//
// Every rank must feed the same seconds (the slowest rank's) so that every rank decides alike.
#pragma once

#include <map>
#include <utility>
#include <vector>

#include "perf/planner.h"

namespace pm {

// A direction's degrees worth timing: the current one first, then the planner's candidates
// predicted within `window` of its fastest, fastest first, `most` in all.
std::vector<int> tune_candidates(const LayerPlan& plan, bool forward, int current, double window, int most);

// The seconds a tuning of these candidates is expected to spend over running the fastest
// predicted all along: each round runs every candidate once, and each trial of a candidate other
// than a direction's first is charged at least `floor_share` of the fastest prediction (the
// candidates were picked because the models may be that far off: a predicted gap of 0.1% is no
// promise that the trial costs that little).
double predicted_tuning_cost_s(const LayerPlan& plan, const std::vector<int>& forward,
                               const std::vector<int>& backward, int rounds, double floor_share = 0);

class DegreeTuner {
 public:
  explicit DegreeTuner(int rounds) : rounds_(rounds) {}

  // Starts timing `layer` (any id) over these candidates; each list non-empty, its first the
  // degree the layer keeps between its trials and falls back on.
  void start(int layer, std::vector<int> forward, std::vector<int> backward);
  bool tuning(int layer) const { return layers_.count(layer) > 0; }
  bool any() const { return !layers_.empty(); }

  // The (forward, backward) degrees the layer runs on the next step.
  std::pair<int, int> next(int layer) const;
  struct Decision {
    int forward = 1, backward = 1;                           // the fastest, or the fewest chunks near it
    std::map<int, double> forward_s, backward_s;             // per candidate: median, drift taken out
  };
  // The layer's seconds on the step that ran next(layer)'s degrees. When that was its last trial,
  // returns true and fills `decided`.
  bool record(int layer, double forward_s, double backward_s, Decision& decided);

  // The seconds the timed trials took over as many of the decided degrees' median, summed over
  // every tuning finished so far: what refinement cost, as measured (noise may make it negative).
  double spent_s() const { return spent_s_; }
  int steps_per_tuning(int layer) const;

 private:
  struct Direction {
    std::vector<int> candidates;
    std::map<int, std::vector<double>> seconds;  // per degree, one per round
    int at(int round, int slot) const;           // the degree run at this place (0: none timed)
  };
  struct Layer {
    Direction forward, backward;
    int step = 0;  // trials taken
  };
  // The fastest candidate; its medians into `medians`.
  int decide(const Direction& d, std::map<int, double>& medians);

  int rounds_;
  std::map<int, Layer> layers_;
  double spent_s_ = 0;
};

}  // namespace pm
