// Predicts how a task graph runs, with predicted durations instead of real work.
//
// Same policy as the executor: a free lane takes, among its tasks whose dependencies are done,
// the one added first. While both lanes are busy each progresses slower by its interference
// factor (on CPU ranks the kernel's network work and the copies share cores and memory with the
// GEMMs), so a task's duration is its time alone stretched by the overlap it met. A task that
// waits for a task of the other lane starts a hand-off later (one thread waking another).
#pragma once

#include <functional>
#include <vector>

#include "sched/task_graph.h"

namespace pm {

struct Interference {
  double compute = 1.0;    // compute runs this much slower while the comm lane is busy
  double comm = 1.0;       // and comm this much slower while the compute lane is busy
  double handoff_s = 0.0;  // delay before a task can start after the other lane's task it waits for
};

struct Simulation {
  double makespan_s = 0;
  std::vector<double> start_s, end_s;  // per task id
  double busy_s[kNumLanes] = {0, 0};   // sum of each lane's (stretched) task durations
};

// duration(task) = seconds the task would take with the other lane idle.
Simulation simulate(const TaskGraph& graph, const std::function<double(const Task&)>& duration,
                    const Interference& interference = {});

}  // namespace pm
