// A schedule is a task graph on lanes.
//
// Every strategy (sequential, pipelined with degree r, a whole transformer block with its MoE
// layer beside its dense work, ...) is expressed the same way: tasks bound to a lane with
// dependencies. The executor runs a graph for real; the simulator list-schedules the same graph
// with predicted durations. Both follow one lane policy (sched/lane_policy.h), so what is planned
// is what runs.
//
// Lanes are named resources that run one task at a time: the compute lane (the caller's thread,
// kernels), the communication lane (a thread that talks to other ranks) and the copy lane (moves
// data between memories: expert prefetch); more can be added (a second CUDA stream).
//
// Graphs compose: a builder appends its tasks to an existing graph, with dependencies on tasks
// already there (for example an MoE layer after the attention that produces its input), and
// hands back the ids of its own tasks that later builders depend on.
#pragma once

#include <functional>
#include <string>
#include <vector>

namespace pm {

struct Lane {
  int id = 0;
  friend bool operator==(Lane, Lane) = default;
};

namespace lanes {
inline constexpr Lane compute{0};  // runs on the thread that runs the graph
inline constexpr Lane comm{1};     // runs its tasks strictly in the order added (see lane_in_order)
inline constexpr Lane copy{2};
}  // namespace lanes

// A lane beyond the standard three (e.g. another GPU stream). in_order: the lane runs its tasks
// strictly in the order they were added, as a lane that issues collectives must (every rank
// issues them in the same order, or they do not match).
Lane add_lane(const std::string& name, bool in_order);
int lane_count();
const std::string& lane_name(Lane lane);
// A task's name without its pipeline chunk: "dispatch" for "dispatch[2]" (pass builders name each
// chunk's task so), the name itself where it has none.
std::string task_base_name(const std::string& name);
bool lane_in_order(Lane lane);

// How much a task does, in the units performance models are linear in.
struct TaskWork {
  double calls = 0;  // kernel calls or messages (fixed costs)
  double flops = 0;  // arithmetic
  double bytes = 0;  // memory moved by compute tasks; bytes sent to other ranks by comm tasks
};

struct Task {
  std::string name;  // shown in traces, e.g. "dispatch[2]"
  Lane lane = lanes::compute;
  // What a performance model predicts it by: tasks of one cost class take a time linear in their
  // work ("expert_fwd", "all_to_all", "attention"...).
  std::string cost = "other";
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
  const Task& task(int id) const { return tasks_[id]; }
  int size() const { return static_cast<int>(tasks_.size()); }
  // The highest lane id used, plus one.
  int lanes_used() const;

 private:
  std::vector<Task> tasks_;
};

}  // namespace pm
