// Where a layer's pass goes (`pipemoe layer --breakdown`, and `tasks_ms` in its JSON): each task's
// time summed by name over the pipeline's chunks ("dispatch" for dispatch[0], dispatch[1], ...),
// per timed pass, so that what the expert GEMMs leave to the router, the copies and the
// all-to-all shows without a trace and a script to read it.
#pragma once

#include <map>
#include <string>
#include <utility>
#include <vector>

#include "comm/communicator.h"
#include "model/step_breakdown.h"
#include "moe/moe_layer.h"

namespace pm::cli {

class PassBreakdown {
 public:
  // Adds one timed pass (its forward's and backward's task records).
  void add_pass(const LayerPassRun& forward, const LayerPassRun& backward);

  using Row = TaskTimeRow;  // ms per pass: the median pass, the slowest rank
  // Every rank calls (a collective): the median over this rank's passes, then the largest over the
  // ranks, task by task, forward tasks first, each direction's largest first. The ranks run the
  // same graph; if their task names differed, the rows are this rank's own.
  std::vector<Row> slowest_rank_rows(Communicator& comm) const;

 private:
  using Key = std::pair<std::string, std::string>;  // (pass, task)
  std::map<Key, std::string> lane_;
  std::map<Key, std::vector<double>> ms_;  // one value per pass added
  int passes_ = 0;
};

}  // namespace pm::cli
