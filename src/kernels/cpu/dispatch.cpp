#include "kernels/cpu/dispatch.h"

#include <cstring>

#include "core/tensor.h"
#include "kernels/cpu/elementwise.h"

namespace pm {
namespace {

// fn(row) with row `row` of slots, floats or bf16 (the kernels widen bf16 as they read it).
template <typename Fn>
auto with_slot_row(RowsIn slots, int64_t row, int64_t M, Fn&& fn) {
  return slots.f32 ? fn(slots.f32 + row * M) : fn(slots.bf16 + row * M);
}

// Writes M floats into row `row` of slots (rounded to bf16 there when slots are bf16).
void store_row(const float* values, RowsOut slots, int64_t row, int64_t M) {
  if (slots.f32)
    std::memcpy(slots.f32 + row * M, values, M * sizeof(float));
  else
    floats_to_bf16(values, slots.bf16 + row * M, M);
}

}  // namespace

void dispatch_rows(const float* x, int64_t T, int64_t M, int k, const int64_t* position, RowsOut slots) {
  for (int64_t i = 0; i < T * k; ++i)
    if (position[i] >= 0) store_row(x + (i / k) * M, slots, position[i], M);
}

void combine_rows(RowsIn slots, const float* gate, int64_t T, int64_t M, int k, const int64_t* position, float* y) {
  for (int64_t t = 0; t < T; ++t) {
    float* out = y + t * M;
    std::memset(out, 0, M * sizeof(float));
    for (int j = 0; j < k; ++j) {
      int64_t pos = position[t * k + j];
      if (pos >= 0) with_slot_row(slots, pos, M, [&](auto row) { axpy(gate[t * k + j], row, out, M); });
    }
  }
}

void dispatch_rows_backward(RowsIn dslots, int64_t T, int64_t M, int k, const int64_t* position, float* dx) {
  for (int64_t t = 0; t < T; ++t)
    for (int j = 0; j < k; ++j) {
      int64_t pos = position[t * k + j];
      if (pos >= 0) with_slot_row(dslots, pos, M, [&](auto row) { axpy(1.0f, row, dx + t * M, M); });
    }
}

void combine_rows_backward_slots(const float* dy, const float* gate, int64_t T, int64_t M, int k,
                                 const int64_t* position, RowsOut dslots) {
  for (int64_t i = 0; i < T * k; ++i) {
    if (position[i] < 0) continue;
    const float* row = dy + (i / k) * M;
    const float g = gate[i];
    if (dslots.f32) {
      float* out = dslots.f32 + position[i] * M;
      for (int64_t m = 0; m < M; ++m) out[m] = g * row[m];
    } else {  // scaled and rounded in one pass
      scaled_floats_to_bf16(g, row, dslots.bf16 + position[i] * M, M);
    }
  }
}

void combine_rows_backward_gate(const float* dy, RowsIn slots, int64_t T, int64_t M, int k, const int64_t* position,
                                float* dgate) {
  for (int64_t i = 0; i < T * k; ++i)
    dgate[i] = position[i] < 0 ? 0.0f : with_slot_row(slots, position[i], M, [&](auto row) {
      return dot(dy + (i / k) * M, row, M);
    });
}

}  // namespace pm
