#include "sched/task_graph.h"

#include <algorithm>
#include <deque>
#include <mutex>

#include "core/error.h"

namespace pm {
namespace {

struct LaneInfo {
  std::string name;
  bool in_order;
};

// The process's lanes; the standard ones first, at their ids. Lanes are added at start-up and
// never removed, so readers need the lock only to see a consistent vector.
struct LaneTable {
  std::mutex mutex;
  std::deque<LaneInfo> lanes = {{"compute", false}, {"comm", true}, {"copy", false}};  // stable references
};

LaneTable& table() {
  static LaneTable t;
  return t;
}

const LaneInfo& info(Lane lane) {
  LaneTable& t = table();
  std::lock_guard lock(t.mutex);
  PM_CHECK(lane.id >= 0 && lane.id < static_cast<int>(t.lanes.size()), "lane {} was never added", lane.id);
  return t.lanes[lane.id];
}

}  // namespace

Lane add_lane(const std::string& name, bool in_order) {
  LaneTable& t = table();
  std::lock_guard lock(t.mutex);
  t.lanes.push_back({name, in_order});
  return Lane{static_cast<int>(t.lanes.size()) - 1};
}

int lane_count() {
  LaneTable& t = table();
  std::lock_guard lock(t.mutex);
  return static_cast<int>(t.lanes.size());
}

const std::string& lane_name(Lane lane) { return info(lane).name; }
bool lane_in_order(Lane lane) { return info(lane).in_order; }

std::string task_base_name(const std::string& name) {
  const auto bracket = name.find('[');
  return bracket == std::string::npos ? name : name.substr(0, bracket);
}

int TaskGraph::add(Task task) {
  int id = size();
  for (int dep : task.deps)
    PM_CHECK(dep >= 0 && dep < id, "task '{}' depends on task {} that is not added yet", task.name, dep);
  PM_CHECK(task.lane.id >= 0 && task.lane.id < lane_count(), "task '{}' is on lane {}, which was never added",
           task.name, task.lane.id);
  tasks_.push_back(std::move(task));
  return id;
}

int TaskGraph::lanes_used() const {
  int most = 0;
  for (const Task& t : tasks_) most = std::max(most, t.lane.id + 1);
  return most;
}

}  // namespace pm
