#include "model/layer_degrees.h"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include "core/clock.h"
#include "core/log.h"

namespace pm {

namespace {

// At most this many candidates per direction (degree_tune_window picks them): every further one
// adds a step per round.
constexpr int kTuneMost = 3;
// Tuning runs by default where its predicted cost stays under this share of the rest of the run.
constexpr double kTuneBudget = 0.01;

}  // namespace

LayerDegrees::LayerDegrees(GptModel& model, const PerfProfile& profile, Communicator& stage_comm,
                           const TrainConfig& config)
    : model_(model), profile_(profile), comm_(stage_comm), config_(config), tuner_(config.degree_tune_rounds) {}

void LayerDegrees::before_step() {
  std::vector<MoeLayer*> layers = model_.moe_layers();
  for (std::size_t i = 0; i < layers.size(); ++i)
    if (tuner_.tuning(static_cast<int>(i))) {
      auto [f, b] = tuner_.next(static_cast<int>(i));
      layers[i]->set_degrees(f, b);
    }
  model_.take_moe_seconds();  // what the step times starts now
}

std::vector<LayerPlan> LayerDegrees::plans_from_routing() {
  std::vector<MoeLayer*> layers = model_.moe_layers();
  std::vector<const MoePass*> passes = model_.moe_passes();
  std::vector<LayerPlan> plans;
  for (std::size_t i = 0; i < layers.size() && i < passes.size(); ++i) {
    std::vector<DegreePrediction> candidates = plan_layer_from_pass(profile_, *layers[i], *passes[i]).candidates;
    std::vector<double> times;
    for (const DegreePrediction& p : candidates) times.push_back(p.forward_s), times.push_back(p.backward_s);
    comm_.allreduce(times.data(), times.data(), static_cast<int64_t>(times.size()), DType::f64, ReduceOp::max);
    for (std::size_t j = 0; j < candidates.size(); ++j)
      candidates[j].forward_s = times[2 * j], candidates[j].backward_s = times[2 * j + 1];
    plans.push_back(pick_degrees(std::move(candidates)));
  }
  return plans;
}

void LayerDegrees::record_trials() {
  if (!tuner_.any()) return;
  ++tuned_steps_;
  const std::vector<std::pair<double, double>> seconds = model_.take_moe_seconds();  // slowest rank's
  std::vector<MoeLayer*> layers = model_.moe_layers();
  for (std::size_t i = 0; i < layers.size() && i < seconds.size(); ++i) {
    const int id = static_cast<int>(i);
    if (!tuner_.tuning(id)) continue;
    DegreeTuner::Decision decided;
    if (!tuner_.record(id, seconds[i].first, seconds[i].second, decided)) continue;
    layers[i]->set_degrees(decided.forward, decided.backward);
    changed_by_timing_ += std::pair{decided.forward, decided.backward} != fallback_[id];
    auto timed = [](const std::map<int, double>& medians) {
      std::vector<std::string> each;
      for (const auto& [degree, s] : medians) each.push_back(fmt::format("{} {:.1f}", degree, s * 1e3));
      return each.empty() ? std::string("(one candidate)") : fmt::format("{}", fmt::join(each, ", "));
    };
    // each pipeline stage's first rank speaks for its own blocks
    if (comm_.rank() == 0 && !log::quiet())
      log::write_line(fmt::format("MoE block {}: degrees timed on the training steps: forward {}, backward {} (planned "
                                  "{}/{}; ms per step by degree: forward {}; backward {})",
                                  model_.moe_blocks()[i], decided.forward, decided.backward, fallback_[id].first,
                                  fallback_[id].second, timed(decided.forward_s), timed(decided.backward_s)));
  }
}

void LayerDegrees::replan(int64_t done, int64_t last, double step_ms) {
  std::vector<MoeLayer*> layers = model_.moe_layers();
  const std::vector<LayerPlan> plans = plans_from_routing();
  struct Start {
    int layer;
    std::vector<int> forward, backward;
  };
  std::vector<Start> starts;
  double cost_s = 0;
  int changed = 0;
  for (std::size_t i = 0; i < plans.size(); ++i) {
    const int id = static_cast<int>(i);
    if (tuner_.tuning(id)) continue;  // its trials decide
    const bool never_tuned = fallback_.count(id) == 0;
    // a layer keeps its degrees (planned or timed) unless they are predicted clearly slower
    const LayerPlan kept = keep_current_within(plans[i], layers[i]->forward_degree(), layers[i]->backward_degree());
    const bool moved = kept.forward_degree != layers[i]->forward_degree() ||
                       kept.backward_degree != layers[i]->backward_degree();
    if (moved) layers[i]->set_degrees(kept.forward_degree, kept.backward_degree), ++changed;
    if (!never_tuned && !moved) continue;
    Start s{id, tune_candidates(plans[i], true, kept.forward_degree, config_.degree_tune_window, kTuneMost),
            tune_candidates(plans[i], false, kept.backward_degree, config_.degree_tune_window, kTuneMost)};
    if (s.forward.size() + s.backward.size() <= 2) continue;  // nothing else is close
    cost_s += predicted_tuning_cost_s(plans[i], s.forward, s.backward, config_.degree_tune_rounds,
                                      config_.degree_tune_window);
    fallback_[id] = {kept.forward_degree, kept.backward_degree};
    starts.push_back(std::move(s));
  }
  if (changed > 0 && comm_.rank() == 0)
    log::info("step {}: re-planned from each MoE layer's routing: {} layer(s) changed degrees", done, changed);
  if (starts.empty() || config_.degree_tune == "off" || done >= last) return;
  // the rest of the run at this step's pace; the tuning must also fit in it
  const double rest_s = static_cast<double>(last - done) * step_ms / 1e3;
  int steps = 0;
  for (const Start& s : starts)
    steps = std::max(steps, config_.degree_tune_rounds * static_cast<int>(std::max(s.forward.size(), s.backward.size())));
  const bool on = config_.degree_tune == "on" ? steps <= last - done : cost_s < kTuneBudget * rest_s;
  if (!tune_decided_ && comm_.rank() == 0)
    log::info("degree tuning ({}): {} layer(s) timed on the next {} steps, predicted to cost {:.1f} ms = {:.2f}% of the "
              "rest of the run{}",
              config_.degree_tune, starts.size(), steps, cost_s * 1e3, rest_s > 0 ? 100 * cost_s / rest_s : 0.0,
              on                            ? ""
              : config_.degree_tune == "on" ? ": off (the trials do not fit in the steps left)"
                                            : ": off (over 1%; degree_tune \"on\" forces it)");
  tune_decided_ = true;
  tune_on_ = tune_on_ || on;
  if (!on) return;
  predicted_cost_s_ += cost_s;
  for (Start& s : starts) tuner_.start(s.layer, std::move(s.forward), std::move(s.backward)), ++tunings_;
}

void LayerDegrees::after_step(int64_t done, int64_t last, double step_ms, bool first_of_run) {
  Stopwatch planning;
  record_trials();
  if (first_of_run || (config_.degree_replan_every > 0 && done % config_.degree_replan_every == 0))
    replan(done, last, step_ms);
  planning_ms_ += planning.elapsed_ms();
}

nlohmann::json LayerDegrees::summary() const {
  return {{"mode", config_.degree_tune},
          {"on", tune_on_},
          {"tunings", tunings_},
          {"steps", tuned_steps_},
          {"layers_changed_by_timing", changed_by_timing_},
          {"predicted_cost_ms", predicted_cost_s_ * 1e3},
          {"measured_cost_ms", tuner_.spent_s() * 1e3}};
}

}  // namespace pm
