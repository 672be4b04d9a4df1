// Wall-clock time in seconds on a monotonic clock, and a small stopwatch.
#pragma once

#include <chrono>

namespace pm {

inline double now_s() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

class Stopwatch {
 public:
  Stopwatch() : start_(now_s()) {}
  double elapsed_s() const { return now_s() - start_; }
  double elapsed_ms() const { return elapsed_s() * 1e3; }
  void reset() { start_ = now_s(); }

 private:
  double start_;
};

}  // namespace pm
