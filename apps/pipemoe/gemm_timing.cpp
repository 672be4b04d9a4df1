#include "apps/pipemoe/gemm_timing.h"

#include <thread>

#include "core/clock.h"
#include "core/rng.h"
#include "core/stats.h"
#include "kernels/cpu/blas.h"
#include "kernels/cpu/fma_ceiling.h"
#include "kernels/cpu/thread_pool.h"

namespace pm::cli {

std::vector<double> time_calls(int repeat, const std::function<void()>& fn) {
  fn();
  std::vector<double> s;
  for (int i = 0; i < repeat; ++i) {
    Stopwatch w;
    fn();
    s.push_back(w.elapsed_s());
  }
  return s;
}

double ceiling_all_ranks(Communicator& comm, double (*ceiling_gflops)(double seconds)) {
  comm.barrier();
  // on as many threads as the rank's GEMMs use, all at once (plain threads: the pool's idle
  // workers, waiting for work, took a share of the cores and the sum came out 20-35% low)
  std::vector<double> per_thread(compute_threads(), 0.0);
  std::vector<std::thread> others;
  for (std::size_t t = 1; t < per_thread.size(); ++t)
    others.emplace_back([&, t] { per_thread[t] = ceiling_gflops(0.2); });
  per_thread[0] = ceiling_gflops(0.2);
  for (std::thread& t : others) t.join();
  double mine = 0;
  for (double g : per_thread) mine += g;
  return -comm.allreduce_scalar(-mine, ReduceOp::max);
}

double fma_ceiling_all_ranks(Communicator& comm) { return ceiling_all_ranks(comm, fma_ceiling_gflops); }

double bf16_dot_ceiling_all_ranks(Communicator& comm) { return ceiling_all_ranks(comm, bf16_dot_ceiling_gflops); }

double amx_ceiling_all_ranks(Communicator& comm) { return ceiling_all_ranks(comm, amx_ceiling_gflops); }

SquareProduct::SquareProduct() : a_(kSize * kSize), b_(kSize * kSize), c_(kSize * kSize) {
  Rng(1, 1).fill_normal(a_.data(), a_.size(), 0, 1);
  Rng(1, 2).fill_normal(b_.data(), b_.size(), 0, 1);
  pack_b(Trans::no, kSize, kSize, b_.data(), kSize, packed_);
  pack_b_bf16(Trans::no, kSize, kSize, b_.data(), kSize, packed_bf16_);
}

double SquareProduct::slowest_rank_gflops(Communicator& comm, int repeat, const std::function<void()>& fn) {
  comm.barrier();
  std::vector<double> gflops;
  for (double s : time_calls(repeat, fn)) gflops.push_back(2.0 * kSize * kSize * kSize / s / 1e9);
  return -comm.allreduce_scalar(-summarize(gflops).median, ReduceOp::max);
}

double SquareProduct::peak_gflops(Communicator& comm, Precision dtype, int repeat) {
  const PackedB& packed = dtype == Precision::bf16 ? packed_bf16_ : packed_;
  double best = slowest_rank_gflops(comm, repeat, [&] {
    gemm_packed(Trans::no, kSize, a_.data(), kSize, packed, 0.0f, c_.data(), kSize);
  });
  if (dtype == Precision::fp32)
    best = std::max(best, slowest_rank_gflops(comm, repeat, [&] {
                      openblas_gemm(Trans::no, Trans::no, kSize, kSize, kSize, a_.data(), kSize, b_.data(), kSize, 0.0f,
                                    c_.data(), kSize);
                    }));
  return best;
}

ExpertProducts::ExpertProducts(int64_t rows, int64_t model_dim, int64_t hidden, int64_t fc1_width) {
  const int64_t R = rows, M = model_dim, H = hidden, H1 = fc1_width;
  struct Shape {
    Trans ta;
    int64_t M, N, K;
  };
  // op(A), M, N, K of each: the weight gradients' A is the saved rows, transposed
  const Shape shapes[] = {{Trans::no, R, H1, M}, {Trans::no, R, M, H},  {Trans::no, R, H, M},
                          {Trans::no, R, M, H1}, {Trans::yes, H, M, R}, {Trans::yes, M, H1, R}};
  uint64_t stream = 10;
  for (const Shape& shape : shapes) {
    Product p;
    p.ta = shape.ta, p.M = shape.M, p.N = shape.N, p.K = shape.K;
    p.a.resize(p.M * p.K);
    p.c.resize(p.M * p.N);
    std::vector<float> b(p.K * p.N);
    Rng(1, stream++).fill_normal(p.a.data(), p.a.size(), 0, 1);
    Rng(1, stream++).fill_normal(b.data(), b.size(), 0, 1);
    pack_b(Trans::no, p.K, p.N, b.data(), p.N, p.packed);
    pack_b_bf16(Trans::no, p.K, p.N, b.data(), p.N, p.packed_bf16);
    products_.push_back(std::move(p));
  }
}

double ExpertProducts::gflops(Communicator& comm, Precision dtype, int repeat) {
  double flops = 0, seconds = 0;
  for (Product& p : products_) {
    const PackedB& packed = dtype == Precision::bf16 ? p.packed_bf16 : p.packed;
    const int64_t lda = p.ta == Trans::no ? p.K : p.M;
    comm.barrier();
    seconds += summarize(time_calls(repeat, [&] {
                 gemm_packed(p.ta, p.M, p.a.data(), lda, packed, 0.0f, p.c.data(), p.N);
               })).median;
    flops += 2.0 * p.M * p.N * p.K;
  }
  return -comm.allreduce_scalar(-flops / seconds / 1e9, ReduceOp::max);
}

}  // namespace pm::cli
