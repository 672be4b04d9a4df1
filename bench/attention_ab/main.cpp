// bench/attention_ab.sh's driver: attention's core of two trees (a: a git revision, b: the working
// tree) alternated pass by pass in one process, so that the host's drift falls on both alike.
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <vector>

extern "C" double run_a(int pass, uint64_t* hash);
extern "C" double run_b(int pass, uint64_t* hash);

int main(int argc, char** argv) {
  const int rounds = argc > 1 ? std::atoi(argv[1]) : 200;
  const char* names[2] = {"forward", "backward"};
  std::vector<double> ratio[2], ms_a[2], ms_b[2];
  bool same[2];
  for (int pass = 0; pass < 2; ++pass) {  // warm, and the bits of both sides
    uint64_t ha = 0, hb = 0;
    run_a(pass, &ha), run_b(pass, &hb);
    same[pass] = ha == hb;
  }
  uint64_t hash = 0;
  for (int r = 0; r < rounds; ++r)
    for (int pass = 0; pass < 2; ++pass) {
      const bool a_first = (r + pass) % 2 == 0;  // each side first in half the pairs
      double ta, tb;
      if (a_first) ta = run_a(pass, &hash), tb = run_b(pass, &hash);
      else tb = run_b(pass, &hash), ta = run_a(pass, &hash);
      ratio[pass].push_back(tb / ta), ms_a[pass].push_back(ta * 1e3), ms_b[pass].push_back(tb * 1e3);
    }
  auto median = [](std::vector<double> v) {
    std::sort(v.begin(), v.end());
    return v.size() % 2 ? v[v.size() / 2] : 0.5 * (v[v.size() / 2 - 1] + v[v.size() / 2]);
  };
  auto quartile = [](std::vector<double> v, int q) {
    std::sort(v.begin(), v.end());
    return v[v.size() * q / 4];
  };
  std::printf("%-9s %10s %10s %10s %18s %10s\n", "pass", "a ms", "b ms", "b / a", "(quartiles)", "same bits");
  for (int pass = 0; pass < 2; ++pass)
    std::printf("%-9s %10.3f %10.3f %10.3f %8.3f - %-7.3f %10s\n", names[pass], median(ms_a[pass]), median(ms_b[pass]),
                median(ratio[pass]), quartile(ratio[pass], 1), quartile(ratio[pass], 3), same[pass] ? "yes" : "NO");
  return same[0] && same[1] ? 0 : 1;
}
