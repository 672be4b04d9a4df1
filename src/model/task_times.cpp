#include "model/task_times.h"

#include <algorithm>

#include "core/log.h"
#include "sched/task_graph.h"

namespace pm {

std::vector<TaskTimeRow> largest_over_ranks(Communicator& comm, const TaskTotals& mine, double per) {
  nlohmann::json rows = nlohmann::json::array();
  for (const auto& [key, t] : mine) rows.push_back({std::get<0>(key), std::get<1>(key), std::get<2>(key), t.ms, t.calls});
  const std::vector<std::string> every_rank = comm.gather_strings(rows.dump(), 0);
  TaskTotals largest;
  for (const std::string& text : every_rank)
    for (const nlohmann::json& r : nlohmann::json::parse(text)) {
      TaskTotal& t = largest[{r[0].get<std::string>(), r[1].get<std::string>(), r[2].get<std::string>()}];
      t.ms = std::max(t.ms, r[3].get<double>());
      t.calls = std::max(t.calls, r[4].get<double>());
    }
  std::vector<TaskTimeRow> out;
  for (const auto& [key, t] : largest)
    out.push_back({std::get<0>(key), std::get<1>(key), std::get<2>(key), t.ms / per, t.calls / per});
  std::stable_sort(out.begin(), out.end(), [](const TaskTimeRow& a, const TaskTimeRow& b) { return a.ms > b.ms; });
  return out;
}

std::vector<TaskTimeRow> step_breakdown(Communicator& comm, const std::vector<TraceEvent>& events, int steps) {
  TaskTotals mine;
  for (const TraceEvent& e : events) {
    TaskTotal& t = mine[{e.category, lane_name(Lane{e.lane}), task_base_name(e.name)}];
    t.ms += (e.end_s - e.start_s) * 1e3;
    t.calls += 1;
  }
  return largest_over_ranks(comm, mine, std::max(steps, 1));
}

nlohmann::json task_time_json(const std::vector<TaskTimeRow>& rows) {
  nlohmann::json out = nlohmann::json::array();
  for (const TaskTimeRow& r : rows)
    out.push_back({{"pass", r.pass}, {"lane", r.lane}, {"task", r.task}, {"ms", r.ms}, {"calls", r.calls}});
  return out;
}

void log_step_breakdown(const std::vector<TaskTimeRow>& rows, int steps, double step_ms) {
  log::info("where a step goes (the last {} step(s), ms per step, each task summed over layers and chunks, on the "
            "rank that spent the most on it; a step is {:.1f} ms, and lanes run side by side):", steps, step_ms);
  log::info("  {:<9} {:<9} {:<28} {:>9} {:>7} {:>6}", "pass", "lane", "task", "ms", "share", "calls");
  for (const TaskTimeRow& r : rows)
    log::info("  {:<9} {:<9} {:<28} {:>9.2f} {:>6.1f}% {:>6.4g}", r.pass, r.lane, r.task, r.ms,
              step_ms > 0 ? 100 * r.ms / step_ms : 0.0, r.calls);
}

}  // namespace pm
