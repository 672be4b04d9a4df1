// Expert offloading for memory-limited inference, the model's side: where each MoE layer's
// routed experts come from when they are not resident (moe/expert_store.h has the cache).
//   host  the experts are read from the checkpoint once into host memory;
//   disk  they stay in the checkpoint's model.safetensors, mapped into memory and read in place;
//         a loaded expert's pages are let go again (MADV_DONTNEED), so only the cache stays.
#pragma once

#include <memory>
#include <string>

#include "model/safetensors.h"
#include "moe/expert_store.h"

namespace pm {

class MappedExpertStore final : public ExpertStore {
 public:
  // The layer's global expert tensors w1 [E, M, H1], b1 [E, H1], w2 [E, H, M], b2 [E, M] in `file`
  // (named `prefix` + "w1" ...); this rank holds experts first .. first + local_experts - 1.
  MappedExpertStore(std::shared_ptr<const MappedSafetensors> file, const std::string& prefix, int experts, int first,
                    int local_experts, int64_t M, int64_t H, int64_t H1);
  int local_experts() const override { return local_; }
  ExpertWeightsView expert(int local_expert) const override;
  void release(int local_expert) const override;
  std::string where() const override { return "disk (" + file_->path() + ", mapped)"; }

 private:
  std::shared_ptr<const MappedSafetensors> file_;
  const float *w1_, *b1_, *w2_, *b2_;
  int first_, local_;
  int64_t M_, H_, H1_;
};

}  // namespace pm
