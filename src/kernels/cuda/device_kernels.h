// The CUDA backend's device kernels, callable from host code (kernels/cuda/cuda_backend.cu).
//
// Every kernel computes the bits of the CPU kernel it stands for (kernels/cpu): the GEMM runs each
// element's multiply-add chain over k in order, as kernels/cpu/gemm.h defines it (and, for bf16,
// in the pair order of vdpbf16ps); the activations are fast_math.h's float functions, compiled
// with -fmad=false. So a run on the GPU gives the CPU's results, bit for bit, and pipelining
// changes nothing on either.
#pragma once

#include <cuda_runtime.h>  // (a fake one in tests/cuda_emulation)

#include <cstdint>

namespace pm::cuda {

// C[M, N] = (beta = 1 ? C : bias or 0) + op(A)[M, K] op(B)[K, N], all pointers in device memory.
// op(A) = A[M, K] (lda) or, trans_a, the transpose of A[K, M]; A as floats or as bf16 bits
// (a_bf16). bf16: both operands rounded to bf16, the depth taken in pair order (1, 0, 3, 2, ...;
// an odd K padded with a zero pair member).
struct GemmCall {
  int64_t M = 0, N = 0, K = 0;
  bool trans_a = false, trans_b = false, bf16 = false;
  const float* a = nullptr;
  const uint16_t* a_bf16 = nullptr;
  int64_t lda = 0;
  const float* b = nullptr;
  int64_t ldb = 0;
  float beta = 0.0f;
  const float* bias = nullptr;  // [N], only with beta = 0
  float* c = nullptr;
  int64_t ldc = 0;
};
void gemm(const GemmCall& call, cudaStream_t stream);

// GeLU over n values: out = GeLU(x); with grad, x is overwritten by GeLU'(x) (the CPU's
// gelu_forward_tile with save_grad) — out may be bf16 bits (out_bf16) instead of floats.
void gelu_forward(float* x, float* out, uint16_t* out_bf16, int64_t n, bool save_grad, cudaStream_t stream);
// grad_in = grad_out * saved_grad (gelu_backward_by_saved_grad); grad_in may alias grad_out.
void gelu_backward_by_saved_grad(const float* saved_grad, const float* grad_out, float* grad_in, int64_t n,
                                 cudaStream_t stream);
// rows of hpre [g | v] (2n each) -> act[rows, n] = SiLU(g) * v, floats or bf16 bits.
void swiglu_forward(const float* hpre, float* act, uint16_t* act_bf16, int64_t rows, int64_t n, cudaStream_t stream);
// dhpre[rows, 2n] from dact (row stride dact_ld; may be dhpre + n with stride 2n) and hpre.
void swiglu_backward(const float* hpre, const float* dact, int64_t dact_ld, float* dhpre, int64_t rows, int64_t n,
                     cudaStream_t stream);

}  // namespace pm::cuda
