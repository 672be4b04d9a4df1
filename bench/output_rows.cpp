// An expert's output rows written by the GEMM straight to where the all-to-all sends them from
// (GemmExtras::c_rows, what the layer does on a float32 wire) against the way before: each piece
// of 192 rows into one buffer, then copied out. 32 experts of 512 rows each (a DeepSeek-style
// rank's share), the outputs of one pass 32 MB, far more than the caches hold, as in a layer.
// Medians of 7 alternating passes, one thread; checks that both give the same bits.
// Build against a built tree and run (docs/BENCHMARKS.md, "Expert outputs straight into the
// all-to-all's rows"):
//
//   g++ -O3 -march=native -std=c++20 -Isrc bench/output_rows.cpp -o /tmp/output_rows
//       -Lbuild/src -lpipemoe_kernels -lpipemoe_core -lfmt -lpthread   (one line)
//   (or build/bench/output_rows, built with the tree)
//   /tmp/output_rows [CSV]          shapes: depth 128 and 256 (a W2 and W1^T of hidden 128), width 512
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "bench_timing.h"
#include "core/rng.h"
#include "kernels/cpu/gemm.h"
using namespace pm;

namespace {

constexpr int64_t kExperts = 32, kRows = 512, kPiece = 192;

using bench::ms_of;

struct Result {
  double by_pointer_ms, copied_ms;
  bool same_bits;
};

Result time_shape(int64_t K, int64_t N) {
  std::vector<float> A(kRows * K), B(K * N);
  Rng(5, 1).fill_normal(A.data(), A.size(), 0.0f, 1.0f);
  Rng(5, 2).fill_normal(B.data(), B.size(), 0.0f, 1.0f);
  PackedB packed;
  pack_b(Trans::no, K, N, B.data(), N, packed);
  // every expert's rows, one after the other, as the all-to-all's buffer holds them
  std::vector<float> direct(kExperts * kRows * N), copied(direct.size()), piece(kPiece * N);
  std::vector<float*> rows(kExperts * kRows);
  for (int64_t i = 0; i < kExperts * kRows; ++i) rows[i] = direct.data() + i * N;
  auto by_pointer = [&] {
    for (int64_t e = 0; e < kExperts; ++e)
      for (int64_t r = 0; r < kRows; r += kPiece) {
        GemmExtras extras;
        extras.c_rows = rows.data() + e * kRows + r;
        gemm_packed(Trans::no, std::min(kPiece, kRows - r), A.data() + r * K, K, packed, 0.0f, nullptr, 0, extras);
      }
  };
  auto through_buffer = [&] {
    for (int64_t e = 0; e < kExperts; ++e)
      for (int64_t r = 0; r < kRows; r += kPiece) {
        const int64_t n = std::min(kPiece, kRows - r);
        gemm_packed(Trans::no, n, A.data() + r * K, K, packed, 0.0f, piece.data(), N);
        std::memcpy(copied.data() + (e * kRows + r) * N, piece.data(), n * N * sizeof(float));
      }
  };
  std::vector<double> a, b;
  by_pointer(), through_buffer();  // the pages touched once
  for (int i = 0; i < 7; ++i) a.push_back(ms_of(by_pointer)), b.push_back(ms_of(through_buffer));
  std::sort(a.begin(), a.end());
  std::sort(b.begin(), b.end());
  return {a[3], b[3], std::memcmp(direct.data(), copied.data(), direct.size() * sizeof(float)) == 0};
}

}  // namespace

int main(int argc, char** argv) {
  const std::string csv = argc > 1 ? argv[1] : "";
  FILE* out = csv.empty() ? nullptr : std::fopen(csv.c_str(), "w");
  if (out) std::fprintf(out, "depth,width,by_pointer_ms,copied_ms,ratio,same_bits\n");
  std::printf("%d experts x %d rows, pieces of %d, one thread (medians of 7 alternating passes)\n",
              static_cast<int>(kExperts), static_cast<int>(kRows), static_cast<int>(kPiece));
  std::printf("%6s %6s %14s %18s %8s %s\n", "depth", "width", "by pointer ms", "buffer + copy ms", "ratio", "bits");
  for (int64_t K : {128, 256}) {
    const int64_t N = 512;
    const Result r = time_shape(K, N);
    std::printf("%6ld %6ld %14.2f %18.2f %8.3f %s\n", static_cast<long>(K), static_cast<long>(N), r.by_pointer_ms,
                r.copied_ms, r.by_pointer_ms / r.copied_ms, r.same_bits ? "same" : "DIFFER");
    if (out)
      std::fprintf(out, "%ld,%ld,%.3f,%.3f,%.4f,%d\n", static_cast<long>(K), static_cast<long>(N), r.by_pointer_ms,
                   r.copied_ms, r.by_pointer_ms / r.copied_ms, r.same_bits ? 1 : 0);
    if (!r.same_bits) return 1;
  }
  if (out) std::fclose(out);
  return 0;
}
