#include "apps/pipemoe/pass_breakdown.h"

#include <algorithm>
#include <cstdint>

#include "core/stats.h"
#include "sched/task_graph.h"

namespace pm::cli {

void PassBreakdown::add_pass(const LayerPassRun& forward, const LayerPassRun& backward) {
  for (const auto& [pass, run] : {std::pair{"forward", &forward}, std::pair{"backward", &backward}}) {
    const std::vector<Task>& tasks = run->graph.tasks();
    std::vector<Key> key_of;  // by task id
    for (const Task& task : tasks) key_of.push_back({pass, task_base_name(task.name)});
    std::map<Key, double> sums;  // this pass's, so that a name with no record this time counts 0
    for (size_t id = 0; id < tasks.size(); ++id) {
      lane_[key_of[id]] = lane_name(tasks[id].lane);
      sums[key_of[id]] += 0.0;
    }
    for (const TaskRecord& r : run->records) sums[key_of[r.task]] += (r.end_s - r.start_s) * 1e3;
    for (const auto& [key, ms] : sums) {
      std::vector<double>& values = ms_[key];
      values.resize(passes_, 0.0);  // a name first seen now was absent (0 ms) before
      values.push_back(ms);
    }
  }
  ++passes_;
  for (auto& [key, values] : ms_) values.resize(passes_, 0.0);  // absent this pass
}

namespace {

// The names in order, as one number: the ranks compare it before combining their rows by position.
double fingerprint(const std::vector<std::pair<std::string, std::string>>& keys) {
  uint32_t h = 2166136261u;  // FNV-1a
  for (const auto& [pass, task] : keys)
    for (const std::string* s : {&pass, &task}) {
      for (unsigned char c : *s) h = (h ^ c) * 16777619u;
      h = (h ^ 0xffu) * 16777619u;
    }
  return static_cast<double>(h);
}

}  // namespace

std::vector<PassBreakdown::Row> PassBreakdown::slowest_rank_rows(Communicator& comm) const {
  std::vector<Key> keys;
  std::vector<double> medians;
  for (const auto& [key, values] : ms_) {
    keys.push_back(key);
    medians.push_back(summarize(values).median);
  }
  const double mine = fingerprint(keys);
  const bool same = comm.allreduce_scalar(mine, ReduceOp::max) == mine &&
                    comm.allreduce_scalar(mine, ReduceOp::min) == mine;
  if (same && !medians.empty()) {
    std::vector<double> slowest(medians.size());
    comm.allreduce(medians.data(), slowest.data(), static_cast<int64_t>(medians.size()), DType::f64, ReduceOp::max);
    medians = slowest;
  }
  std::vector<Row> rows;
  for (size_t i = 0; i < keys.size(); ++i) rows.push_back({keys[i].first, lane_.at(keys[i]), keys[i].second, medians[i]});
  std::stable_sort(rows.begin(), rows.end(), [](const Row& a, const Row& b) {
    if (a.pass != b.pass) return a.pass == "forward";
    return a.ms > b.ms;
  });
  return rows;
}

}  // namespace pm::cli
