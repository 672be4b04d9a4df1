#include "model/expert_offload.h"

namespace pm {

MappedExpertStore::MappedExpertStore(std::shared_ptr<const MappedSafetensors> file, const std::string& prefix,
                                     int experts, int first, int local_experts, int64_t M, int64_t H, int64_t H1)
    : file_(std::move(file)), first_(first), local_(local_experts), M_(M), H_(H), H1_(H1) {
  const int64_t E = experts;
  w1_ = file_->tensor(prefix + "w1", {E, M, H1});
  b1_ = file_->tensor(prefix + "b1", {E, H1});
  w2_ = file_->tensor(prefix + "w2", {E, H, M});
  b2_ = file_->tensor(prefix + "b2", {E, M});
}

ExpertWeightsView MappedExpertStore::expert(int le) const {
  const int64_t e = first_ + le;
  return {w1_ + e * M_ * H1_, b1_ + e * H1_, w2_ + e * H_ * M_, b2_ + e * M_};
}

void MappedExpertStore::release(int le) const {
  // the big matrices; the biases stay (the packed expert reads them at run time)
  const ExpertWeightsView w = expert(le);
  file_->release(w.w1, M_ * H1_ * sizeof(float));
  file_->release(w.w2, H_ * M_ * sizeof(float));
}

}  // namespace pm
