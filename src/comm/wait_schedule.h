// How a thread waiting for a transfer spends its time: when to test again, and how long transfers
// of each kind take on this link.
//
// MPI implementations busy-poll in their blocking calls; on a CPU rank that steals the core the
// compute lane needs. Sleeping in short steps is not free either: on a virtual machine each
// wake-up (a timer, an interrupt, a context switch, the compute thread's caches refilled) cost the
// compute thread ~30 us (measured: a thread that only sleeps 10 us in a loop slowed two GEMM
// threads by 30%; docs/BENCHMARKS.md). So the waiting side sleeps through most of a transfer in a
// few long steps: it learns from the transfers it waited for how long one of a given size takes,
// sleeps half of the predicted time left again and again, and tests finely only around the
// predicted end. Data keeps moving while it sleeps because MPI hands a whole chunk to the kernel
// at once (see the MPI backend's TCP settings).
#pragma once

#include <cstddef>
#include <vector>

namespace pm {

struct WaitPolicy {
  double spin_us = 5;             // test back-to-back this long first: tiny messages finish here
  double min_sleep_us = 20;       // no shorter sleep: every wake-up costs the compute lane
  double max_sleep_us = 2000;     // no longer sleep: bounds the delay of an unforeseen handshake
  int early_polls = 3;            // first sleeps min, 2 min, 4 min: rendezvous handshakes finish
  double approach_fraction = 0.5;  // before the predicted end: sleep this share of the time left
  double overdue_fraction = 1.0 / 32;  // after it: test every this share of the predicted time
  double sleep_fraction = 1.0 / 8;     // without a prediction: sleep this share of the time waited
  // While the compute lane beside has nothing to run, test at least this often (core/compute_idle.h);
  // 0: sleep by the schedule alone. The command line sets 50 where the rank's cores are its own.
  double idle_max_sleep_us = 0;
  double timeout_s = 600;         // then fail: a peer is dead or stuck
};

// Microseconds to sleep before the next test, `waited_s` after the operation started, after
// `polls` sleeps so far; expected_s is the predicted duration (0: none). 0 means test again now.
double next_sleep_us(const WaitPolicy& policy, double waited_s, double expected_s, int polls);

// Learns seconds per byte of one kind of transfer from the ones this rank waited for. Predicts
// from a low quantile of recent samples: a transfer that also waited for a late peer runs long,
// the fast ones show the link. A prediction a little short only means testing a little early.
class TransferModel {
 public:
  static constexpr double kMinBytes = 64 * 1024;  // smaller transfers are mostly latency
  static constexpr std::size_t kWindow = 32;      // recent samples kept
  static constexpr std::size_t kMinSamples = 4;

  void record(double bytes, double seconds);
  // Predicted seconds for `bytes`; 0 when too small to predict or too few samples yet.
  double predict_s(double bytes) const;
  std::size_t samples() const { return per_byte_.size(); }

 private:
  std::vector<double> per_byte_;  // ring buffer of seconds per byte
  std::size_t next_ = 0;
};

}  // namespace pm
