// bench/gemm_ab.sh's driver: the two GEMM builds (a: a git revision, b: the working tree)
// alternated shape by shape in one process, so that the host's drift falls on both alike.
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <vector>

extern "C" double run_a(int shape);
extern "C" double run_b(int shape);

int main(int argc, char** argv) {
  const int rounds = argc > 1 ? std::atoi(argv[1]) : 10;
  const char* names[7] = {"fwd u.W1", "fwd a.W2", "bwd dy.W2^T", "bwd dh.W1^T", "wgrad a^T.dy", "wgrad u^T.dh",
                          "square 2048"};
  const double flops[7] = {2.0 * 1025 * 512 * 1024, 2.0 * 1025 * 512 * 1024, 2.0 * 1025 * 512 * 1024,
                           2.0 * 1025 * 512 * 1024, 2.0 * 1025 * 512 * 1024, 2.0 * 1025 * 512 * 1024,
                           2.0 * 2048 * 2048 * 2048};
  std::vector<double> ratio[7], gf_a[7], gf_b[7];
  for (int s = 0; s < 7; ++s) run_a(s), run_b(s);  // warm: data, packing, pages
  for (int r = 0; r < rounds; ++r)
    for (int s = 0; s < 7; ++s) {
      const bool a_first = (r + s) % 2 == 0;  // each side first in half the pairs
      double ta, tb;
      if (a_first) ta = run_a(s), tb = run_b(s);
      else tb = run_b(s), ta = run_a(s);
      ratio[s].push_back(tb / ta), gf_a[s].push_back(flops[s] / ta / 1e9), gf_b[s].push_back(flops[s] / tb / 1e9);
    }
  auto median = [](std::vector<double> v) {
    std::sort(v.begin(), v.end());
    return v.size() % 2 ? v[v.size() / 2] : 0.5 * (v[v.size() / 2 - 1] + v[v.size() / 2]);
  };
  std::printf("%-14s %10s %10s %12s\n", "shape", "a GFLOP/s", "b GFLOP/s", "time b/a");
  for (int s = 0; s < 7; ++s)
    std::printf("%-14s %10.1f %10.1f %12.3f\n", names[s], median(gf_a[s]), median(gf_b[s]), median(ratio[s]));
}
