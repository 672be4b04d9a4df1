#include "kernels/cpu/dispatch.h"

#include <cstring>

#include "kernels/cpu/elementwise.h"

namespace pm {

void dispatch_rows(const float* x, int64_t T, int64_t M, int k, const int64_t* position, float* slots) {
  for (int64_t i = 0; i < T * k; ++i)
    if (position[i] >= 0) std::memcpy(slots + position[i] * M, x + (i / k) * M, M * sizeof(float));
}

void combine_rows(const float* slots, const float* gate, int64_t T, int64_t M, int k,
                  const int64_t* position, float* y) {
  for (int64_t t = 0; t < T; ++t) {
    float* out = y + t * M;
    std::memset(out, 0, M * sizeof(float));
    for (int j = 0; j < k; ++j) {
      int64_t pos = position[t * k + j];
      if (pos >= 0) axpy(gate[t * k + j], slots + pos * M, out, M);
    }
  }
}

void dispatch_rows_backward(const float* dslots, int64_t T, int64_t M, int k, const int64_t* position,
                            float* dx) {
  for (int64_t t = 0; t < T; ++t)
    for (int j = 0; j < k; ++j) {
      int64_t pos = position[t * k + j];
      if (pos >= 0) axpy(1.0f, dslots + pos * M, dx + t * M, M);
    }
}

void combine_rows_backward_slots(const float* dy, const float* gate, int64_t T, int64_t M, int k,
                                 const int64_t* position, float* dslots) {
  for (int64_t i = 0; i < T * k; ++i) {
    if (position[i] < 0) continue;
    const float* row = dy + (i / k) * M;
    float* out = dslots + position[i] * M;
    for (int64_t m = 0; m < M; ++m) out[m] = gate[i] * row[m];
  }
}

void combine_rows_backward_gate(const float* dy, const float* slots, int64_t T, int64_t M, int k,
                                const int64_t* position, float* dgate) {
  for (int64_t i = 0; i < T * k; ++i)
    dgate[i] = position[i] < 0 ? 0.0f : dot(dy + (i / k) * M, slots + position[i] * M, M);
}

}  // namespace pm
