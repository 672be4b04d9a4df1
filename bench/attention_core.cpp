// Attention's core (kernels/cpu/attention.h: scores, causal softmax, P V and their backward) on the
// bundled models' shapes, one thread: milliseconds per call (the median of the rounds) and the
// multiply-adds the causal products hold (half the square's and the diagonal), as GFLOP/s.
// For old against new (the square gemm products of 2026-12-06 against the causal blocks), build it
// against each tree's libraries and run the two alternately (docs/BENCHMARKS.md, "Attention by
// causal blocks, the norms by rows side by side"):
//
//   g++ -O3 -march=native -std=c++20 -ffp-contract=off -Isrc bench/attention_core.cpp -o /tmp/attention_core
//       -Lbuild/src -lpipemoe_kernels -lpipemoe_core -lfmt -lpthread -lopenblas   (one line)
//   (or build/bench/attention_core, built with the tree)
//   build/bench/attention_core [--csv FILE]
#include <cstdio>
#include <string>
#include <vector>

#include "bench_timing.h"
#include "core/rng.h"
#include "kernels/cpu/attention.h"
using namespace pm;

namespace {

struct Shape {
  const char* name;
  int64_t B, S, heads, kv_heads, hd;
};

}  // namespace

int main(int argc, char** argv) {
  const std::string csv_path = bench::csv_path_of(argc, argv);
  // one rank's micro-batch of configs/demo.json and deepseek.json (12 sequences of 128, 4 heads of
  // 48), a longer sequence, and Llama-style grouped heads (configs/mixtral.json's 8 of 64 on 2)
  const Shape shapes[] = {{"demo / deepseek (B 12, S 128, 4 heads of 48)", 12, 128, 4, 4, 48},
                          {"S 512, 4 heads of 64", 2, 512, 4, 4, 64},
                          {"grouped: S 256, 8 query heads on 2, 64", 4, 256, 8, 2, 64}};
  constexpr int kRounds = 21;
  FILE* csv = csv_path.empty() ? nullptr : std::fopen(csv_path.c_str(), "w");
  if (csv) std::fprintf(csv, "shape,B,S,heads,kv_heads,hd,forward_ms,backward_ms,forward_gflops,backward_gflops\n");
  std::printf("%-48s %12s %12s %10s %10s\n", "attention core, one thread", "forward", "backward", "fwd GF/s",
              "bwd GF/s");
  for (const Shape& s : shapes) {
    const int64_t D = s.heads * s.hd, ld = D + 2 * s.kv_heads * s.hd, T = s.B * s.S;
    std::vector<float> qkv(T * ld), dout(T * D), probs(s.B * s.heads * s.S * s.S), out(T * D), dqkv(T * ld);
    Rng(1, 0).fill_normal(qkv.data(), T * ld, 0.0f, 1.0f);
    Rng(2, 0).fill_normal(dout.data(), T * D, 0.0f, 1.0f);
    std::vector<double> fwd, bwd;
    for (int round = 0; round <= kRounds; ++round) {  // round 0: first touch, not timed
      const double f = bench::ms_of(
          [&] { attention_forward(qkv.data(), s.B, s.S, s.heads, s.kv_heads, s.hd, probs.data(), out.data()); });
      const double b = bench::ms_of([&] {
        attention_backward(qkv.data(), probs.data(), dout.data(), s.B, s.S, s.heads, s.kv_heads, s.hd, dqkv.data());
      });
      if (round > 0) fwd.push_back(f), bwd.push_back(b);
    }
    // the causal products' multiply-adds: scores and P V over positions 0..i of each query i
    const double madds = static_cast<double>(s.B * s.heads) * s.S * (s.S + 1) / 2 * s.hd;
    const double f = bench::median(fwd), b = bench::median(bwd);
    const double fg = 2 * 2 * madds / f / 1e6, bg = 4 * 2 * madds / b / 1e6;
    std::printf("%-48s %9.3f ms %9.3f ms %10.1f %10.1f\n", s.name, f, b, fg, bg);
    if (csv)
      std::fprintf(csv, "\"%s\",%ld,%ld,%ld,%ld,%ld,%.4f,%.4f,%.1f,%.1f\n", s.name, static_cast<long>(s.B),
                   static_cast<long>(s.S), static_cast<long>(s.heads), static_cast<long>(s.kv_heads),
                   static_cast<long>(s.hd), f, b, fg, bg);
  }
  if (csv) std::fclose(csv);
}
