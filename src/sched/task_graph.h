// A schedule is a small task graph on lanes.
//
// Every strategy (sequential, pipelined with degree r, ...) is expressed the same way: tasks bound
// to a lane (compute or communication) with dependencies. The executor runs a graph for real; the
// simulator list-schedules the same graph with predicted durations. Both use one policy: a free
// lane takes, among its tasks whose dependencies are done, the one added first. So the insertion
// order is the priority, and what is planned is what runs.
#pragma once

#include <functional>
#include <string>
#include <vector>

namespace pm {

enum class Lane : int { compute = 0, comm = 1 };
constexpr int kNumLanes = 2;
const char* lane_name(Lane lane);

// What a task does, so that a performance model can predict how long it takes from its work.
enum class TaskKind : int {
  gate,          // gate GEMM, softmax, top-k, routing
  pack,          // gather token rows into the send buffer
  pack_weights,  // lay expert weights out for the GEMMs of this pass
  counts,        // all-to-all of per-expert row counts
  all_to_all,    // all-to-all of token rows
  expert_fwd,    // expert FFN forward on one chunk
  unpack,        // weighted combine back to token order
  gate_bwd,      // gate backward
  expert_dgrad,  // expert FFN backward to its input, one chunk
  expert_wgrad,  // expert weight gradients over all rows
  unpack_bwd,    // sum input gradients back to token order
  other,
};
constexpr int kNumTaskKinds = static_cast<int>(TaskKind::other) + 1;
const char* task_kind_name(TaskKind kind);

// How much a task does, in the units performance models are linear in.
struct TaskWork {
  double calls = 0;  // kernel calls or messages (fixed costs)
  double flops = 0;  // arithmetic
  double bytes = 0;  // memory moved by compute tasks; bytes sent to other ranks by comm tasks
};

struct Task {
  std::string name;  // shown in traces, e.g. "dispatch[2]"
  Lane lane = Lane::compute;
  TaskKind kind = TaskKind::other;
  int chunk = -1;
  TaskWork work;
  std::vector<int> deps;  // ids of tasks that must finish first (always smaller ids)
  std::function<void()> run;
};

class TaskGraph {
 public:
  // Adds a task after all others (lowest priority so far); returns its id.
  int add(Task task);
  const std::vector<Task>& tasks() const { return tasks_; }
  std::vector<Task>& tasks() { return tasks_; }
  int size() const { return static_cast<int>(tasks_.size()); }

 private:
  std::vector<Task> tasks_;
};

}  // namespace pm
