// Where a layer's pass goes (`pipemoe layer --breakdown`, `tasks_ms` in its JSON and in `bench
// floor`'s): each task's time per pass summed over the pipeline's chunks (model/task_times.h), the
// median over the timed passes, the slowest rank.
#pragma once

#include <map>
#include <string>
#include <tuple>
#include <vector>

#include "comm/communicator.h"
#include "model/task_times.h"
#include "moe/moe_layer.h"

namespace pm::cli {

class PassBreakdown {
 public:
  // Adds one timed pass (its forward's and backward's task records).
  void add_pass(const LayerPassRun& forward, const LayerPassRun& backward);

  // Rows on rank 0 (a collective: every rank calls it): each task's median over this rank's passes,
  // the largest over the ranks, forward tasks first, each direction's largest first.
  std::vector<TaskTimeRow> slowest_rank_rows(Communicator& comm) const;

 private:
  // (pass, lane, task) -> one value per pass added, ms and tasks run
  std::map<TaskTotals::key_type, std::vector<TaskTotal>> passes_of_;
  int passes_ = 0;
};

}  // namespace pm::cli
