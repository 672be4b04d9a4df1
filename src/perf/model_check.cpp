#include "perf/model_check.h"

#include "core/error.h"
#include "sched/simulator.h"

namespace pm {

void CostCheck::add(const CostCheck& o) {
  measured_s += o.measured_s;
  predicted_s += o.predicted_s;
  tasks += o.tasks;
}

void PassCheck::add(const PassCheck& o) {
  makespan.add(o.makespan);
  for (const auto& [cost, c] : o.by_cost) by_cost[cost].add(c);
}

PassCheck check_pass(const PerfProfile& profile, const TaskGraph& graph, const std::vector<TaskRecord>& records,
                     double wall_s) {
  PM_CHECK(static_cast<int>(records.size()) == graph.size(), "check_pass: {} records for a graph of {} tasks",
           records.size(), graph.size());
  const Simulation sim = simulate(graph, [&](const Task& t) { return profile.predict(t); }, profile.interference);
  PassCheck out;
  out.makespan = {wall_s, sim.makespan_s, graph.size()};
  for (const TaskRecord& r : records) {
    const Task& t = graph.tasks()[r.task];
    out.by_cost[t.cost].add({r.end_s - r.start_s, sim.end_s[r.task] - sim.start_s[r.task], 1});
  }
  return out;
}

}  // namespace pm
