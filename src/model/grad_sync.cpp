#include "model/grad_sync.h"

#include <cstring>
#include <string>

#include "comm/bf16_allreduce.h"
#include "core/error.h"

namespace pm {

namespace {

// n floats rounded up to whole 64-byte lines.
int64_t padded(int64_t n) { return (n + 15) / 16 * 16; }

// l for "blocks.<l>.anything", -1 otherwise.
int block_of(const std::string& name) {
  const std::string prefix = "blocks.";
  if (name.compare(0, prefix.size(), prefix) != 0) return -1;
  std::size_t dot = name.find('.', prefix.size());
  return dot == std::string::npos ? -1 : std::stoi(name.substr(prefix.size(), dot - prefix.size()));
}

}  // namespace

GradientSync::GradientSync(std::vector<Parameter>& params, int blocks, Communicator& comm, bool overlap,
                           Communicator* expert_replicas, float expert_scale, DType wire)
    : overlap_(overlap), wire_(wire), buckets_(blocks + 1) {
  PM_CHECK(wire == DType::f32 || wire == DType::bf16, "gradients cross the wire as f32 or bf16, not {}", dtype_name(wire));
  for (int b = 0; b < blocks; ++b) buckets_[b].name = "all-reduce block " + std::to_string(b) + " grads";
  buckets_[blocks].name = "all-reduce embedding grads";
  for (Bucket& bucket : buckets_) bucket.comm = &comm;
  if (expert_replicas) {  // [blocks]: the sharded parameters outside the blocks (a split embedding)
    expert_buckets_.resize(blocks + 1);
    for (int b = 0; b <= blocks; ++b) {
      expert_buckets_[b].name = b < blocks ? "all-reduce block " + std::to_string(b) + " expert grads"
                                           : "all-reduce sharded embedding grads";
      expert_buckets_[b].comm = expert_replicas;
      expert_buckets_[b].scale = expert_scale;
    }
  }
  for (Parameter& p : params) {
    int b = block_of(p.name);
    PM_CHECK(b < blocks, "parameter {} names block {} of a model with {}", p.name, b, blocks);
    if (p.expert) {
      if (expert_replicas) expert_buckets_[b < 0 ? blocks : b].params.push_back(&p);
      continue;
    }
    buckets_[b < 0 ? blocks : b].params.push_back(&p);
  }
  // Each bucket's gradients become views of one block of memory, each starting on a 64-byte line
  // (the zeros between them sum to zeros): the all-reduce sums them where the backward wrote them.
  // Packing them into a flat buffer and back copied 7.6 MB twice a step of configs/deepseek.json on
  // the communication lane, whose real-time thread takes the core from the compute lane meanwhile.
  for (std::vector<Bucket>* list : {&buckets_, &expert_buckets_})
    for (Bucket& bucket : *list) {
      int64_t total = 0;
      for (const Parameter* p : bucket.params) total += padded(p->grad->numel());
      bucket.flat.assign(total, 0.0f);
      int64_t at = 0;
      for (Parameter* p : bucket.params) {
        Tensor& grad = *p->grad;
        PM_CHECK(grad.dtype() == DType::f32 && grad.device() == Device::cpu, "gradient {}: float32 in host memory",
                 p->name);
        std::memcpy(&bucket.flat[at], grad.f32(), grad.nbytes());
        grad = Tensor::view_of(&bucket.flat[at], grad.shape());
        at += padded(grad.numel());
      }
    }
}

GradientSync::~GradientSync() {
  // the gradients own their memory again: the model may outlive the buckets
  for (std::vector<Bucket>* list : {&buckets_, &expert_buckets_})
    for (Bucket& bucket : *list)
      for (Parameter* p : bucket.params) *p->grad = p->grad->clone();
}

void GradientSync::append(TaskGraph& graph, Bucket& bucket, const std::vector<int>& after) {
  Communicator& comm = *bucket.comm;
  if ((comm.size() == 1 && bucket.scale == 1.0f) || bucket.params.empty()) return;
  const double bytes = 2.0 * (comm.size() - 1) / comm.size() * bucket.flat.size() * dtype_size(wire_);
  // Sums the bucket's gradients in place on the communication lane; no compute task touches them
  // again in this graph.
  graph.add({bucket.name, lanes::comm, "grad_allreduce", -1, {1, 0, bytes}, after, [&comm, &bucket, wire = wire_] {
               const int64_t n = static_cast<int64_t>(bucket.flat.size());
               if (wire == DType::bf16)
                 allreduce_sum_bf16_wire(comm, bucket.flat.data(), n);
               else
                 comm.allreduce(bucket.flat.data(), bucket.flat.data(), n, DType::f32, ReduceOp::sum);
               if (bucket.scale != 1.0f)
                 for (int64_t i = 0; i < n; ++i) bucket.flat[i] *= bucket.scale;
             }});
}

void GradientSync::grads_ready(TaskGraph& graph, int block, const std::vector<int>& ready) {
  if (!enabled_) return;
  const int rest = static_cast<int>(buckets_.size()) - 1;
  PM_CHECK(block < rest, "block {} out of range", block);
  if (overlap_) {
    append(graph, buckets_[block < 0 ? rest : block], ready);
    if (!expert_buckets_.empty()) append(graph, expert_buckets_[block < 0 ? rest : block], ready);
    return;
  }
  if (block >= 0) return;
  // after the whole backward: the ready tasks of the rest come last and follow every block's
  for (Bucket& bucket : buckets_) append(graph, bucket, ready);
  for (Bucket& bucket : expert_buckets_) append(graph, bucket, ready);
}

}  // namespace pm
