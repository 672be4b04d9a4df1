// The weight gradients of one pass's experts from rows no cache holds, as the layer's backward
// reads the activations and inputs its forward wrote long before: 32 DeepSeek-style experts
// (512 rows each, M 512, SwiGLU of hidden 128: act^T dy and u^T dhpre, gemm_tn_rows with the bias
// sums), the caches flushed by a 256 MB sweep before each pass. Medians of 9 passes, one thread.
// For old against new, build it against each tree's libraries and run the two alternately
// (docs/BENCHMARKS.md, "The weight gradients' packing fetches its rows ahead"):
//
//   g++ -O3 -march=native -std=c++20 -Isrc bench/wgrad_cold.cpp -o /tmp/wgrad_cold
//       -Lbuild/src -lpipemoe_kernels -lpipemoe_core -lfmt -lpthread   (one line)
//   (or build/bench/wgrad_cold, built with the tree)
//   /tmp/wgrad_cold [CSV]
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <string>
#include <vector>

#include "core/rng.h"
#include "kernels/cpu/gemm.h"
using namespace pm;

int main(int argc, char** argv) {
  constexpr int64_t E = 32, R = 512, M = 512, H = 128, H1 = 2 * H;
  std::vector<float> act(E * R * H), dy(E * R * M), u(E * R * M), dh(E * R * H1);
  std::vector<float> gw2(H * M), gw1(M * H1), gb1(H1), gb2(M), flush(64 << 20);
  uint64_t stream = 1;
  for (std::vector<float>* v : {&act, &dy, &u, &dh}) Rng(9, stream++).fill_normal(v->data(), v->size(), 0.0f, 1.0f);
  std::vector<const float*> a_rows(E * R), dy_rows(E * R), u_rows(E * R), dh_rows(E * R);
  for (int64_t i = 0; i < E * R; ++i)
    a_rows[i] = &act[i * H], dy_rows[i] = &dy[i * M], u_rows[i] = &u[i * M], dh_rows[i] = &dh[i * H1];
  std::vector<double> ms;
  for (int pass = 0; pass < 10; ++pass) {
    for (std::size_t i = 0; i < flush.size(); i += 16) flush[i] += 1.0f;  // evicts the rows
    const auto start = std::chrono::steady_clock::now();
    for (int64_t e = 0; e < E; ++e) {
      gemm_tn_rows(H, M, R, a_rows.data() + e * R, dy_rows.data() + e * R, 1.0f, gw2.data(), M, gb2.data());
      gemm_tn_rows(M, H1, R, u_rows.data() + e * R, dh_rows.data() + e * R, 1.0f, gw1.data(), H1, gb1.data());
    }
    if (pass > 0) ms.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() * 1e3);
  }
  std::sort(ms.begin(), ms.end());
  const double flops = 2.0 * E * R * (H * M + M * H1);
  std::printf("weight gradients of %ld experts from evicted rows: median %.2f ms (%.1f GFLOP/s), best %.2f ms\n",
              static_cast<long>(E), ms[ms.size() / 2], flops / ms[ms.size() / 2] / 1e6, ms.front());
  if (argc > 1) {
    FILE* out = std::fopen(argv[1], "w");
    if (!out) return 1;
    std::fprintf(out, "median_ms,best_ms,gflops\n%.3f,%.3f,%.2f\n", ms[ms.size() / 2], ms.front(),
                 flops / ms[ms.size() / 2] / 1e6);
    std::fclose(out);
  }
  return 0;
}
