// Vectors of 16 floats as GCC vector types, for the CPU kernels' elementwise loops (elementwise.cpp,
// dispatch.cpp): one AVX-512 register each where the CPU has it, two or four halves where it has
// not (the same operations per lane either way). They pass between inlined functions only: the
// files that use them build with -Wno-psabi (src/CMakeLists.txt), GCC's note that such a vector's
// calling convention differs without AVX-512 not applying to them.
#pragma once

#include <cstdint>
#include <cstring>

#include "core/tensor.h"

namespace pm::lanes {

typedef float Lanes __attribute__((vector_size(16 * sizeof(float))));
typedef uint32_t LaneBits __attribute__((vector_size(16 * sizeof(uint32_t))));
typedef uint16_t LaneBf16 __attribute__((vector_size(16 * sizeof(uint16_t))));

// 16 values from p: floats, or bf16 widened to floats (exactly).
[[gnu::always_inline]] inline Lanes load16(const float* p) {
  Lanes v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
[[gnu::always_inline]] inline Lanes load16(const uint16_t* p) {
  LaneBf16 h;
  std::memcpy(&h, p, sizeof(h));
  const LaneBits bits = __builtin_convertvector(h, LaneBits) << 16;
  Lanes v;
  std::memcpy(&v, &bits, sizeof(v));
  return v;
}

// One value: a float as it is, a bf16 value widened (exactly).
inline float value_of(float v) { return v; }
inline float value_of(uint16_t v) { return bf16_to_float(v); }

}  // namespace pm::lanes
