// Where a step or a pass goes: each task's time summed by name over the layers and the pipeline's
// chunks ("attention_bwd" for every block's, "dispatch" for dispatch[0], dispatch[1], ...), with
// how many of its tasks ran, the largest over the ranks that ran it. `train --breakdown-steps N`
// sums the last N steps' trace events (step_breakdown); `layer --breakdown` takes each task's
// median over the timed passes (apps/pipemoe/pass_breakdown.h). So the time spent in attention,
// the experts, the router, the all-to-alls and the optimizer shows without a trace file and a
// script to read it.
#pragma once

#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <tuple>
#include <vector>

#include "comm/communicator.h"
#include "sched/trace.h"

namespace pm {

struct TaskTimeRow {
  std::string pass;  // "forward" or "backward" (a trace event's category)
  std::string lane;  // "compute", "comm", ...
  std::string task;  // the name without its chunk ("expert" for "expert[1]": task_base_name)
  double ms = 0;     // per step (per pass)
  double calls = 0;  // tasks of that name per step (per pass): layers x chunks
};

// (pass, lane, task) -> this rank's time and tasks.
struct TaskTotal {
  double ms = 0, calls = 0;
};
using TaskTotals = std::map<std::tuple<std::string, std::string, std::string>, TaskTotal>;

// Rows on rank 0 (empty elsewhere), largest first: each task's ms and calls on the rank that spent
// the most on it (ranks of different pipeline stages run different tasks; a task counts on the
// ranks that ran it), divided by `per` (the steps summed). A collective: every rank calls it.
std::vector<TaskTimeRow> largest_over_ranks(Communicator& comm, const TaskTotals& mine, double per = 1);

// `train`'s: the events of `steps` traced steps, per step.
std::vector<TaskTimeRow> step_breakdown(Communicator& comm, const std::vector<TraceEvent>& events, int steps);

// The rows as JSON (`step_breakdown_ms`, `tasks_ms`): [{"pass", "lane", "task", "ms", "calls"}, ...].
nlohmann::json task_time_json(const std::vector<TaskTimeRow>& rows);

// The rows as a table in the log, each with its share of the step.
void log_step_breakdown(const std::vector<TaskTimeRow>& rows, int steps, double step_ms);

}  // namespace pm
