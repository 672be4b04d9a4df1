#include "sched/lane_policy.h"

#include <algorithm>

namespace pm {

LaneQueues::LaneQueues(const TaskGraph& graph, bool serial) : graph_(graph), serial_(serial) {
  queue_.resize(serial ? 1 : graph.lanes_used());
  for (int id = 0; id < graph.size(); ++id) queue_[lane_of(id).id].push_back(id);
  for (int l = 0; l < static_cast<int>(queue_.size()); ++l)
    if (!queue_[l].empty()) lanes_.push_back(Lane{l});
}

Lane LaneQueues::lane_of(int task) const { return serial_ ? lanes::compute : graph_.task(task).lane; }

bool LaneQueues::has_tasks_left(Lane lane) const {
  return lane.id < static_cast<int>(queue_.size()) && !queue_[lane.id].empty();
}

LaneQueues::Pick LaneQueues::pick(Lane lane, double now, const std::function<double(int)>& ready_at) {
  Pick out;
  if (!has_tasks_left(lane)) return out;
  std::vector<int>& q = queue_[lane.id];
  // serial mode is in order too: one lane, the order added
  const bool in_order = serial_ || lane_in_order(lane);
  for (std::size_t i = 0; i < q.size(); ++i) {
    double at = ready_at(q[i]);
    if (at <= now) {
      out.task = q[i];
      q.erase(q.begin() + static_cast<std::ptrdiff_t>(i));
      return out;
    }
    out.next_ready_at = std::min(out.next_ready_at, at);
    if (in_order) break;
  }
  return out;
}

}  // namespace pm
