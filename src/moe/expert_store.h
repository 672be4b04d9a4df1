// Expert offloading for memory-limited inference: where a layer's routed experts live when they
// are not resident, and the bounded cache of resident ones.
//
// An ExpertStore hands out pointers to one local expert's weights in slow memory: host memory
// (HostExpertStore) or the checkpoint's safetensors file mapped into memory (model/). An
// ExpertCache keeps at most `slots` experts resident, in the form the expert GEMMs read (packed
// by the backend): loading one is packing it from the store's pointers, the copy a GPU would do
// over PCIe. It evicts the least recently used expert not needed by the pass in flight: decoding
// routes the next tokens much like the last ones, so recently used experts are the likeliest to
// be needed again, and LRU needs no knowledge of the future. Three ways to run:
//   resident  every expert loaded once (the cache holds them all; the baseline);
//   blocking  an expert is loaded when its GEMM needs it, on the compute lane;
//   prefetch  the experts a pass needs are loaded on the copy lane as soon as the routing is known
//             (with ScMoE one block early), while the dense work goes on.
#pragma once

#include <cstdint>
#include <list>
#include <memory>
#include <string>
#include <vector>

#include "kernels/backend.h"

namespace pm {

struct ExpertWeightsView {
  const float* w1;  // [M, H1] (H1 = fc1_width: H, or 2H for SwiGLU)
  const float* b1;  // [H1]
  const float* w2;  // [H, M]
  const float* b2;  // [M]
};

class ExpertStore {
 public:
  virtual ~ExpertStore() = default;
  virtual int local_experts() const = 0;
  virtual ExpertWeightsView expert(int local_expert) const = 0;
  // After an expert was loaded: slow memory may let the pages go (a mapped file drops them).
  virtual void release(int local_expert) const {}
  virtual std::string where() const = 0;  // "host memory", "disk (FILE, mapped)"
};

// The experts in host memory: copies of w1 [El, M, H1], b1 [El, H1], w2 [El, H, M], b2 [El, M].
class HostExpertStore final : public ExpertStore {
 public:
  HostExpertStore(const float* w1, const float* b1, const float* w2, const float* b2, int local_experts, int64_t M,
                  int64_t H, int64_t H1);
  int local_experts() const override { return experts_; }
  ExpertWeightsView expert(int le) const override;
  std::string where() const override { return "host memory"; }

 private:
  int experts_;
  int64_t M_, H_, H1_;
  std::vector<float> w1_, b1_, w2_, b2_;
};

enum class OffloadMode { resident, blocking, prefetch };
OffloadMode parse_offload_mode(const std::string& text);  // usage error for an unknown one
const char* offload_mode_name(OffloadMode mode);

class ExpertCache {
 public:
  ExpertCache(std::shared_ptr<const ExpertStore> store, Backend& backend, int slots, int64_t M, int64_t H,
              Activation activation, Precision precision);

  // Makes the experts resident, loading those that are not into the least recently used slot.
  // pin: a prefetch for the pass in flight: these stay until end_pass(), and what does not fit
  // beside the pinned ones is left for later; unpinned (an expert needed right now): may take any
  // slot, a pinned one last (it is loaded again if the pass still needs it). Returns the seconds
  // spent loading.
  double load(const std::vector<int>& local_experts, bool pin);
  const PackedExpert& packed(int local_expert) const;  // must be resident
  void end_pass();

  int slots() const { return static_cast<int>(slots_.size()); }
  int64_t bytes_per_expert() const { return bytes_per_expert_; }
  int64_t peak_resident_bytes() const { return peak_resident_ * bytes_per_expert_; }
  int64_t loads() const { return loads_; }
  double load_s() const { return load_s_; }
  const ExpertStore& store() const { return *store_; }

 private:
  int slot_to_fill(const std::vector<char>& wanted, bool pin);

  std::shared_ptr<const ExpertStore> store_;
  Backend& backend_;
  int64_t M_, H_, bytes_per_expert_;
  std::vector<std::unique_ptr<PackedExpert>> slots_;
  std::vector<int> held_;          // [slots] the local expert in each slot, -1: empty
  std::vector<int> slot_of_;       // [local experts] its slot, -1: not resident
  std::list<int> recent_;          // slots, most recently used first
  std::vector<char> in_use_;       // [local experts] needed by the pass in flight
  int peak_resident_ = 0;
  int64_t loads_ = 0;
  double load_s_ = 0;
};

}  // namespace pm
