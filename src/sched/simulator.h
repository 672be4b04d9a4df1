// Predicts how a task graph runs, with predicted durations instead of real work.
//
// Same lane policy as the executor (sched/lane_policy.h). While another lane is busy a lane
// progresses slower by its interference factor (on CPU ranks the kernel's network work and the
// copies share cores and memory with the GEMMs), so a task's duration is its time alone stretched
// by the overlap it met. A task that waits for a task of another lane starts a hand-off later (one
// thread waking another).
#pragma once

#include <functional>
#include <vector>

#include "sched/task_graph.h"

namespace pm {

struct Interference {
  double compute = 1.0;    // the compute lane runs this much slower while another lane is busy
  double comm = 1.0;       // the communication lane, while another lane is busy
  double handoff_s = 0.0;  // delay before a task can start after another lane's task it waits for
  // Seconds every communication-lane task takes beyond its time alone on a back-to-back link: in
  // a pass each chunk's exchange also waits for the slowest rank to post it, and the waiting
  // thread wakes (fitted from overlapped passes: perf/interference_fit.h).
  double comm_task_s = 0.0;
  // Other lanes (copy, ...) are not measured yet: factor 1.
  double factor(Lane lane) const;
};

struct Simulation {
  double makespan_s = 0;
  std::vector<double> start_s, end_s;  // per task id
  std::vector<double> busy_s;          // per lane id: sum of its (stretched) task durations
  double busy(Lane lane) const { return lane.id < static_cast<int>(busy_s.size()) ? busy_s[lane.id] : 0.0; }
};

// duration(task) = seconds the task would take with the other lanes idle (finite, >= 0).
Simulation simulate(const TaskGraph& graph, const std::function<double(const Task&)>& duration,
                    const Interference& interference = {});

}  // namespace pm
