// The backbone's norms (kernels/cpu/layernorm.h: LayerNorm and RMSNorm, forward and backward) on
// one rank's tokens of the bundled models (12 sequences of 128, 192 values) and of a wider model,
// one thread: milliseconds per call, the median of the rounds. For old against new (a row at a
// time, 2026-12-06, against 8 rows side by side), build it against each tree's libraries and run
// the two alternately (docs/BENCHMARKS.md, "Attention by causal blocks, the norms by rows side by
// side"):
//
//   g++ -O3 -march=native -std=c++20 -ffp-contract=off -Isrc bench/norm_rows.cpp -o /tmp/norm_rows
//       -Lbuild/src -lpipemoe_kernels -lpipemoe_core -lfmt -lpthread -lopenblas   (one line)
//   (or build/bench/norm_rows, built with the tree)
//   build/bench/norm_rows [--csv FILE]
#include <cstdio>
#include <string>
#include <vector>

#include "bench_timing.h"
#include "core/rng.h"
#include "kernels/cpu/layernorm.h"
using namespace pm;

int main(int argc, char** argv) {
  const std::string csv_path = bench::csv_path_of(argc, argv);
  struct Shape {
    int64_t rows, D;
  };
  const Shape shapes[] = {{1536, 192}, {2048, 512}};
  constexpr int kRounds = 21;
  FILE* csv = csv_path.empty() ? nullptr : std::fopen(csv_path.c_str(), "w");
  if (csv) std::fprintf(csv, "rows,D,layernorm_fwd_ms,layernorm_bwd_ms,rmsnorm_fwd_ms,rmsnorm_bwd_ms\n");
  std::printf("%-14s %14s %14s %14s %14s\n", "rows x D", "LayerNorm fwd", "LayerNorm bwd", "RMSNorm fwd", "RMSNorm bwd");
  for (const Shape& s : shapes) {
    const int64_t n = s.rows * s.D;
    std::vector<float> x(n), dy(n), y(n), dx(n), g(s.D), b(s.D), dg(s.D), db(s.D), mean(s.rows), rstd(s.rows);
    Rng(1, 0).fill_normal(x.data(), n, 0.5f, 2.0f);
    Rng(2, 0).fill_normal(dy.data(), n, 0.0f, 1.0f);
    Rng(3, 0).fill_normal(g.data(), s.D, 1.0f, 0.1f);
    std::vector<double> t[4];
    for (int round = 0; round <= kRounds; ++round) {  // round 0: first touch, not timed
      const double ms[4] = {
          bench::ms_of([&] {
            layernorm_forward(x.data(), g.data(), b.data(), s.rows, s.D, 1e-5f, y.data(), mean.data(), rstd.data());
          }),
          bench::ms_of([&] {
            layernorm_backward(x.data(), g.data(), mean.data(), rstd.data(), dy.data(), s.rows, s.D, dx.data(),
                               dg.data(), db.data());
          }),
          bench::ms_of([&] { rmsnorm_forward(x.data(), g.data(), s.rows, s.D, 1e-5f, y.data(), rstd.data()); }),
          bench::ms_of([&] {
            rmsnorm_backward(x.data(), g.data(), rstd.data(), dy.data(), s.rows, s.D, dx.data(), dg.data());
          })};
      for (int k = 0; k < 4 && round > 0; ++k) t[k].push_back(ms[k]);
    }
    double m[4];
    for (int k = 0; k < 4; ++k) m[k] = bench::median(t[k]);
    const std::string name = std::to_string(s.rows) + " x " + std::to_string(s.D);
    std::printf("%-14s %11.3f ms %11.3f ms %11.3f ms %11.3f ms\n", name.c_str(), m[0], m[1], m[2], m[3]);
    if (csv)
      std::fprintf(csv, "%ld,%ld,%.4f,%.4f,%.4f,%.4f\n", static_cast<long>(s.rows), static_cast<long>(s.D), m[0], m[1],
                   m[2], m[3]);
  }
  if (csv) std::fclose(csv);
}
