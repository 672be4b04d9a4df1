#include "sched/task_graph.h"

#include "core/error.h"

namespace pm {

const char* lane_name(Lane lane) { return lane == Lane::compute ? "compute" : "comm"; }

const char* task_kind_name(TaskKind kind) {
  switch (kind) {
    case TaskKind::gate: return "gate";
    case TaskKind::pack: return "pack";
    case TaskKind::pack_weights: return "pack_weights";
    case TaskKind::counts: return "counts";
    case TaskKind::all_to_all: return "all_to_all";
    case TaskKind::expert_fwd: return "expert_fwd";
    case TaskKind::unpack: return "unpack";
    case TaskKind::gate_bwd: return "gate_bwd";
    case TaskKind::expert_dgrad: return "expert_dgrad";
    case TaskKind::expert_wgrad: return "expert_wgrad";
    case TaskKind::unpack_bwd: return "unpack_bwd";
    case TaskKind::other: return "other";
  }
  return "?";
}

int TaskGraph::add(Task task) {
  int id = size();
  for (int dep : task.deps)
    PM_CHECK(dep >= 0 && dep < id, "task '{}' depends on task {} that is not added yet", task.name, dep);
  tasks_.push_back(std::move(task));
  return id;
}

}  // namespace pm
