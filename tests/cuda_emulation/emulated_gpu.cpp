// An emulated GPU: the CUDA backend's own code, run without a GPU: kernels/cuda/*.cu compiled as C++ with each
// thread block's threads as coroutines (__syncthreads ends a round of them; __shared__ memory is a
// static array, one per OS thread: blocks run one after another), and the backend's host code
// (kernels/cuda/cuda_backend.cpp, device_memory.cpp) on a fake CUDA runtime
// (fake_cuda/cuda_runtime.h), and the NCCL transport (comm/nccl_communicator.cpp) on a fake NCCL
// (fake_nccl/nccl.h). Linked into the emulation tests (test_cuda_emulated.cpp) and into
// build/pipemoe_emulated_gpu, the CLI on this emulated GPU (tests/cli/test_emulated_gpu_cli.py).
// A kernel handed host memory counts as a misuse of the runtime (fake_cuda::memory().errors) and
// is reported on stderr.
#include <ucontext.h>

#include <atomic>
#include <cstdio>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <stdexcept>
#include <vector>

#include <cuda_runtime.h>  // the fake

#include "cuda_emulation/emulated_gpu.h"

// ---- the CUDA dialect on the CPU --------------------------------------------------------------
// A block's threads are coroutines (ucontext) of the calling thread: each runs until its next
// __syncthreads, then the next one; a round of all of them is one barrier phase. Deterministic,
// and thousands of times cheaper than an OS thread per CUDA thread.
struct EmulatedDim3 {
  unsigned x = 0, y = 0, z = 0;
};
// (per OS thread: ranks run as threads, each its own kernels)
thread_local EmulatedDim3 threadIdx, blockIdx, blockDim{256, 1, 1};

namespace emulation {
struct Block {
  ucontext_t scheduler;
  std::vector<ucontext_t> threads;
  std::vector<std::vector<char>>* stacks = nullptr;
  std::vector<char> done;
  unsigned current = 0;
  const std::function<void()>* kernel = nullptr;
};
thread_local Block* g_block = nullptr;

void thread_entry(int t) {
  threadIdx = {static_cast<unsigned>(t), 0, 0};
  (*g_block->kernel)();
  g_block->done[t] = 1;  // returning resumes the scheduler (uc_link)
}
}  // namespace emulation

