#include "model/step_breakdown.h"

#include <algorithm>
#include <map>
#include <tuple>

#include "core/log.h"
#include "sched/task_graph.h"

namespace pm {

namespace {

using Key = std::tuple<std::string, std::string, std::string>;  // pass, lane, task

}  // namespace

std::vector<TaskTimeRow> step_breakdown(Communicator& comm, const std::vector<TraceEvent>& events, int steps) {
  std::map<Key, double> mine;
  for (const TraceEvent& e : events)
    mine[Key{e.category, lane_name(Lane{e.lane}), task_base_name(e.name)}] += (e.end_s - e.start_s) * 1e3;
  nlohmann::json rows = nlohmann::json::array();
  for (const auto& [key, ms] : mine) rows.push_back({std::get<0>(key), std::get<1>(key), std::get<2>(key), ms});
  const std::vector<std::string> every_rank = comm.gather_strings(rows.dump(), 0);
  std::map<Key, double> largest;  // over the ranks that ran the task
  for (const std::string& text : every_rank)
    for (const nlohmann::json& r : nlohmann::json::parse(text)) {
      double& ms = largest[Key{r[0].get<std::string>(), r[1].get<std::string>(), r[2].get<std::string>()}];
      ms = std::max(ms, r[3].get<double>());
    }
  std::vector<TaskTimeRow> out;
  for (const auto& [key, ms] : largest)
    out.push_back({std::get<0>(key), std::get<1>(key), std::get<2>(key), ms / std::max(steps, 1)});
  std::stable_sort(out.begin(), out.end(), [](const TaskTimeRow& a, const TaskTimeRow& b) { return a.ms > b.ms; });
  return out;
}

nlohmann::json task_time_json(const std::vector<TaskTimeRow>& rows) {
  nlohmann::json out = nlohmann::json::array();
  for (const TaskTimeRow& r : rows) out.push_back({{"pass", r.pass}, {"lane", r.lane}, {"task", r.task}, {"ms", r.ms}});
  return out;
}

void log_step_breakdown(const std::vector<TaskTimeRow>& rows, int steps, double step_ms) {
  log::info("where a step goes (the last {} step(s), ms per step, each task summed over layers and chunks, on the "
            "rank that spent the most on it; a step is {:.1f} ms, and lanes run side by side):", steps, step_ms);
  log::info("  {:<9} {:<9} {:<28} {:>9} {:>7}", "pass", "lane", "task", "ms", "share");
  for (const TaskTimeRow& r : rows)
    log::info("  {:<9} {:<9} {:<28} {:>9.2f} {:>6.1f}%", r.pass, r.lane, r.task, r.ms,
              step_ms > 0 ? 100 * r.ms / step_ms : 0.0);
}

}  // namespace pm
