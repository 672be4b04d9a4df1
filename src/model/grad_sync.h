// The data-parallel half of training: replicated (non-expert) gradients summed over ranks, in
// buckets that overlap the backward pass, as PyTorch DDP does; in float32 or, to halve the bytes,
// bfloat16 on the wire.
//
// One bucket per transformer block and one for the rest (embeddings, final norm), whose
// gradients are complete only when the backward ends. As the model builds its backward graph, it
// says when each block's gradients are final (GptModel::set_grads_ready); the bucket's all-reduce
// joins the graph there, on the communication lane, so it runs while the compute lane goes on
// with the blocks below. The communication lane runs its tasks in the order added, the same
// on every rank, so the all-reduces and the MoE all-to-alls of the blocks below match across
// ranks. Expert gradients stay local where their rank alone owns those experts (ep); with PPMoE
// every tensor-parallel group holds all experts, and a rank's expert gradients are summed over the
// ranks that hold the same experts (expert_replicas) and scaled by expert_scale, in a bucket of
// their own per block.
#pragma once

#include <vector>

#include "comm/communicator.h"
#include "core/parameter.h"
#include "kernels/backend.h"
#include "sched/task_graph.h"

namespace pm {

class GradientSync {
 public:
  // Parameters named "blocks.<l>...." go to block l's bucket, other replicated ones to the last.
  // overlap: each bucket as soon as its block is done; otherwise all of them after the backward.
  // expert_replicas (may be null): the group over which expert gradients are summed, then
  // multiplied by expert_scale (the gradient came in scaled by 1 / ranks, but each group's tokens
  // reached its experts once, not once per rank of the group: scale = ranks per group).
  // wire: DType::f32, or DType::bf16 for half the bytes (comm/bf16_allreduce.h: each gradient
  // summed from bf16 roundings in float32 and rounded to bf16 once more).
  // The gradients of the parameters it sums become views of its buckets' memory until it is
  // destroyed (then they own a copy again): construct it before the first pass.
  GradientSync(std::vector<Parameter>& params, int blocks, Communicator& comm, bool overlap,
               Communicator* expert_replicas = nullptr, float expert_scale = 1.0f, DType wire = DType::f32);
  ~GradientSync();
  GradientSync(const GradientSync&) = delete;
  GradientSync& operator=(const GradientSync&) = delete;

  // GptModel::GradsReady: appends block `block`'s bucket (block < 0: the rest) after `ready`;
  // without overlap, appends every bucket once the rest is ready.
  void grads_ready(TaskGraph& graph, int block, const std::vector<int>& ready);
  // Off: the backward adds no all-reduce (the micro-batches before the last of a step: their
  // gradients accumulate locally, the last one's backward sums them all).
  void set_enabled(bool enabled) { enabled_ = enabled; }

 private:
  struct Bucket {
    std::string name;
    std::vector<Parameter*> params;
    Buffer<float> flat;  // the params' gradients, each a view of its part (from a 64-byte line)
    Communicator* comm = nullptr;
    float scale = 1.0f;  // applied after the sum
  };
  void append(TaskGraph& graph, Bucket& bucket, const std::vector<int>& after);

  bool overlap_;
  DType wire_;
  bool enabled_ = true;
  std::vector<Bucket> buckets_;  // [blocks]: the blocks, [blocks]: the rest
  std::vector<Bucket> expert_buckets_;  // [blocks]: each block's sharded gradients (with expert_replicas), [blocks]: the rest's
};

}  // namespace pm
