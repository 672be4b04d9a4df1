// The model's parallel parts that are neither forward nor backward: the dense steps split over
// the tensor-parallel group (a task for this rank's share, the all-reduce, a task for the rest),
// and the micro-batches a pipeline stage keeps between their forward and their backward.
#include <utility>

#include "model/gpt.h"
#include "model/gpt_internal.h"

namespace pm {

using namespace gpt_internal;  // the parts the model's source files share

void GptModel::swap_pass(SavedPass& saved) {
  std::swap(inputs_, saved.inputs), std::swap(targets_, saved.targets);
  std::swap(B_, saved.B), std::swap(T_, saved.T), std::swap(backward_scale_, saved.backward_scale);
  std::swap(h_final_, saved.h_final), std::swap(lnf_out_, saved.lnf_out), std::swap(lnf_mean_, saved.lnf_mean);
  std::swap(lnf_rstd_, saved.lnf_rstd), std::swap(dlogits_, saved.dlogits);
  saved.block_buffers.resize(blocks_.size());
  saved.block_rows.resize(blocks_.size());
  saved.moe_passes.resize(blocks_.size());
  for (std::size_t l = 0; l < blocks_.size(); ++l) {
    if (!blocks_[l]) continue;
    std::vector<Buffer<float>>& mine = saved.block_buffers[l];
    std::size_t i = 0;
    blocks_[l]->each_saved([&](Buffer<float>& a) {
      if (mine.size() <= i) mine.resize(i + 1);
      std::swap(a, mine[i++]);
    });
    std::vector<RowBuffer>& rows = saved.block_rows[l];
    i = 0;
    blocks_[l]->each_saved_rows([&](RowBuffer& a) {
      if (rows.size() <= i) rows.resize(i + 1);
      std::swap(a, rows[i++]);
    });
    std::swap(blocks_[l]->moe_pass, saved.moe_passes[l]);
  }
}

void GptModel::stash_pass(int slot) {
  PM_CHECK(!stashed_.count(slot), "micro-batch slot {} is already stashed", slot);
  auto saved = std::make_unique<SavedPass>();
  swap_pass(*saved);
  stashed_[slot] = std::move(saved);
}

void GptModel::restore_pass(int slot) {
  auto it = stashed_.find(slot);
  PM_CHECK(it != stashed_.end(), "micro-batch slot {} was not stashed", slot);
  swap_pass(*it->second);  // the model's current (spent) buffers go with the slot
  stashed_.erase(it);
}

int GptModel::add_dense_task(TaskGraph& g, const std::string& name, const char* cost, TaskWork work,
                             std::vector<int> deps, std::function<void()> first, Buffer<float>* partial, int64_t count,
                             std::function<void()> rest) {
  if (dense_tp_ == 1)
    return g.add({name, lanes::compute, cost, -1, work, std::move(deps), [first, rest] { first(), rest(); }});
  const int shares = g.add({name, lanes::compute, cost, -1, work, std::move(deps), std::move(first)});
  const double bytes = 2.0 * (dense_tp_ - 1) / dense_tp_ * static_cast<double>(count) * sizeof(float);
  const int sum = g.add({name + " all-reduce", lanes::comm, "tp_allreduce", -1, {1, 0, bytes}, {shares},
                         [this, partial, count] {
                           tp_group_->allreduce(partial->data(), partial->data(), count, DType::f32, ReduceOp::sum);
                         }});
  return g.add({name + " out", lanes::compute, cost, -1, {1, 0, 0}, {sum}, std::move(rest)});
}

void GptModel::linear_forward_share(Backend& k, RowsIn x, const Tensor& w, const Tensor& b, int64_t T,
                                    float* y) const {
  if (dense_tp_ == 1 || tp_group_->rank() == 0) return linear_forward(k, precision_, x, w, b, T, y, frozen_pack(w));
  k.linear(precision_, T, w.dim(1), w.dim(0), x, w.f32(), frozen_pack(w), nullptr, y);  // the bias added by rank 0
}

const PackedMatrix* GptModel::frozen_pack(const Tensor& w) const {
  auto it = frozen_packs_.find(&w);
  return it == frozen_packs_.end() ? nullptr : it->second.get();
}

}  // namespace pm