inline void __syncthreads() {
  emulation::Block& b = *emulation::g_block;
  swapcontext(&b.threads[b.current], &b.scheduler);
}
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline float __uint_as_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint32_t __float_as_uint(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
struct alignas(16) float4 {  // (CUDA's vector type: 16-byte loads of shared memory)
  float x, y, z, w;
};
#define __global__
#define __device__
#define __shared__ static thread_local
#define __launch_bounds__(n)

#include "kernels/cuda/elementwise.cu"
#include "kernels/cuda/gemm.cu"

namespace emulation {
// (getcontext and swapcontext return twice: kept out of the loops over blocks)
void start_thread(Block& block, unsigned t) {
  ucontext_t& c = block.threads[t];
  getcontext(&c);
  c.uc_stack.ss_sp = (*block.stacks)[t].data();
  c.uc_stack.ss_size = (*block.stacks)[t].size();
  c.uc_link = &block.scheduler;
  makecontext(&c, reinterpret_cast<void (*)()>(thread_entry), 1, static_cast<int>(t));
}

// Every thread on to its next __syncthreads or its end; how many have ended.
unsigned run_round(Block& block) {
  unsigned finished = 0;
  for (unsigned t = 0; t < block.threads.size(); ++t) {
    block.current = t;
    threadIdx = {t, 0, 0};
    swapcontext(&block.scheduler, &block.threads[t]);
    finished += block.done[t];
  }
  return finished;
}
}  // namespace emulation

// Runs `kernel` on a grid of blocks x threads, block after block.
void run_grid(unsigned blocks_x, unsigned blocks_y, unsigned threads, const std::function<void()>& kernel) {
  using emulation::Block;
  blockDim = {threads, 1, 1};
  Block block;
  block.kernel = &kernel;
  block.threads.resize(threads);
  // the coroutines' stacks, kept for the OS thread's next launch (64 KB each: allocating and
  // zeroing 16 MB per launch was a large share of the emulation's time)
  thread_local std::vector<std::vector<char>> stacks;
  while (stacks.size() < threads) stacks.emplace_back(64 * 1024);
  block.stacks = &stacks;
  emulation::g_block = &block;
  for (unsigned by = 0; by < blocks_y; ++by)
    for (unsigned bx = 0; bx < blocks_x; ++bx) {
      blockIdx = {bx, by, 0};
      block.done.assign(threads, 0);
      for (unsigned t = 0; t < threads; ++t) emulation::start_thread(block, t);
      for (;;) {
        const unsigned finished = emulation::run_round(block);
        if (finished == threads) break;
        // a barrier that some threads skip would hang a GPU
        if (finished != 0) throw std::logic_error("a __syncthreads that not every thread of the block reaches");
      }
    }
  emulation::g_block = nullptr;
}

std::atomic<int64_t> g_gemm_launches{0};  // (emulated_gpu.h)

// Every pointer a kernel is handed must be device memory.
void expect_device(const void* p, std::size_t bytes, const char* what) {
  if (p != nullptr && fake_cuda::device_memory_holds(p, bytes)) return;
  std::fprintf(stderr, "emulated GPU: %s is not device memory\n", what);
  fake_cuda::misuse();
}

namespace pm::cuda {

void gemm(const GemmCall& g, cudaStream_t) {
  if (g.M == 0 || g.N == 0) return;
  ++g_gemm_launches;
  const int64_t a_rows = g.trans_a ? g.K : g.M, a_cols = g.trans_a ? g.M : g.K;
  const int64_t b_rows = g.trans_b ? g.N : g.K, b_cols = g.trans_b ? g.K : g.N;
  if (a_rows > 0) {
    if (g.a_bf16)
      expect_device(g.a_bf16, ((a_rows - 1) * g.lda + a_cols) * 2, "A (bf16)");
    else
      expect_device(g.a, ((a_rows - 1) * g.lda + a_cols) * 4, "A");
  }
  if (b_rows > 0 && b_cols > 0) expect_device(g.b, ((b_rows - 1) * g.ldb + b_cols) * 4, "B");
  if (g.bias) expect_device(g.bias, g.N * 4, "bias");
  expect_device(g.c, ((g.M - 1) * g.ldc + g.N) * 4, "C");
  // a GPU of 3 multiprocessors: the tests' small products reach both tilings
  const int tile = tile_of(g, 3);
  run_grid(static_cast<unsigned>((g.N + tile - 1) / tile), static_cast<unsigned>((g.M + tile - 1) / tile), kThreads, [&] {
    if (tile == 128)
      gemm_kernel<128, 8>(g);
    else
      gemm_kernel<64, 16>(g);
  });
}

void gelu_forward(float* x, float* out, uint16_t* out_bf16, int64_t n, bool save_grad, cudaStream_t) {
  if (n == 0) return;
  expect_device(x, n * 4, "GeLU input");
  if (out_bf16)
    expect_device(out_bf16, n * 2, "GeLU output (bf16)");
  else
    expect_device(out, n * 4, "GeLU output");
  run_grid(blocks_for(n), 1, kBlockThreads, [&] { gelu_kernel(x, out, out_bf16, n, save_grad); });
}

void gelu_backward_by_saved_grad(const float* saved_grad, const float* grad_out, float* grad_in, int64_t n,
                                 cudaStream_t) {
  if (n == 0) return;
  expect_device(saved_grad, n * 4, "GeLU' saved");
  expect_device(grad_out, n * 4, "GeLU' grad_out");
  expect_device(grad_in, n * 4, "GeLU' grad_in");
  run_grid(blocks_for(n), 1, kBlockThreads, [&] { gelu_backward_kernel(saved_grad, grad_out, grad_in, n); });
}

void swiglu_forward(const float* hpre, float* act, uint16_t* act_bf16, int64_t rows, int64_t n, cudaStream_t) {
  if (rows * n == 0) return;
  expect_device(hpre, rows * 2 * n * 4, "SwiGLU input");
  if (act_bf16)
    expect_device(act_bf16, rows * n * 2, "SwiGLU output (bf16)");
  else
    expect_device(act, rows * n * 4, "SwiGLU output");
  run_grid(blocks_for(rows * n), 1, kBlockThreads, [&] { swiglu_forward_kernel(hpre, act, act_bf16, rows, n); });
}

void swiglu_backward(const float* hpre, const float* dact, int64_t dact_ld, float* dhpre, int64_t rows, int64_t n,
                     cudaStream_t) {
  if (rows * n == 0) return;
  expect_device(hpre, rows * 2 * n * 4, "SwiGLU' input");
  expect_device(dact, ((rows - 1) * dact_ld + n) * 4, "SwiGLU' dact");
  expect_device(dhpre, rows * 2 * n * 4, "SwiGLU' output");
  run_grid(blocks_for(rows * n), 1, kBlockThreads,
           [&] { swiglu_backward_kernel(hpre, dact, dact_ld, dhpre, rows, n); });
}

}  // namespace pm::cuda

// The backend itself, on the fake runtime (its cuda_available and cuda_backend stand in for the
// library's, which this test does not link).
#include "kernels/cuda/device_memory.cpp"
#include "kernels/cuda/cuda_backend.cpp"

// The NCCL transport on the fake NCCL (fake_nccl/nccl.h: ranks as threads), standing in for the
// library's in the same way.
#undef PIPEMOE_HAVE_NCCL
#define PIPEMOE_HAVE_NCCL 1
#include "comm/nccl_communicator.cpp"

