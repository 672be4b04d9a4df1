// Seeded random numbers, reproducible across runs, ranks and machines.
//
// Each stream is keyed by (seed, stream id): what a rank or a tensor draws never depends on what
// was drawn before it elsewhere, so the same seed gives the same weights whatever the rank count.
#pragma once

#include <cstdint>

namespace pm {

// Stream ids are built from small integers: stream_id(kind, a, b) keeps kinds of tensors apart.
constexpr uint64_t stream_id(uint64_t kind, uint64_t a = 0, uint64_t b = 0) {
  return (kind << 48) ^ (a << 24) ^ b;
}

class Rng {
 public:
  Rng(uint64_t seed, uint64_t stream);
  uint64_t next_u64();
  double uniform();  // [0, 1)
  double normal();   // standard normal (Box-Muller)
  void fill_uniform(float* out, int64_t n, float low, float high);
  void fill_normal(float* out, int64_t n, float mean, float stddev);

 private:
  uint64_t state_;
  bool has_spare_ = false;
  double spare_ = 0;
};

}  // namespace pm
