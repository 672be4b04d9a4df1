// The one rule by which a free lane chooses its next task, shared by the executor (which runs a
// graph) and the simulator (which predicts it), so that what is planned is what runs:
//
//   a free lane takes, among its tasks not started yet whose dependencies are met, the one added
//   first; a lane that runs in order (communication) takes only its next task in the order added,
//   and waits for it.
//
// So the order in which builders add tasks is their priority. In serial mode every task runs on
// one lane in the order added (the same math with no overlap: for tests and for timing each lane
// alone).
#pragma once

#include <functional>
#include <limits>
#include <vector>

#include "sched/task_graph.h"

namespace pm {

class LaneQueues {
 public:
  // serial: every task goes to the compute lane's queue.
  LaneQueues(const TaskGraph& graph, bool serial = false);

  struct Pick {
    int task = -1;  // the task to start now, or -1
    double next_ready_at = std::numeric_limits<double>::infinity();  // when none: the earliest a candidate will be
  };
  // The lane's next task at time `now`, given when each task's dependencies are met (ready_at:
  // infinity while some are not). The task picked counts as started.
  Pick pick(Lane lane, double now, const std::function<double(int task)>& ready_at);

  // Lanes that have tasks in this graph (serial: only the compute lane).
  const std::vector<Lane>& lanes() const { return lanes_; }
  bool has_tasks_left(Lane lane) const;
  // Where a task runs: its lane, or the compute lane in serial mode.
  Lane lane_of(int task) const;

 private:
  const TaskGraph& graph_;
  bool serial_;
  std::vector<std::vector<int>> queue_;  // per lane id: tasks not started, in the order added
  std::vector<Lane> lanes_;
};

}  // namespace pm
