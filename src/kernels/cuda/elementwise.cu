// The CUDA backend's activations: fast_math.h's float functions (the CPU's), one element per
// thread. Built with -fmad=false, so every multiply and add rounds as it does on the CPU.
#include "kernels/cpu/fast_math.h"
#include "kernels/cuda/device_kernels.h"

namespace pm::cuda {
namespace {

constexpr int kBlockThreads = 256;

unsigned blocks_for(int64_t n) { return static_cast<unsigned>((n + kBlockThreads - 1) / kBlockThreads); }

// core/tensor.h's float_to_bf16: to nearest even, NaN to the quiet NaN
__device__ inline uint16_t to_bf16(float x) {
  uint32_t bits = __float_as_uint(x);
  if ((bits & 0x7f800000u) == 0x7f800000u && (bits & 0x007fffffu)) return 0x7fc0;
  uint32_t rounding = 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>((bits + rounding) >> 16);
}

__device__ inline void store(float* out, uint16_t* out_bf16, int64_t i, float v) {
  if (out_bf16)
    out_bf16[i] = to_bf16(v);
  else
    out[i] = v;
}

__global__ void gelu_kernel(float* x, float* out, uint16_t* out_bf16, int64_t n, bool save_grad) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const float v = x[i];
  store(out, out_bf16, i, gelu(v));
  if (save_grad) x[i] = gelu_grad(v);
}

__global__ void gelu_backward_kernel(const float* saved, const float* grad_out, float* grad_in, int64_t n) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) grad_in[i] = grad_out[i] * saved[i];
}

__global__ void swiglu_forward_kernel(const float* hpre, float* act, uint16_t* act_bf16, int64_t rows, int64_t n) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= rows * n) return;
  const int64_t r = e / n, i = e % n;
  const float g = hpre[r * 2 * n + i], v = hpre[r * 2 * n + n + i];
  store(act, act_bf16, e, g * sigmoid_approx(g) * v);
}

__global__ void swiglu_backward_kernel(const float* hpre, const float* dact, int64_t dact_ld, float* dhpre,
                                       int64_t rows, int64_t n) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= rows * n) return;
  const int64_t r = e / n, i = e % n;
  const float d = dact[r * dact_ld + i], g = hpre[r * 2 * n + i], v = hpre[r * 2 * n + n + i];
  const float s = sigmoid_approx(g);
  // read before written: dact may be this row's second half of dhpre
  dhpre[r * 2 * n + i] = d * v * (s + g * s * (1.0f - s));
  dhpre[r * 2 * n + n + i] = d * (g * s);
}

}  // namespace

#ifndef PM_CUDA_EMULATION  // (tests/unit/cuda_emulation: the kernels run on CPU threads)
void gelu_forward(float* x, float* out, uint16_t* out_bf16, int64_t n, bool save_grad, cudaStream_t stream) {
  if (n > 0) gelu_kernel<<<blocks_for(n), kBlockThreads, 0, stream>>>(x, out, out_bf16, n, save_grad);
}

void gelu_backward_by_saved_grad(const float* saved_grad, const float* grad_out, float* grad_in, int64_t n,
                                 cudaStream_t stream) {
  if (n > 0) gelu_backward_kernel<<<blocks_for(n), kBlockThreads, 0, stream>>>(saved_grad, grad_out, grad_in, n);
}

void swiglu_forward(const float* hpre, float* act, uint16_t* act_bf16, int64_t rows, int64_t n, cudaStream_t stream) {
  if (rows * n > 0) swiglu_forward_kernel<<<blocks_for(rows * n), kBlockThreads, 0, stream>>>(hpre, act, act_bf16, rows, n);
}

void swiglu_backward(const float* hpre, const float* dact, int64_t dact_ld, float* dhpre, int64_t rows, int64_t n,
                     cudaStream_t stream) {
  if (rows * n > 0)
    swiglu_backward_kernel<<<blocks_for(rows * n), kBlockThreads, 0, stream>>>(hpre, dact, dact_ld, dhpre, rows, n);
}

#endif

}  // namespace pm::cuda
