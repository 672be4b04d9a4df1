// The CUDA backend on the emulated GPU (emulated_gpu.cpp: its kernels as coroutine thread blocks,
// its host code on a fake CUDA runtime): the CPU backend's bits in every case of
// tests/unit/cuda_backend_cases.h (GEMMs, experts, the MoE layer, training, inference), work
// that reaches the GPU, and no misuse of the runtime (a kernel handed host memory, a copy the
// wrong way). What only a GPU can check, nvcc's code (-fmad=false, IEEE division), waits for one:
// tests/unit/test_cuda_backend.cpp runs the same cases there.
#include <gtest/gtest.h>

#include <string>

#include <cuda_runtime.h>  // the fake

#include "cuda_emulation/emulated_gpu.h"

// The cases of the GPU test, on the emulated GPU.
#define PM_CUDA_TEST_SUITE CudaEmulated
#include "unit/cuda_backend_cases.h"

// The NCCL transport's cases on the fake NCCL (ranks as threads, one emulated GPU for all).
#define PM_NCCL_TEST_SUITE NcclEmulated
#define PM_NCCL_MAX_RANKS() 4
#define PM_NCCL_NO_MISUSE() EXPECT_EQ(fake_cuda::memory().errors, 0)
#include "unit/nccl_transport_cases.h"

TEST(CudaEmulated, TheLayerRunsItsExpertsOnTheGpu) {
  // (the cases above compare bits; this checks that the GPU did the work)
  pm::MoeShape shape{48, 16, 24, 4, 2, 1.25, 2};
  const int64_t before = g_gemm_launches.load();
  pm::cuda_cases::run_layer_on(pm::cuda_backend(), "ep", shape);
  // per rank: forward fc1 and fc2, backward two and the two weight gradients, per expert and chunk
  EXPECT_GE(g_gemm_launches.load() - before, 2 * 6);
}

TEST(CudaEmulated, TheKernelAloneRunsOnDeviceMemory) {
  // bench gemm's gpu-kernel rows: one launch per call, every operand device memory (a host
  // pointer would count as a misuse, checked below)
  for (pm::Precision precision : {pm::Precision::fp32, pm::Precision::bf16}) {
    const std::function<void()> run =
        pm::cuda_gemm_kernel_alone(precision, pm::Trans::yes, pm::Trans::no, 33, 70, 9);
    const int64_t before = g_gemm_launches.load();
    run();
    run();
    EXPECT_EQ(g_gemm_launches.load() - before, 2);
  }
}

TEST(CudaEmulated, LargeBuffersArePinnedOnceAndReused) {
  // what GPU calls copy in and out: pinned from 1 MB (cached: cudaMallocHost is slow), smaller
  // buffers the host's
  pm::Backend& gpu = pm::cuda_backend();
  const long before = fake_cuda::memory().pinned_allocations;
  for (int round = 0; round < 3; ++round) {
    auto* large = static_cast<float*>(gpu.allocate(3 << 20));
    large[0] = 1.0f, large[(3 << 18) - 1] = 2.0f;  // whole and writable
    void* small = gpu.allocate(1000);
    gpu.deallocate(small);
    gpu.deallocate(large);
  }
  EXPECT_EQ(fake_cuda::memory().pinned_allocations - before, 1);
}

TEST(CudaEmulated, NoMisuseOfTheRuntime) {
  // after the cases above (gtest runs a file's tests in order): no copy went the wrong way, no
  // NCCL call was handed host memory or left unmatched
  EXPECT_EQ(fake_cuda::memory().errors, 0);
}
