// How much of some tasks' time ran while the compute lane was computing: the share of the
// communication that a schedule hid (ScMoE's "communication hidden"), read from an executor run's
// records.
#pragma once

#include <vector>

#include "sched/executor.h"
#include "sched/task_graph.h"

namespace pm {

struct Overlap {
  double total_s = 0;   // the tasks' summed duration
  double hidden_s = 0;  // the part of it during which a compute-lane task ran
  double share() const { return total_s > 0 ? hidden_s / total_s : 0.0; }
  Overlap& operator+=(const Overlap& o) {
    total_s += o.total_s, hidden_s += o.hidden_s;
    return *this;
  }
};

// Over the tasks `ids` of the graph that ran last on the executor whose stats these are.
Overlap hidden_behind_compute(const TaskGraph& graph, const ExecutorStats& stats, const std::vector<int>& ids);

}  // namespace pm
