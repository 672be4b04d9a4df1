#include "sched/simulator.h"

#include <algorithm>
#include <limits>

#include "core/error.h"

namespace pm {

Simulation simulate(const TaskGraph& graph, const std::function<double(const Task&)>& duration,
                    const Interference& interference) {
  const auto& tasks = graph.tasks();
  const int n = graph.size();
  Simulation sim;
  sim.start_s.assign(n, 0.0);
  sim.end_s.assign(n, 0.0);
  std::vector<char> started(n, 0), done(n, 0);
  std::vector<double> remaining(n, 0.0);  // seconds of work left, measured alone
  int running[kNumLanes] = {-1, -1};
  double now = 0;
  int finished = 0;

  // When a task's dependencies allow it to start: done, plus a hand-off for the other lane's.
  auto ready_at = [&](int id) {
    double t = 0;
    for (int d : tasks[id].deps) {
      if (!done[d]) return std::numeric_limits<double>::infinity();
      t = std::max(t, sim.end_s[d] + (tasks[d].lane != tasks[id].lane ? interference.handoff_s : 0.0));
    }
    return t;
  };
  while (finished < n) {
    // Idle lanes take their first ready task (insertion order = priority), as the executor does.
    double next_ready = std::numeric_limits<double>::infinity();
    for (int lane = 0; lane < kNumLanes; ++lane) {
      if (running[lane] >= 0) continue;
      for (int id = 0; id < n; ++id) {
        if (started[id] || static_cast<int>(tasks[id].lane) != lane) continue;
        double at = ready_at(id);
        if (at > now) {
          next_ready = std::min(next_ready, at);
          continue;
        }
        started[id] = 1;
        running[lane] = id;
        remaining[id] = std::max(0.0, duration(tasks[id]));
        sim.start_s[id] = now;
        break;
      }
    }
    const bool both = running[0] >= 0 && running[1] >= 0;
    const double factor[kNumLanes] = {both ? interference.compute : 1.0, both ? interference.comm : 1.0};
    double step = std::numeric_limits<double>::infinity();
    for (int lane = 0; lane < kNumLanes; ++lane)
      if (running[lane] >= 0) step = std::min(step, remaining[running[lane]] * factor[lane]);
    if (next_ready > now) step = std::min(step, next_ready - now);  // a hand-off ends
    PM_CHECK(step != std::numeric_limits<double>::infinity(), "task graph cannot make progress");
    now += step;
    for (int lane = 0; lane < kNumLanes; ++lane) {
      int id = running[lane];
      if (id < 0) continue;
      remaining[id] -= step / factor[lane];
      sim.busy_s[lane] += step;
      if (remaining[id] <= 1e-15) {
        done[id] = 1;
        sim.end_s[id] = now;
        running[lane] = -1;
        ++finished;
      }
    }
  }
  sim.makespan_s = now;
  return sim;
}

}  // namespace pm
