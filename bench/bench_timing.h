// What the standalone benchmarks time with: one call's milliseconds, and the median of a round's
// values (the benchmarks compare ways by the median of per-round ratios: bench/scaled_rows.cpp).
#pragma once

#include <algorithm>
#include <chrono>
#include <string>
#include <vector>

namespace pm::bench {

// The milliseconds fn() takes, once.
inline double ms_of(const auto& fn) {
  const auto start = std::chrono::steady_clock::now();
  fn();
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() * 1e3;
}

// The FILE of a `--csv FILE` among the arguments, or "" (then no CSV is written).
inline std::string csv_path_of(int argc, char** argv) {
  for (int i = 1; i + 1 < argc; ++i)
    if (std::string(argv[i]) == "--csv") return argv[i + 1];
  return "";
}

// The middle value (the upper one of an even count).
inline double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

}  // namespace pm::bench
