// Backend::linear's own form (kernels/backend.h): the rows filled with the bias, then the product
// with beta 1. A backend may start each chain from the bias instead (the same bits: the CPU's).
#include "kernels/backend.h"

namespace pm {

void Backend::linear(Precision precision, int64_t M, int64_t N, int64_t K, RowsIn x, const float* w,
                     const PackedMatrix* packed, const float* bias, float* y) {
  if (packed && x.bf16) {  // gemm_prepacked reads floats: bf16 values widen exactly
    Buffer<float> wide(M * K, 0.0f, BackendAllocator<float>(*this));
    copy_rows(x, wide.data(), K, {{0, 0, M}});
    return linear(precision, M, N, K, wide.data(), w, packed, bias, y);
  }
  if (bias) fill_rows(y, M, N, bias);
  const float beta = bias ? 1.0f : 0.0f;
  if (packed)
    gemm_prepacked(Trans::no, M, x.f32, K, *packed, beta, y, N);
  else if (x.bf16)
    gemm_bf16(Trans::no, Trans::no, M, N, K, x, K, w, N, beta, y, N);
  else
    gemm_as(precision, Trans::no, Trans::no, M, N, K, x.f32, K, w, N, beta, y, N);
}

}  // namespace pm
