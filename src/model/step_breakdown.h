// Where a training step goes (`breakdown_steps` in a training configuration): the last steps'
// trace events, held in memory, summed per task name over the layers and the pipeline's chunks
// ("attention_bwd" for every block's, "dispatch" for dispatch[0], dispatch[1], ...), per step, so
// that the time a step spends in attention, the experts, the router, the all-to-alls and the
// optimizer shows at the end of `train` without a trace file and a script to read it.
#pragma once

#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "comm/communicator.h"
#include "sched/trace.h"

namespace pm {

// One task's time: `train`'s step breakdown here, `layer --breakdown`'s pass breakdown
// (apps/pipemoe/pass_breakdown.h) alike.
struct TaskTimeRow {
  std::string pass;  // "forward" or "backward" (a trace event's category)
  std::string lane;  // "compute", "comm", ...
  std::string task;  // the name without its chunk ("expert" for "expert[1]": task_base_name)
  double ms = 0;     // per step (per pass)
};

// Rows on rank 0 (empty elsewhere), largest first: each task's time per step on the rank that
// spent the most on it (ranks of different pipeline stages run different tasks; a task counts on
// the ranks that ran it). A collective: every rank calls it with its own events.
std::vector<TaskTimeRow> step_breakdown(Communicator& comm, const std::vector<TraceEvent>& events, int steps);

// The rows as JSON (`step_breakdown_ms`, `tasks_ms`): [{"pass", "lane", "task", "ms"}, ...].
nlohmann::json task_time_json(const std::vector<TaskTimeRow>& rows);

// The rows as a table in the log, each with its share of the step.
void log_step_breakdown(const std::vector<TaskTimeRow>& rows, int steps, double step_ms);

}  // namespace pm
