#include "core/rng.h"

#include <cmath>

namespace pm {
namespace {

// splitmix64: a well-mixed 64-bit step, good enough for weights and test data.
uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

}  // namespace

Rng::Rng(uint64_t seed, uint64_t stream) : state_(mix64(seed + 0x9e3779b97f4a7c15ULL) ^ mix64(~stream)) {}

uint64_t Rng::next_u64() {
  state_ += 0x9e3779b97f4a7c15ULL;
  return mix64(state_);
}

double Rng::uniform() { return static_cast<double>(next_u64() >> 11) * 0x1.0p-53; }

double Rng::normal() {
  if (has_spare_) {
    has_spare_ = false;
    return spare_;
  }
  double u1 = uniform(), u2 = uniform();
  if (u1 < 1e-300) u1 = 1e-300;
  double radius = std::sqrt(-2.0 * std::log(u1));
  double angle = 2.0 * M_PI * u2;
  spare_ = radius * std::sin(angle);
  has_spare_ = true;
  return radius * std::cos(angle);
}

void Rng::fill_uniform(float* out, int64_t n, float low, float high) {
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<float>(low + (high - low) * uniform());
}

void Rng::fill_normal(float* out, int64_t n, float mean, float stddev) {
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<float>(mean + stddev * normal());
}

}  // namespace pm
