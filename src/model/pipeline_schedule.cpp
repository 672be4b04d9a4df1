#include "model/pipeline_schedule.h"

#include <algorithm>
#include <map>
#include <tuple>

#include "core/error.h"

namespace pm {

PipelineSchedule parse_pipeline_schedule(const std::string& name, const char* what) {
  if (name == "1f1b") return PipelineSchedule::one_f_one_b;
  if (name == "gpipe") return PipelineSchedule::gpipe;
  throw Error(ErrorKind::usage, fmt::format("{} must be \"1f1b\" or \"gpipe\", got \"{}\"", what, name));
}

std::vector<PipelineOp> pipeline_ops(PipelineSchedule schedule, int stage, int stages, int micro_batches) {
  PM_CHECK(stage >= 0 && stage < stages && micro_batches >= 1, "stage {} of {}, {} micro-batches", stage, stages,
           micro_batches);
  std::vector<PipelineOp> ops;
  if (schedule == PipelineSchedule::gpipe) {
    for (int m = 0; m < micro_batches; ++m) ops.push_back({true, m});
    for (int m = 0; m < micro_batches; ++m) ops.push_back({false, m});
    return ops;
  }
  const int warmup = std::min(stages - stage - 1, micro_batches);
  int f = 0, b = 0;
  for (; f < warmup; ++f) ops.push_back({true, f});
  while (f < micro_batches) {  // steady state: one forward, one backward
    ops.push_back({true, f++});
    ops.push_back({false, b++});
  }
  while (b < micro_batches) ops.push_back({false, b++});
  return ops;
}

double pipeline_bubble_formula(int stages, int micro_batches) {
  return static_cast<double>(stages - 1) / (micro_batches + stages - 1);
}

double simulate_pipeline(PipelineSchedule schedule, int stages, int micro_batches, double tf, double tb) {
  std::vector<std::vector<PipelineOp>> ops(stages);
  for (int s = 0; s < stages; ++s) ops[s] = pipeline_ops(schedule, s, stages, micro_batches);
  // finish time of (stage, forward?, micro-batch); each stage runs its ops in order, an op starts
  // once its stage is free and its input has arrived (the forward from the stage before, the
  // backward from the stage after)
  std::map<std::tuple<int, bool, int>, double> done;
  std::vector<std::size_t> next(stages, 0);
  std::vector<double> free_at(stages, 0.0);
  for (bool progress = true; progress;) {
    progress = false;
    for (int s = 0; s < stages; ++s) {
      while (next[s] < ops[s].size()) {
        const PipelineOp op = ops[s][next[s]];
        double ready = free_at[s];
        if (op.forward && s > 0) {
          auto it = done.find({s - 1, true, op.micro_batch});
          if (it == done.end()) break;
          ready = std::max(ready, it->second);
        }
        if (!op.forward && s + 1 < stages) {
          auto it = done.find({s + 1, false, op.micro_batch});
          if (it == done.end()) break;
          ready = std::max(ready, it->second);
        }
        free_at[s] = ready + (op.forward ? tf : tb);
        done[{s, op.forward, op.micro_batch}] = free_at[s];
        ++next[s];
        progress = true;
      }
    }
  }
  for (int s = 0; s < stages; ++s) PM_CHECK(next[s] == ops[s].size(), "the pipeline schedule deadlocks at stage {}", s);
  return *std::max_element(free_at.begin(), free_at.end());
}

}  // namespace pm
