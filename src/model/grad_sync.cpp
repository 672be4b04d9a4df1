#include "model/grad_sync.h"

#include <cstring>
#include <string>

#include "core/clock.h"
#include "core/error.h"

namespace pm {

namespace {

// l for "blocks.<l>.anything", -1 otherwise.
int block_of(const std::string& name) {
  const std::string prefix = "blocks.";
  if (name.compare(0, prefix.size(), prefix) != 0) return -1;
  std::size_t dot = name.find('.', prefix.size());
  return dot == std::string::npos ? -1 : std::stoi(name.substr(prefix.size(), dot - prefix.size()));
}

}  // namespace

GradientSync::GradientSync(std::vector<Parameter>& params, int blocks, Communicator& comm, Executor& executor)
    : comm_(comm), executor_(executor), buckets_(blocks + 1) {
  for (Parameter& p : params) {
    if (p.expert) continue;
    int b = block_of(p.name);
    PM_CHECK(b < blocks, "parameter {} names block {} of a model with {}", p.name, b, blocks);
    buckets_[b < 0 ? blocks : b].params.push_back(&p);
  }
  for (Bucket& bucket : buckets_) {
    int64_t total = 0;
    for (const Parameter* p : bucket.params) total += p->grad->numel();
    bucket.flat.resize(total);
  }
}

void GradientSync::start(Bucket& bucket, int index, Trace* trace) {
  bucket.started = true;
  if (comm_.size() == 1 || bucket.params.empty()) return;
  // The job packs, sums in place and unpacks on the communication thread; the compute thread
  // does not touch these gradients again before finish().
  executor_.post(
      index < static_cast<int>(buckets_.size()) - 1 ? "all-reduce block " + std::to_string(index) + " grads"
                                                     : "all-reduce embedding grads",
      [this, &bucket] {
        int64_t at = 0;
        for (const Parameter* p : bucket.params)
          std::memcpy(&bucket.flat[at], p->grad->f32(), p->grad->nbytes()), at += p->grad->numel();
        comm_.allreduce(bucket.flat.data(), bucket.flat.data(), at, DType::f32, ReduceOp::sum);
        at = 0;
        for (const Parameter* p : bucket.params)
          std::memcpy(p->grad->f32(), &bucket.flat[at], p->grad->nbytes()), at += p->grad->numel();
      },
      trace);
}

void GradientSync::block_done(int block, Trace* trace) {
  const int index = block < 0 ? static_cast<int>(buckets_.size()) - 1 : block;
  PM_CHECK(index < static_cast<int>(buckets_.size()), "block {} out of range", block);
  Bucket& bucket = buckets_[index];
  PM_CHECK(!bucket.started, "bucket {} all-reduced twice in one step", index);
  start(bucket, index, trace);
}

double GradientSync::finish(Trace* trace) {
  for (std::size_t i = 0; i < buckets_.size(); ++i)
    if (!buckets_[i].started) start(buckets_[i], static_cast<int>(i), trace);
  double waited_s = executor_.drain();
  for (Bucket& bucket : buckets_) bucket.started = false;
  return waited_s * 1e3;
}

}  // namespace pm
