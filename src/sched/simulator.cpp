#include "sched/simulator.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "core/error.h"
#include "sched/lane_policy.h"

namespace pm {

double Interference::factor(Lane lane) const {
  if (lane == lanes::compute) return compute;
  if (lane == lanes::comm) return comm;
  return 1.0;
}

Simulation simulate(const TaskGraph& graph, const std::function<double(const Task&)>& duration,
                    const Interference& interference) {
  const auto& tasks = graph.tasks();
  const int n = graph.size();
  const double inf = std::numeric_limits<double>::infinity();
  PM_CHECK(interference.compute >= 1 && interference.comm >= 1 && std::isfinite(interference.compute) &&
               std::isfinite(interference.comm) && interference.handoff_s >= 0 && std::isfinite(interference.handoff_s) &&
               interference.comm_task_s >= 0 && std::isfinite(interference.comm_task_s),
           "interference factors must be finite and at least 1 (compute {}, comm {}, hand-off {} s, per "
           "communication task {} s)",
           interference.compute, interference.comm, interference.handoff_s, interference.comm_task_s);
  Simulation sim;
  sim.start_s.assign(n, 0.0);
  sim.end_s.assign(n, 0.0);
  sim.busy_s.assign(graph.lanes_used(), 0.0);
  LaneQueues queues(graph);
  const std::vector<Lane>& lanes = queues.lanes();
  std::vector<char> done(n, 0);
  std::vector<double> remaining(n, 0.0);  // seconds of work left, measured alone
  std::vector<int> running(sim.busy_s.size(), -1);  // per lane id
  double now = 0;
  int finished = 0;

  // When a task's dependencies allow it to start: done, plus a hand-off for another lane's.
  auto ready_at = [&](int id) {
    double t = 0;
    for (int d : tasks[id].deps) {
      if (!done[d]) return inf;
      t = std::max(t, sim.end_s[d] + (tasks[d].lane != tasks[id].lane ? interference.handoff_s : 0.0));
    }
    return t;
  };
  while (finished < n) {
    // Idle lanes take their next task by the lane policy, as the executor does.
    double next_ready = inf;
    int busy_lanes = 0;
    for (Lane lane : lanes) {
      if (running[lane.id] < 0) {
        LaneQueues::Pick p = queues.pick(lane, now, ready_at);
        if (p.task >= 0) {
          double d = duration(tasks[p.task]) + (lane == lanes::comm ? interference.comm_task_s : 0.0);
          PM_CHECK(std::isfinite(d) && d >= 0, "task '{}' has a predicted duration of {} s", tasks[p.task].name, d);
          running[lane.id] = p.task;
          remaining[p.task] = d;
          sim.start_s[p.task] = now;
        } else {
          next_ready = std::min(next_ready, p.next_ready_at);
        }
      }
      busy_lanes += running[lane.id] >= 0;
    }
    // a lane runs slower while another is busy
    auto factor = [&](Lane lane) { return busy_lanes > 1 ? interference.factor(lane) : 1.0; };
    double step = inf;
    for (Lane lane : lanes)
      if (running[lane.id] >= 0) step = std::min(step, remaining[running[lane.id]] * factor(lane));
    if (next_ready > now) step = std::min(step, next_ready - now);  // a hand-off ends
    PM_CHECK(step != inf, "task graph cannot make progress");
    now += step;
    for (Lane lane : lanes) {
      int id = running[lane.id];
      if (id < 0) continue;
      remaining[id] -= step / factor(lane);
      sim.busy_s[lane.id] += step;
      if (remaining[id] <= 1e-15) {
        done[id] = 1;
        sim.end_s[id] = now;
        running[lane.id] = -1;
        ++finished;
      }
    }
  }
  sim.makespan_s = now;
  return sim;
}

}  // namespace pm
