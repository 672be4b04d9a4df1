// How the lanes slow each other, fitted to passes that really overlapped.
//
// The profiler measures the interference directly (GEMMs beside a stream of all-to-alls). A
// pipelined pass might pay what that loop cannot see: each chunk's all-to-all waiting for the
// slowest rank, a wake-up per chunk. So the profiler also refits the two factors and a cost per
// communication task on its own overlapped passes (several shapes and degrees, in rounds), with
// the host's drift between rounds taken out, and keeps the direct measurement unless the refit
// predicts those passes clearly better. (Measured on three networks here it never did: no
// per-chunk cost showed once the drift was out; docs/BENCHMARKS.md.)
#pragma once

#include <functional>
#include <vector>

#include "sched/simulator.h"
#include "sched/task_graph.h"

namespace pm {

struct OverlappedPass {
  const TaskGraph* graph;
  double seconds;  // measured wall time (slowest rank)
  // Passes of one group (one shape, one direction, one round of degrees back to back) ran at the
  // same speed of the host; between groups the host's speed drifts (1.3-1.8x within a minute on
  // the 2-vCPU machines here). The fit compares each pass with its group's level, so that it
  // learns how the time changes with the degree, not how the host drifted.
  int group = 0;
};

struct InterferenceFit {
  Interference interference;
  // mean over passes of |measured / (simulated x its group's level) - 1|, the level being the
  // group's median of measured / simulated
  double error_before = 0, error_after = 0;
};

// Per pass, |measured / (simulated x its group's level) - 1|: how far the simulation is from each
// pass once the host's drift between groups is taken out.
std::vector<double> drift_free_errors(const std::vector<OverlappedPass>& passes,
                                      const std::function<double(const Task&)>& alone, const Interference& f);

// alone(task): the task's predicted time alone (the fitted cost models). Coordinate search from
// `start` over the compute and communication factors and the per-communication-task cost; the
// result is `start` again unless the search brings the error below kMinRefitGain of start's.
constexpr double kMinRefitGain = 0.9;
InterferenceFit fit_interference(const std::vector<OverlappedPass>& passes,
                                 const std::function<double(const Task&)>& alone, const Interference& start);

}  // namespace pm
