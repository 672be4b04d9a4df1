// Timing GEMMs for the benchmarks: calls timed one by one, and the GEMM peak of this machine as
// `bench gemm` states it (the 2048^3 product, every rank computing at once).
#pragma once

#include <functional>
#include <vector>

#include "comm/communicator.h"
#include "kernels/cpu/gemm.h"
#include "moe/moe_shape.h"

namespace pm::cli {

// Seconds per call of fn, `repeat` times after one warm-up call.
std::vector<double> time_calls(int repeat, const std::function<void()>& fn);

// The core's FMA ceiling (kernels/cpu/fma_ceiling.h) with every rank running it at once: the
// slowest rank's GFLOP/s.
double fma_ceiling_all_ranks(Communicator& comm);
// The same for AVX512_BF16's dot product (the bf16 GEMMs' ceiling); 0 without AVX512_BF16.
double bf16_dot_ceiling_all_ranks(Communicator& comm);
// And for AMX's tile product (the amx order's ceiling); 0 where AMX does not run.
double amx_ceiling_all_ranks(Communicator& comm);
// Either, or any per-thread ceiling, on every rank's GEMM threads at once.
double ceiling_all_ranks(Communicator& comm, double (*ceiling_gflops)(double seconds));

// The square product whose speed is the peak the layer's GEMM floor is measured against.
class SquareProduct {
 public:
  static constexpr int64_t kSize = 2048;
  SquareProduct();
  // GFLOP/s of the slowest rank (each rank's median of `repeat` calls after a warm-up; a barrier
  // first, so that every rank computes at once, as in the layer): the best of our GEMM and, for
  // fp32, OpenBLAS, as `bench gemm` takes its peak; bf16: our bf16 GEMM.
  double peak_gflops(Communicator& comm, Precision dtype, int repeat);

 private:
  double slowest_rank_gflops(Communicator& comm, int repeat, const std::function<void()>& fn);
  std::vector<float> a_, b_, c_;
  PackedB packed_, packed_bf16_;
};

// The six products of an expert's pass at the layer's shapes (forward u W1 and a W2, input
// gradient dy W2^T and dh W1^T, weight gradients a^T dy and u^T dh; `rows` rows, W1 `model_dim` x
// `fc1_width`, W2 `hidden` x `model_dim`), B packed once as the layer packs its weights: how fast
// the GEMM runs on these shapes, beside the square product's peak.
class ExpertProducts {
 public:
  ExpertProducts(int64_t rows, int64_t model_dim, int64_t hidden, int64_t fc1_width);
  // GFLOP/s of the six together (their FLOPs over the sum of each one's median call), on the
  // slowest rank; every rank computes at once.
  double gflops(Communicator& comm, Precision dtype, int repeat);

 private:
  struct Product {
    Trans ta = Trans::no;
    int64_t M = 0, N = 0, K = 0;
    std::vector<float> a, c;
    PackedB packed, packed_bf16;
  };
  std::vector<Product> products_;
};

}  // namespace pm::cli
