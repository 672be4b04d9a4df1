// The data-parallel half of training: replicated (non-expert) gradients summed over ranks, in
// buckets that overlap the backward pass, as PyTorch DDP does.
//
// One bucket per transformer block and one for the rest (embeddings, final norm), whose
// gradients are complete only when the backward ends. When block l's backward is done, its bucket
// is all-reduced on the executor's communication thread while the compute thread goes on with
// block l-1; MoE all-to-alls of later blocks queue behind it in the same program order on every
// rank. Expert gradients stay local: their rank owns those experts.
#pragma once

#include <vector>

#include "comm/communicator.h"
#include "core/aligned.h"
#include "model/parameter.h"
#include "sched/executor.h"
#include "sched/trace.h"

namespace pm {

class GradientSync {
 public:
  // Parameters named "blocks.<l>...." go to block l's bucket, other replicated ones to the last.
  GradientSync(std::vector<Parameter>& params, int blocks, Communicator& comm, Executor& executor);

  // Starts the all-reduce of a block's bucket (block < 0: the rest). Each bucket once per step.
  void block_done(int block, Trace* trace = nullptr);
  // Starts every bucket not started yet, then waits for all; returns the milliseconds this call
  // waited (communication the backward did not hide).
  double finish(Trace* trace = nullptr);

 private:
  struct Bucket {
    std::vector<Parameter*> params;
    FloatBuffer flat;
    bool started = false;
  };
  void start(Bucket& bucket, int index, Trace* trace);

  Communicator& comm_;
  Executor& executor_;
  std::vector<Bucket> buckets_;  // [blocks]: the blocks, [blocks]: the rest
};

}  // namespace pm
