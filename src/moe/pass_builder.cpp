#include "moe/pass_builder.h"

namespace pm {

std::string indexed(const char* name, int chunk) { return std::string(name) + "[" + std::to_string(chunk) + "]"; }

std::vector<int> plus(std::vector<int> a, const std::vector<int>& b) {
  a.insert(a.end(), b.begin(), b.end());
  return a;
}

void set_work(TaskGraph& graph, const PassTasks& tasks, const std::vector<TaskWork>& works) {
  PM_CHECK(works.size() == tasks.ids.size(), "{} task works for a pass of {} tasks", works.size(), tasks.ids.size());
  for (std::size_t i = 0; i < works.size(); ++i) graph.tasks()[tasks.ids[i]].work = works[i];
}

double weight_pack_bytes(const MoeShape& s) {
  return 2.0 * s.local_experts() * s.model_dim * static_cast<double>(s.fc1_width() + s.hidden) * 4;
}

TaskWork ffn_work(int64_t rows, const MoeShape& s, double gemms_per_expert, double copies) {
  double calls = gemms_per_expert * s.local_experts();
  double flops = gemms_per_expert / 2 * static_cast<double>(rows) * s.expert_flops_per_row();
  double bytes = copies * rows * (s.model_dim + s.hidden) * 4.0;
  return TaskWork{calls, flops, bytes};
}

TaskWork dgrad_work(int64_t rows, const MoeShape& s, double copies) {
  TaskWork w = ffn_work(rows, s, 2, copies);
  if (s.recompute_experts) {
    w.calls += s.local_experts();
    w.flops += 2.0 * static_cast<double>(rows) * s.model_dim * s.fc1_width();
    w.bytes += static_cast<double>(rows) * (s.fc1_width() + s.hidden) * 4.0;
  }
  return w;
}

}  // namespace pm
