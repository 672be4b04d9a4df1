#include "apps/pipemoe/bench_layer_report.h"

#include <cstdio>
#include <filesystem>
#include <set>

#include "core/csv.h"
#include "core/log.h"
#include "core/round_medians.h"

namespace pm::cli {

// The per-shape best is picked and timed on the same rounds, so round-to-round noise makes it
// look better than any policy can be (the minimum of noisy medians). This one picks a direction's
// best degree on the odd rounds and times it on the even ones, as a ratio to the planner's degree
// on those same even rounds, scaled to the planner's time over all rounds (planner_ms): what
// knowing the best degree in advance is worth, without the luck.
double best_on_held_out_rounds(const std::map<int, std::vector<double>>& times, int planner_degree, double planner_ms) {
  std::map<int, std::vector<double>> odd, even;
  for (const auto& [d, v] : times)
    for (std::size_t r = 0; r < v.size(); ++r) (r % 2 ? odd : even)[d].push_back(v[r]);
  if (odd.empty() || odd.begin()->second.empty()) return planner_ms;  // one round: nothing to hold out
  const RoundMedians picked = round_medians(odd), timed = round_medians(even);
  int best = planner_degree;
  for (const auto& [d, ms] : picked.median)
    if (ms < picked.median.at(best)) best = d;
  return planner_ms * timed.median.at(best) / timed.median.at(planner_degree);
}

// "out/x.csv" -> "out/x_SUFFIX.csv"
std::string sibling_csv(const std::string& csv, const std::string& suffix) {
  namespace fs = std::filesystem;
  fs::path p(csv);
  return (p.parent_path() / (p.stem().string() + "_" + suffix + ".csv")).string();
}

// What a user of each policy would have spent on the whole grid: the planner's degrees, the
// planner refined, the best degrees of each shape (known only after measuring them all), and one
// fixed degree for every shape. Summed, because one shape's regret is within this host's noise.
void print_sums(const std::vector<ShapeSummary>& shapes, const std::map<int, std::pair<double, std::size_t>>& fixed,
                const std::string& csv_path) {
  double chosen = 0, refined = 0, best = 0, direct = 0, best_cross = 0;
  for (const ShapeSummary& s : shapes)
    chosen += s.chosen, refined += s.refined, best += s.best, direct += s.direct, best_cross += s.best_cross;
  CsvWriter csv(sibling_csv(csv_path, "sums"), {"policy", "degree", "shapes", "sum_ms", "over_planner", "over_best"});
  std::printf("\nsums over the %zu shapes (forward + backward medians, ms):\n", shapes.size());
  auto line = [&](const std::string& policy, int degree, double ms, std::size_t n) {
    std::string name = degree > 0 ? fmt::format("{} {}", policy, degree) : policy;
    if (n < shapes.size()) {  // a degree above some shape's capacity: no full sum
      std::printf("  %-20s (runs on %zu of the shapes only)\n", name.c_str(), n);
      return;
    }
    std::printf("  %-20s %9.1f  %+6.1f%% vs planner  %+6.1f%% vs per-shape best\n", name.c_str(), ms,
                (ms / chosen - 1) * 100, (ms / best - 1) * 100);
    csv.row({policy, std::to_string(degree), std::to_string(n), fmt::format("{:.3f}", ms),
             fmt::format("{:.4f}", ms / chosen), fmt::format("{:.4f}", ms / best)});
  };
  line("planner", 0, chosen, shapes.size());
  line("refined", 0, refined, shapes.size());
  line("planner (no refit)", 0, direct, shapes.size());
  line("per-shape best", 0, best, shapes.size());
  line("best (held out)", 0, best_cross, shapes.size());
  int best_fixed = 0;
  for (const auto& [d, sum] : fixed) {
    line("fixed", d, sum.first, sum.second);
    if (sum.second == shapes.size() && (best_fixed == 0 || sum.first < fixed.at(best_fixed).first)) best_fixed = d;
  }
  if (best_fixed > 0)
    std::printf("  the planner against the best single fixed degree (%d): %+.1f%%\n", best_fixed,
                (chosen / fixed.at(best_fixed).first - 1) * 100);
  std::printf("wrote %s\n", sibling_csv(csv_path, "sums").c_str());
}

// Per degree and cost class, measured over predicted task time (rank 0's tasks, all shapes and
// rounds): where the models miss, as the degree grows.
void print_model_check(const std::map<int, PassCheck>& fwd, const std::map<int, PassCheck>& bwd,
                       const std::string& csv_path) {
  CsvWriter csv(sibling_csv(csv_path, "model"),
                {"direction", "degree", "what", "tasks", "measured_ms", "predicted_ms", "measured_over_predicted"});
  std::printf("\nmeasured / predicted time per cost class and degree (rank 0's tasks, summed over shapes and "
              "rounds; 'pass' is the wall time against the simulated makespan):\n");
  for (const auto* checks : {&fwd, &bwd}) {
    const char* direction = checks == &fwd ? "forward" : "backward";
    std::set<std::string> costs;
    for (const auto& [d, c] : *checks)
      for (const auto& [cost, cc] : c.by_cost) costs.insert(cost);
    std::printf("  %-9s %-14s", direction, "degree");
    for (const auto& [d, c] : *checks) std::printf(" %6d", d);
    std::printf("\n");
    auto row = [&](const std::string& what, auto get) {
      std::printf("  %-9s %-14s", "", what.c_str());
      for (const auto& [d, c] : *checks) {
        const CostCheck* cc = get(c);
        if (!cc || cc->predicted_s <= 0) {
          std::printf(" %6s", "-");
          continue;
        }
        std::printf(" %6.2f", cc->measured_s / cc->predicted_s);
        csv.row({direction, std::to_string(d), what, std::to_string(cc->tasks), fmt::format("{:.3f}", cc->measured_s * 1e3),
                 fmt::format("{:.3f}", cc->predicted_s * 1e3), fmt::format("{:.4f}", cc->measured_s / cc->predicted_s)});
      }
      std::printf("\n");
    };
    row("pass", [](const PassCheck& c) { return &c.makespan; });
    for (const std::string& cost : costs)
      row(cost, [&](const PassCheck& c) -> const CostCheck* {
        auto it = c.by_cost.find(cost);
        return it == c.by_cost.end() ? nullptr : &it->second;
      });
  }
  std::printf("wrote %s\n", sibling_csv(csv_path, "model").c_str());
}

}  // namespace pm::cli
