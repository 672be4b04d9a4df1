// The order in which one pipeline stage runs its micro-batches' forward and backward passes.
//
// 1F1B (PipeDream-Flush, Megatron-LM's default): stage s of S first runs min(S - s - 1, M)
// forwards (the warm-up that fills the pipe), then alternates one forward and one backward, then
// runs the backwards left (the cool-down). A stage never holds more than S - s micro-batches'
// activations, where GPipe (every forward, then every backward) holds all M. Both leave the same
// bubble, (S - 1) / (M + S - 1) of a step when forward and backward times are the same on every
// stage. With one stage 1F1B is forward, backward, forward, backward: gradient accumulation.
#pragma once

#include <string>
#include <vector>

namespace pm {

struct PipelineOp {
  bool forward = true;
  int micro_batch = 0;
};

enum class PipelineSchedule { one_f_one_b, gpipe };

PipelineSchedule parse_pipeline_schedule(const std::string& name, const char* what);

std::vector<PipelineOp> pipeline_ops(PipelineSchedule schedule, int stage, int stages, int micro_batches);

// The share of a step that a stage idles when every forward takes tf and every backward tb on
// every stage, and the links take no time: (S - 1) / (M + S - 1).
double pipeline_bubble_formula(int stages, int micro_batches);

// The step time of the ops of every stage, simulated with forward time tf and backward time tb
// on every stage and free links (a check of the formula, and of the schedules against each other).
double simulate_pipeline(PipelineSchedule schedule, int stages, int micro_batches, double tf, double tb);

}  // namespace pm
