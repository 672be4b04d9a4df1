// A linear layer's forward on one rank's tokens of the bundled models (1536 rows), the ways it can
// run, timed in turn in each round (medians of the per-round ratios; each call after a 64 MB pass
// that evicts the operands, as a training step's other work does):
//   fp32: rows filled with the bias then the product with beta 1 (Backend's own form) against the
//         kernels' chains started from the bias (gemm_bias, the CPU backend's);
//   bf16: the float activation packed (rounded) by the product and then kept as bf16 rows, against
//         kept first and its bf16 rows read in place by the product (the model's order since
//         2026-12-07). The kept copy is made by copy_rows, as the model makes it.
// Both pairs give the same bits (checked here too). docs/BENCHMARKS.md, "The training step's dense
// work".
//
//   (built with the tree: build/bench/linear_forward)   build/bench/linear_forward [--csv FILE]
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "bench_timing.h"
#include "core/rng.h"
#include "kernels/backend.h"
#include "kernels/cpu/elementwise.h"
#include "kernels/cpu/gemm.h"
using namespace pm;

int main(int argc, char** argv) {
  const std::string csv_path = bench::csv_path_of(argc, argv);
  struct Shape {
    const char* name;
    int64_t N, K;
  };
  // the attention's q|k|v and projection, the dense MLP's two layers, the shared expert's output
  const Shape shapes[] = {{"qkv", 576, 192}, {"proj", 192, 192}, {"mlp fc", 768, 192}, {"mlp out", 192, 768},
                          {"shared out", 192, 256}};
  constexpr int64_t T = 1536;
  constexpr int kRounds = 21;
  Backend& k = cpu_backend();
  std::vector<float> evict(16 << 20, 1.0f);
  auto evict_caches = [&] {
    for (std::size_t i = 0; i < evict.size(); i += 16) evict[i] += 1.0f;
  };
  FILE* csv = csv_path.empty() ? nullptr : std::fopen(csv_path.c_str(), "w");
  if (csv)
    std::fprintf(csv, "shape,N,K,fill_ms,bias_start_ms,bias_ratio,pack_then_keep_ms,keep_then_read_ms,keep_ratio\n");
  std::printf("%-11s %5s %5s | %10s %10s %6s | %10s %10s %6s\n", "shape", "N", "K", "fp32 fill", "bias start", "ratio",
              "bf16 pack", "kept rows", "ratio");
  for (const Shape& s : shapes) {
    std::vector<float> x(T * s.K), w(s.K * s.N), bias(s.N), y1(T * s.N), y2(T * s.N);
    std::vector<uint16_t> kept(T * s.K);
    Rng(1, 0).fill_normal(x.data(), x.size(), 0.0f, 1.0f);
    Rng(2, 0).fill_normal(w.data(), w.size(), 0.0f, 0.05f);
    Rng(3, 0).fill_normal(bias.data(), bias.size(), 0.0f, 0.1f);
    std::vector<double> t[4], bias_ratio, keep_ratio;
    bool same = true;
    for (int round = 0; round <= kRounds; ++round) {  // round 0: first touch, not timed
      double ms[4];
      evict_caches();
      ms[0] = bench::ms_of([&] {
        fill_rows(y1.data(), T, s.N, bias.data());
        gemm(Trans::no, Trans::no, T, s.N, s.K, x.data(), s.K, w.data(), s.N, 1.0f, y1.data(), s.N);
      });
      evict_caches();
      ms[1] = bench::ms_of([&] { gemm_bias(T, s.N, s.K, x.data(), s.K, w.data(), s.N, bias.data(), y2.data(), s.N); });
      same = same && std::memcmp(y1.data(), y2.data(), y1.size() * sizeof(float)) == 0;
      evict_caches();
      ms[2] = bench::ms_of([&] {
        gemm_bf16_bias(T, s.N, s.K, x.data(), s.K, w.data(), s.N, bias.data(), y1.data(), s.N);
        k.copy_rows(x.data(), kept.data(), s.K, {{0, 0, T}});
      });
      evict_caches();
      ms[3] = bench::ms_of([&] {
        k.copy_rows(x.data(), kept.data(), s.K, {{0, 0, T}});
        gemm_bf16_bias(T, s.N, s.K, kept.data(), s.K, w.data(), s.N, bias.data(), y2.data(), s.N);
      });
      same = same && std::memcmp(y1.data(), y2.data(), y1.size() * sizeof(float)) == 0;
      if (round == 0) continue;
      for (int i = 0; i < 4; ++i) t[i].push_back(ms[i]);
      bias_ratio.push_back(ms[1] / ms[0]);
      keep_ratio.push_back(ms[3] / ms[2]);
    }
    double m[4];
    for (int i = 0; i < 4; ++i) m[i] = bench::median(t[i]);
    const double br = bench::median(bias_ratio), kr = bench::median(keep_ratio);
    std::printf("%-11s %5ld %5ld | %7.3f ms %7.3f ms %6.3f | %7.3f ms %7.3f ms %6.3f%s\n", s.name,
                static_cast<long>(s.N), static_cast<long>(s.K), m[0], m[1], br, m[2], m[3], kr,
                same ? "" : "  (BITS DIFFER)");
    if (csv)
      std::fprintf(csv, "%s,%ld,%ld,%.4f,%.4f,%.4f,%.4f,%.4f,%.4f\n", s.name, static_cast<long>(s.N),
                   static_cast<long>(s.K), m[0], m[1], br, m[2], m[3], kr);
    if (!same) return 1;
  }
  if (csv) std::fclose(csv);
  return 0;
}
