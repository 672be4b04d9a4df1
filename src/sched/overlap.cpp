#include "sched/overlap.h"

#include <algorithm>

namespace pm {

Overlap hidden_behind_compute(const TaskGraph& graph, const ExecutorStats& stats, const std::vector<int>& ids) {
  // the compute lane runs one task at a time: its intervals do not overlap each other
  std::vector<std::pair<double, double>> compute;
  std::vector<const TaskRecord*> by_task(graph.size(), nullptr);
  for (const TaskRecord& r : stats.records) {
    by_task[r.task] = &r;
    if (graph.task(r.task).lane == lanes::compute) compute.push_back({r.start_s, r.end_s});
  }
  std::sort(compute.begin(), compute.end());
  Overlap out;
  for (int id : ids) {
    const TaskRecord* r = by_task[id];
    if (!r) continue;
    out.total_s += r->end_s - r->start_s;
    for (const auto& [a, b] : compute) {
      if (a >= r->end_s) break;
      out.hidden_s += std::max(0.0, std::min(b, r->end_s) - std::max(a, r->start_s));
    }
  }
  return out;
}

}  // namespace pm
