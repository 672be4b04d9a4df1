#include "perf/degree_tuner.h"

#include <algorithm>

#include "core/error.h"
#include "core/round_medians.h"

namespace pm {

namespace {

double predicted(const LayerPlan& plan, int degree, bool forward) {
  for (const DegreePrediction& p : plan.candidates)
    if (p.degree == degree) return forward ? p.forward_s : p.backward_s;
  return 0;
}

}  // namespace

std::vector<int> tune_candidates(const LayerPlan& plan, bool forward, int current, double window, int most) {
  std::vector<DegreePrediction> by_time = plan.candidates;
  auto time = [forward](const DegreePrediction& p) { return forward ? p.forward_s : p.backward_s; };
  std::stable_sort(by_time.begin(), by_time.end(),
                   [&](const DegreePrediction& a, const DegreePrediction& b) { return time(a) < time(b); });
  std::vector<int> out = {current};
  for (const DegreePrediction& p : by_time) {
    if (static_cast<int>(out.size()) >= most) break;
    if (time(p) > time(by_time.front()) * (1 + window)) break;
    if (std::find(out.begin(), out.end(), p.degree) == out.end()) out.push_back(p.degree);
  }
  return out;
}

double predicted_tuning_cost_s(const LayerPlan& plan, const std::vector<int>& forward,
                               const std::vector<int>& backward, int rounds, double floor_share) {
  double cost = 0;
  for (const auto& [list, fwd] : {std::pair{&forward, true}, std::pair{&backward, false}}) {
    double best = 0;
    for (const DegreePrediction& p : plan.candidates) {
      const double t = fwd ? p.forward_s : p.backward_s;
      if (best == 0 || t < best) best = t;
    }
    for (std::size_t i = 0; i < list->size(); ++i) {
      const double gap = std::max(0.0, predicted(plan, (*list)[i], fwd) - best);
      cost += rounds * (i == 0 ? gap : std::max(gap, floor_share * best));
    }
  }
  return cost;
}

void DegreeTuner::start(int layer, std::vector<int> forward, std::vector<int> backward) {
  PM_CHECK(!forward.empty() && !backward.empty(), "a tuning needs a candidate per direction");
  Layer l;
  l.forward.candidates = std::move(forward);
  l.backward.candidates = std::move(backward);
  layers_[layer] = std::move(l);
}

int DegreeTuner::steps_per_tuning(int layer) const {
  const Layer& l = layers_.at(layer);
  return rounds_ * static_cast<int>(std::max(l.forward.candidates.size(), l.backward.candidates.size()));
}

// Round r's slot s times candidate (s + r) mod n: each round starts at another, so that a
// candidate is not always the one run first (after the optimizer) or last. Slots past a direction's
// candidates run its first (the current degree) untimed.
int DegreeTuner::Direction::at(int round, int slot) const {
  const int n = static_cast<int>(candidates.size());
  return slot < n ? candidates[(slot + round) % n] : 0;
}

std::pair<int, int> DegreeTuner::next(int layer) const {
  const Layer& l = layers_.at(layer);
  const int per_round = static_cast<int>(std::max(l.forward.candidates.size(), l.backward.candidates.size()));
  const int round = l.step / per_round, slot = l.step % per_round;
  const int f = l.forward.at(round, slot), b = l.backward.at(round, slot);
  return {f > 0 ? f : l.forward.candidates.front(), b > 0 ? b : l.backward.candidates.front()};
}

int DegreeTuner::decide(const Direction& d, std::map<int, double>& medians) {
  if (d.candidates.size() == 1) return d.candidates.front();
  // a round's level is its mean: with 2 or 3 candidates its median is one of them (ties)
  const RoundMedians m = round_medians(d.seconds, RoundLevel::mean);
  medians = m.median;
  int fastest = d.candidates.front();
  for (int c : d.candidates)
    if (m.median.at(c) < m.median.at(fastest)) fastest = c;
  // the fewest chunks timed within kPlanTolerance of the fastest, as the planner picks from its
  // predictions: more chunks for a gain inside the timing's noise only add per-chunk costs (on one
  // host, where every degree times alike, training's probe picked degrees 1, 2 or 3 by chance)
  int best = fastest;
  for (int c : d.candidates)
    if (c < best && m.median.at(c) <= m.median.at(fastest) * (1 + kPlanTolerance)) best = c;
  for (const auto& [degree, seconds] : d.seconds)
    for (double s : seconds) spent_s_ += s - m.median.at(best);
  return best;
}

bool DegreeTuner::record(int layer, double forward_s, double backward_s, Decision& decided) {
  Layer& l = layers_.at(layer);
  const int per_round = static_cast<int>(std::max(l.forward.candidates.size(), l.backward.candidates.size()));
  const int round = l.step / per_round, slot = l.step % per_round;
  if (int f = l.forward.at(round, slot); f > 0) l.forward.seconds[f].push_back(forward_s);
  if (int b = l.backward.at(round, slot); b > 0) l.backward.seconds[b].push_back(backward_s);
  if (++l.step < rounds_ * per_round) return false;
  decided.forward = decide(l.forward, decided.forward_s);
  decided.backward = decide(l.backward, decided.backward_s);
  layers_.erase(layer);
  return true;
}

}  // namespace pm
