// bench/gemm_ab.sh's driver: the two GEMM builds (a: a git revision, b: the working tree)
// alternated shape by shape in one process, so that the host's drift falls on both alike.
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "dims.h"

extern "C" double run_a(int shape, uint64_t* hash);
extern "C" double run_b(int shape, uint64_t* hash);

int main(int argc, char** argv) {
  const int rounds = argc > 1 ? std::atoi(argv[1]) : 10;
  const char* names[7] = {"fwd u.W1", "fwd a.W2", "bwd dy.W2^T", "bwd dh.W1^T", "wgrad a^T.dy", "wgrad u^T.dh",
                          "square 2048"};
  const GemmAbDims d = gemm_ab_dims();
  const double expert = 2.0 * d.R * d.M * d.H;
  const double flops[7] = {expert, expert, expert, expert, expert, expert, 2.0 * 2048 * 2048 * 2048};
  std::vector<double> ratio[7], gf_a[7], gf_b[7];
  bool same[7];
  for (int s = 0; s < 7; ++s) {  // warm (data, packing, pages), and the bits of both sides
    uint64_t ha = 0, hb = 0;
    run_a(s, &ha), run_b(s, &hb);
    same[s] = ha == hb;
  }
  uint64_t hash = 0;
  for (int r = 0; r < rounds; ++r)
    for (int s = 0; s < 7; ++s) {
      const bool a_first = (r + s) % 2 == 0;  // each side first in half the pairs
      double ta, tb;
      if (a_first) ta = run_a(s, &hash), tb = run_b(s, &hash);
      else tb = run_b(s, &hash), ta = run_a(s, &hash);
      ratio[s].push_back(tb / ta), gf_a[s].push_back(flops[s] / ta / 1e9), gf_b[s].push_back(flops[s] / tb / 1e9);
    }
  auto median = [](std::vector<double> v) {
    std::sort(v.begin(), v.end());
    return v.size() % 2 ? v[v.size() / 2] : 0.5 * (v[v.size() / 2 - 1] + v[v.size() / 2]);
  };
  std::printf("%-14s %10s %10s %12s  %s\n", "shape", "a GFLOP/s", "b GFLOP/s", "time b/a", "results");
  for (int s = 0; s < 7; ++s)
    std::printf("%-14s %10.1f %10.1f %12.3f  %s\n", names[s], median(gf_a[s]), median(gf_b[s]), median(ratio[s]),
                same[s] ? "bit-identical" : "DIFFER");
}
