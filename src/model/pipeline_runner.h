// One training step's micro-batches through this rank's pipeline stage (model/pipeline_schedule.h
// says in which order): each forward reads the stage before's output, each backward the stage
// after's input gradient, both by point-to-point messages on the pipeline group; the outputs
// leave without blocking (isend), so that no two neighbouring stages wait on each other's send.
// With one stage (no pipeline group) it is gradient accumulation: forward, backward, forward, ...
//
// The data-parallel gradient all-reduce runs in the stage's last backward only (GradientSync
// disabled before it): the micro-batches' gradients add up locally first.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "comm/communicator.h"
#include "model/gpt.h"
#include "model/grad_sync.h"
#include "model/pipeline_schedule.h"
#include "sched/trace.h"

namespace pm {

struct PipelineStepResult {
  double loss = 0;        // mean over the micro-batches (the last stage; 0 on the others)
  double aux = 0, z_loss = 0;  // this stage's MoE layers, mean over the micro-batches
  double exposed_ms = 0;  // the compute lane waiting for the stage's own communication (all-to-alls, all-reduces)
  double wait_ms = 0;     // waiting for the neighbouring stages (the pipeline bubble and the links)
  int stashed_most = 0;   // the most micro-batches held between forward and backward at once
};

class PipelineRunner {
 public:
  // pipeline: this rank's pipeline group (rank = stage), null with one stage. copies: the ranks
  // beside this one that hold the same activations (a tensor-parallel group; null: none): each
  // sends only its slice to the next stage, whose group puts the slices together again over its
  // own fast link (Megatron-LM's scatter-gather), so the link between stages carries every
  // activation once instead of once per rank of the group.
  PipelineRunner(GptModel& model, Communicator* pipeline, PipelineSchedule schedule, Communicator* copies = nullptr);

  // Draws micro-batch m's inputs and targets [B, S].
  using DrawBatch = std::function<void(int m, int32_t* inputs, int32_t* targets)>;
  // Forward and backward of M micro-batches of B sequences, every loss gradient times scale.
  PipelineStepResult train_step(int M, int64_t B, float scale, const DrawBatch& draw, GradientSync& sync);
  // A forward without backward (evaluation): the loss on the last stage, 0 on the others.
  double forward_only(const int32_t* inputs, const int32_t* targets, int64_t B);
  // Records the waits for the other stages (on the compute lane: the bubble) in the next steps (null: stop).
  void set_trace(Trace* trace) { trace_ = trace; }

 private:
  void receive(float* into, int64_t count, int peer, double& wait_ms, const std::string& what);
  RequestPtr send(const std::vector<float>& data, int peer);  // data must live until the request is done
  bool sliced(int64_t count) const;  // sent in slices: a group of copies over which count divides

  GptModel& model_;
  Communicator* pipeline_;
  PipelineSchedule schedule_;
  Communicator* copies_;
  Trace* trace_ = nullptr;
  int stage_ = 0, stages_ = 1;
  std::vector<float> from_before_, from_after_;  // the received activation / gradient [B*S, D]
  std::vector<float> slice_;                     // this rank's received slice of one
};

}  // namespace pm
