#include "apps/pipemoe/pass_breakdown.h"

#include <algorithm>

#include "core/stats.h"
#include "sched/task_graph.h"

namespace pm::cli {

void PassBreakdown::add_pass(const LayerPassRun& forward, const LayerPassRun& backward) {
  for (const auto& [pass, run] : {std::pair{"forward", &forward}, std::pair{"backward", &backward}}) {
    const std::vector<Task>& tasks = run->graph.tasks();
    std::vector<TaskTotals::key_type> key_of;  // by task id
    for (const Task& task : tasks) key_of.push_back({pass, lane_name(task.lane), task_base_name(task.name)});
    TaskTotals sums;  // this pass's, so that a name with no record this time counts 0
    for (const auto& key : key_of) sums[key];
    for (const TaskRecord& r : run->records) {
      TaskTotal& t = sums[key_of[r.task]];
      t.ms += (r.end_s - r.start_s) * 1e3;
      t.calls += 1;
    }
    for (const auto& [key, t] : sums) {
      std::vector<TaskTotal>& values = passes_of_[key];
      values.resize(passes_);  // a name first seen now was absent (0) before
      values.push_back(t);
    }
  }
  ++passes_;
  for (auto& [key, values] : passes_of_) values.resize(passes_);  // absent this pass
}

std::vector<TaskTimeRow> PassBreakdown::slowest_rank_rows(Communicator& comm) const {
  TaskTotals medians;
  for (const auto& [key, values] : passes_of_) {
    std::vector<double> ms, calls;
    for (const TaskTotal& t : values) ms.push_back(t.ms), calls.push_back(t.calls);
    medians[key] = {summarize(ms).median, summarize(calls).median};
  }
  std::vector<TaskTimeRow> rows = largest_over_ranks(comm, medians);
  std::stable_sort(rows.begin(), rows.end(),
                   [](const TaskTimeRow& a, const TaskTimeRow& b) { return a.pass == "forward" && b.pass != "forward"; });
  return rows;
}

}  // namespace pm::cli
