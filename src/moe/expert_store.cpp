#include "moe/expert_store.h"

#include <algorithm>

#include "core/clock.h"
#include "core/error.h"

namespace pm {

HostExpertStore::HostExpertStore(const float* w1, const float* b1, const float* w2, const float* b2, int local_experts,
                                 int64_t M, int64_t H, int64_t H1)
    : experts_(local_experts),
      M_(M),
      H_(H),
      H1_(H1),
      w1_(w1, w1 + local_experts * M * H1),
      b1_(b1, b1 + local_experts * H1),
      w2_(w2, w2 + local_experts * H * M),
      b2_(b2, b2 + local_experts * M) {}

ExpertWeightsView HostExpertStore::expert(int le) const {
  return {&w1_[le * M_ * H1_], &b1_[le * H1_], &w2_[le * H_ * M_], &b2_[le * M_]};
}

OffloadMode parse_offload_mode(const std::string& text) {
  if (text == "resident") return OffloadMode::resident;
  if (text == "blocking") return OffloadMode::blocking;
  PM_REQUIRE(text == "prefetch", "--offload-mode must be resident, blocking or prefetch, got '{}'", text);
  return OffloadMode::prefetch;
}

const char* offload_mode_name(OffloadMode mode) {
  switch (mode) {
    case OffloadMode::resident: return "resident";
    case OffloadMode::blocking: return "blocking";
    case OffloadMode::prefetch: return "prefetch";
  }
  return "?";
}

ExpertCache::ExpertCache(std::shared_ptr<const ExpertStore> store, Backend& backend, int slots, int64_t M, int64_t H,
                         Activation activation, Precision precision)
    : store_(std::move(store)), backend_(backend), M_(M), H_(H) {
  const int El = store_->local_experts();
  PM_REQUIRE(slots >= 1 && slots <= El,
             "--expert-cache must be between 1 and the {} routed experts a rank holds per MoE layer, got {}", El, slots);
  // both forward matrices, packed: what one resident expert costs
  bytes_per_expert_ = M * (fc1_width(activation, H) + H) * static_cast<int64_t>(sizeof(float));
  for (int s = 0; s < slots; ++s) slots_.push_back(backend.new_packed_expert(activation, precision));
  held_.assign(slots, -1);
  slot_of_.assign(El, -1);
  in_use_.assign(El, 0);
  for (int s = 0; s < slots; ++s) recent_.push_back(s);
}

int ExpertCache::slot_to_fill(const std::vector<char>& wanted, bool pin) {
  // the least recently used slot whose expert this pass does not need; unpinned, any but `wanted`
  for (auto it = recent_.rbegin(); it != recent_.rend(); ++it) {
    const int e = held_[*it];
    if (e < 0 || (!in_use_[e] && !wanted[e])) return *it;
  }
  if (pin) return -1;
  for (auto it = recent_.rbegin(); it != recent_.rend(); ++it)
    if (!wanted[held_[*it]]) return *it;
  return -1;
}

double ExpertCache::load(const std::vector<int>& experts, bool pin) {
  const double start = now_s();
  std::vector<char> wanted(slot_of_.size(), 0);
  for (int e : experts) wanted[e] = 1;
  for (int e : experts) {
    int s = slot_of_[e];
    if (s < 0) {
      s = slot_to_fill(wanted, pin);
      if (s < 0 && pin) break;  // the rest load when they are needed
      PM_CHECK(s >= 0, "{} experts wanted at once from a cache of {} slots", experts.size(), slots_.size());
      if (held_[s] >= 0) slot_of_[held_[s]] = -1;
      const ExpertWeightsView w = store_->expert(e);
      backend_.pack_expert_forward(*slots_[s], w.w1, w.w2, w.b1, w.b2, M_, H_);
      store_->release(e);
      held_[s] = e;
      slot_of_[e] = s;
      ++loads_;
    }
    if (pin) in_use_[e] = 1;
    recent_.remove(s);
    recent_.push_front(s);
  }
  int resident = 0;
  for (int e : held_) resident += e >= 0;
  peak_resident_ = std::max(peak_resident_, resident);
  const double seconds = now_s() - start;
  load_s_ += seconds;
  return seconds;
}

const PackedExpert& ExpertCache::packed(int le) const {
  PM_CHECK(slot_of_[le] >= 0, "expert {} is not resident", le);
  return *slots_[slot_of_[le]];
}

void ExpertCache::end_pass() { std::fill(in_use_.begin(), in_use_.end(), 0); }

}  // namespace pm
