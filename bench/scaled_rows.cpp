// An fp32 expert's output gradients read where the deduplicated dispatch left them, each row times
// its gate value as the GEMM packs it (GemmExtras::a_row_scale, what the layer does), against the
// way before: gate * dy written into a copy of every choice's row (copy_rows_scaled), the GEMM
// then reading the copy. 32 experts of 512 rows each (a DeepSeek-style rank's share of top-8 of
// 64), their rows picked from 4096 distinct rows of dy (the tokens a rank receives once each);
// the copy is 32 MB, as in a layer. The products are dy W2^T (depth 512) for a hidden size of 128
// (SwiGLU's fine-grained experts: B of 2 panels, where A is otherwise read in place) and of 1024
// (the PyTorch comparison's experts: 16 panels, A packed either way). Per-round ratios of
// alternating passes, one thread; checks that both give the same bits.
// Build against a built tree and run (docs/BENCHMARKS.md, "The experts scale dy as they pack it"):
//
//   g++ -O3 -march=native -std=c++20 -Isrc bench/scaled_rows.cpp -o /tmp/scaled_rows
//       -Lbuild/src -lpipemoe_kernels -lpipemoe_core -lfmt -lpthread   (one line)
//   (or build/bench/scaled_rows, built with the tree)
//   /tmp/scaled_rows [ROUNDS=15] [CSV]
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "bench_timing.h"
#include "core/rng.h"
#include "kernels/cpu/gemm.h"
using namespace pm;

namespace {

constexpr int64_t kExperts = 32, kRows = 512, kDistinct = 4096, kDepth = 512;

using bench::median;
using bench::ms_of;

struct Result {
  double scaled_ms, copied_ms, ratio;  // ratio: median of the per-round ratios
  bool same_bits;
};

Result time_width(int64_t N, int rounds) {
  const int64_t K = kDepth, rows_all = kExperts * kRows;
  std::vector<float> dy(kDistinct * K), w(K * N), gate(rows_all);
  Rng(7, 1).fill_normal(dy.data(), dy.size(), 0.0f, 1.0f);
  Rng(7, 2).fill_normal(w.data(), w.size(), 0.0f, 1.0f);
  Rng(7, 3).fill_normal(gate.data(), gate.size(), 0.0f, 0.5f);
  PackedB packed;
  pack_b(Trans::no, K, N, w.data(), N, packed);
  std::vector<const float*> rows(rows_all);  // each choice's row of dy, scattered over the distinct ones
  for (int64_t i = 0; i < rows_all; ++i) rows[i] = &dy[static_cast<int64_t>((i * 2654435761ull) % kDistinct) * K];
  std::vector<float> copy(rows_all * K), c_scaled(rows_all * N), c_copied(rows_all * N);
  auto scaled = [&] {
    for (int64_t e = 0; e < kExperts; ++e) {
      GemmExtras extras;
      extras.a_row_scale = &gate[e * kRows];
      gemm_packed_rows(kRows, &rows[e * kRows], packed, 0.0f, &c_scaled[e * kRows * N], N, extras);
    }
  };
  auto copied = [&] {
    for (int64_t e = 0; e < kExperts; ++e) {
      for (int64_t i = e * kRows; i < (e + 1) * kRows; ++i)
        for (int64_t k = 0; k < K; ++k) copy[i * K + k] = gate[i] * rows[i][k];
      gemm_packed(Trans::no, kRows, &copy[e * kRows * K], K, packed, 0.0f, &c_copied[e * kRows * N], N);
    }
  };
  scaled(), copied();  // the pages touched once
  std::vector<double> a, b, ratio;
  for (int r = 0; r < rounds; ++r) {
    const bool scaled_first = r % 2 == 0;
    const double first = scaled_first ? ms_of(scaled) : ms_of(copied);
    const double second = scaled_first ? ms_of(copied) : ms_of(scaled);
    a.push_back(scaled_first ? first : second), b.push_back(scaled_first ? second : first);
    ratio.push_back(a.back() / b.back());
  }
  return {median(a), median(b), median(ratio),
          std::memcmp(c_scaled.data(), c_copied.data(), c_scaled.size() * sizeof(float)) == 0};
}

}  // namespace

int main(int argc, char** argv) {
  const int rounds = argc > 1 ? std::atoi(argv[1]) : 15;
  const std::string csv = argc > 2 ? argv[2] : "";
  FILE* out = csv.empty() ? nullptr : std::fopen(csv.c_str(), "w");
  if (out) std::fprintf(out, "depth,width,scaled_ms,copied_ms,ratio,same_bits\n");
  std::printf("%d experts x %d rows of %d distinct rows of dy, depth %d, one thread (%d alternating rounds)\n",
              static_cast<int>(kExperts), static_cast<int>(kRows), static_cast<int>(kDistinct),
              static_cast<int>(kDepth), rounds);
  std::printf("%6s %16s %18s %14s %s\n", "width", "scaled in the", "scaled copy", "ratio (median", "bits");
  std::printf("%6s %16s %18s %14s\n", "", "packing ms", "+ GEMM ms", "of rounds)");
  for (int64_t N : {128, 1024}) {
    const Result r = time_width(N, rounds);
    std::printf("%6ld %16.2f %18.2f %14.3f %s\n", static_cast<long>(N), r.scaled_ms, r.copied_ms, r.ratio,
                r.same_bits ? "same" : "DIFFER");
    if (out)
      std::fprintf(out, "%ld,%ld,%.3f,%.3f,%.4f,%d\n", static_cast<long>(kDepth), static_cast<long>(N), r.scaled_ms,
                   r.copied_ms, r.ratio, r.same_bits ? 1 : 0);
    if (!r.same_bits) return 1;
  }
  if (out) std::fclose(out);
  return 0;
}
