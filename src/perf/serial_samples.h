// What each task of a pass took with the lanes run one after the other (serial executor): the
// raw material of the profile's performance models.
#pragma once

#include <vector>

#include "sched/executor.h"
#include "sched/task_graph.h"

namespace pm {

class Communicator;

struct TaskSample {
  std::string cost = "other";
  Lane lane = lanes::compute;
  TaskWork work;
  double seconds = 0;
};

// Collective: one sample per task of a serial pass, the same on every rank. Every chunk's
// all-to-all waits for the slowest rank, so what predicts a pipelined pass is the slowest rank:
// compute tasks take the longest duration over ranks with the ranks' mean work (the planner
// assumes balanced work). Communication tasks take the shortest duration (the last rank to arrive
// sees the transfer alone; the others also waited) with the largest bytes.
std::vector<TaskSample> serial_task_samples(Communicator& comm, const TaskGraph& graph, const ExecutorStats& stats);

}  // namespace pm
