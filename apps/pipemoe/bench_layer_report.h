// What `pipemoe bench layer` reports over a whole grid: each policy's summed time (the planner,
// the per-shape best, every fixed degree) and where the performance models miss, per degree.
#pragma once

#include <map>
#include <string>
#include <vector>

#include "perf/model_check.h"

namespace pm::cli {

// per shape: the planner's, the refined and the best measured degrees' times, degree 1 and 4,
// the bounds, and how much of the sequential time is communication
struct ShapeSummary {
  double chosen, refined, best, d1, d4, comm_share;
  double direct;      // the planner with the interference measured directly (no refit)
  double best_cross;  // the best degrees picked on the odd rounds, timed on the even ones (no luck)
  double bound_ratio, pass_bound_ratio;  // chosen / bound, median over rounds
  double noise;  // the larger round-to-round spread of the chosen and the best degrees
};

// The per-shape best picked on the odd rounds, timed on the even ones (see the .cpp), as a time
// comparable to planner_ms, the planner's degree's time over all rounds. times: degree -> one
// value per round.
double best_on_held_out_rounds(const std::map<int, std::vector<double>>& times, int planner_degree, double planner_ms);

// "out/x.csv" -> "out/x_SUFFIX.csv"
std::string sibling_csv(const std::string& csv, const std::string& suffix);

// Prints the sums of every policy and writes them to CSV_sums.csv. fixed: degree -> (summed ms,
// shapes that could run it).
void print_sums(const std::vector<ShapeSummary>& shapes, const std::map<int, std::pair<double, std::size_t>>& fixed,
                const std::string& csv_path);

// Prints measured / predicted per cost class and degree and writes CSV_model.csv.
void print_model_check(const std::map<int, PassCheck>& fwd, const std::map<int, PassCheck>& bwd,
                       const std::string& csv_path);

}  // namespace pm::cli
