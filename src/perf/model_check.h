// Predicted against measured, task by task: where the performance models miss.
//
// A pass that really ran (its graph with the real rows, and when each task started and ended) is
// simulated with the profile; each task's simulated duration (stretched by the interference it
// met in the simulation) is set beside its measured one, summed per cost class. A cost class
// whose measured / predicted grows with the pipeline degree has a per-chunk cost its model
// misses; a makespan ratio above every class's ratio is time spent between tasks (hand-offs,
// waiting for the slower rank) that no class carries.
#pragma once

#include <map>
#include <string>
#include <vector>

#include "perf/perf_profile.h"
#include "sched/executor.h"
#include "sched/task_graph.h"

namespace pm {

struct CostCheck {
  double measured_s = 0, predicted_s = 0;
  int tasks = 0;
  void add(const CostCheck& o);
};

struct PassCheck {
  CostCheck makespan;                    // the pass's wall time against the simulation's makespan
  std::map<std::string, CostCheck> by_cost;
  void add(const PassCheck& o);
};

// records: the executor's records of that run (ExecutorStats::records); wall_s its wall time.
PassCheck check_pass(const PerfProfile& profile, const TaskGraph& graph, const std::vector<TaskRecord>& records,
                     double wall_s);

}  // namespace pm
