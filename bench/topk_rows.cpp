// The router's top-k (kernels/cpu/elementwise.cpp topk_rows) two ways, alternating in one process:
// 16 rows at a time in AVX-512 lanes (the default on AVX-512) and one row at a time by insertion
// (what runs with the GEMM's AVX2 or scalar kernels: force_gemm_isa). 2048 rows of random scores,
// router shapes from GShard's 8 experts to DeepSeek-V3's 256, top-2 and top-8. Each round times
// both once; prints the median of each and of the per-round ratios, and checks that both chose the
// same experts in the same order with the same values (docs/BENCHMARKS.md, "The router's top-k in
// vector lanes").
//
//   (built with the tree: build/bench/topk_rows)
//   build/bench/topk_rows [ROUNDS=21]
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "bench_timing.h"
#include "core/rng.h"
#include "kernels/cpu/elementwise.h"
#include "kernels/cpu/gemm.h"
using namespace pm;
using bench::median;
using bench::ms_of;

int main(int argc, char** argv) {
  const int rounds = argc > 1 ? std::atoi(argv[1]) : 21;
  if (gemm_isa() != "avx512") {
    std::printf("topk_rows: this CPU runs no AVX-512: one way only, nothing to compare\n");
    return 0;
  }
  const int64_t rows = 2048;
  std::printf("top-k of %ld rows of random scores, medians of %d rounds, one thread\n", rows, rounds);
  std::printf("experts  k   lanes ms  insertion ms  lanes/insertion  ns per row (lanes)  same\n");
  for (int experts : {8, 64, 256})
    for (int k : {2, 8}) {
      if (k > experts) continue;
      std::vector<float> scores(rows * experts);
      Rng rng(static_cast<uint64_t>(experts * 10 + k), 0);
      rng.fill_uniform(scores.data(), rows * experts, 0.0f, 1.0f);
      std::vector<int32_t> index[2] = {std::vector<int32_t>(rows * k), std::vector<int32_t>(rows * k)};
      std::vector<float> value[2] = {std::vector<float>(rows * k), std::vector<float>(rows * k)};
      std::vector<double> ms[2], ratio;
      for (int r = 0; r < rounds; ++r) {
        for (int way = 0; way < 2; ++way) {
          force_gemm_isa(way == 0 ? "avx512" : "avx2");
          ms[way].push_back(ms_of([&] { topk_rows(scores.data(), rows, experts, k, index[way].data(), value[way].data()); }));
        }
        ratio.push_back(ms[0].back() / ms[1].back());
      }
      force_gemm_isa("");
      const bool same = index[0] == index[1] && std::memcmp(value[0].data(), value[1].data(), value[0].size() * 4) == 0;
      std::printf("%7d %2d %10.3f %13.3f %16.3f %19.0f  %s\n", experts, k, median(ms[0]), median(ms[1]), median(ratio),
                  median(ms[0]) * 1e6 / rows, same ? "yes" : "NO");
    }
}
