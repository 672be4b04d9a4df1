// The emulated GPU (emulated_gpu.cpp): what its users can ask of it.
#pragma once

#include <atomic>
#include <cstdint>

// GEMM kernels launched so far (to check that work reached the GPU at all).
extern std::atomic<int64_t> g_gemm_launches;
