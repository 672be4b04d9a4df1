// The CUDA backend: the Backend table (kernels/backend.h) with the heavy arithmetic on an NVIDIA
// GPU — every GEMM (dense, prepacked, bf16) and the experts' FFNs (both GEMMs and the activation)
// — and the rest on the host's kernels. Buffers stay host memory; each GPU call copies its
// operands in and its results out (weights packed for a pass stay on the GPU). The GPU kernels
// compute the CPU kernels' bits (kernels/cuda/device_kernels.h), so a run on either backend gives
// the same results and every bit-for-bit test holds across them.
//
// Built when CMake finds nvcc (PIPEMOE_CUDA); without it, or on a machine without a GPU, asking
// for it is a clear error.
#pragma once

#include <functional>
#include <string>

#include "kernels/backend.h"

namespace pm {

// Whether this build has the CUDA backend and this machine a GPU it can use; if not, why not.
bool cuda_available(std::string* why_not);

// The CUDA backend of this process (the GPU of index local rank % GPUs); throws pm::Error (usage)
// saying why when cuda_available is false.
Backend& cuda_backend();

// For `bench gemm`: the GPU GEMM kernel alone, on operands already in device memory (op(A) M x K,
// op(B) K x N and C of 0.5s, uploaded once): each call of the returned function launches one
// product and waits for it, no copies. Throws like cuda_backend where there is no GPU.
std::function<void()> cuda_gemm_kernel_alone(Precision precision, Trans ta, Trans tb, int64_t M, int64_t N, int64_t K);

}  // namespace pm
