// Whether a compute lane has nothing it can run, for the thread that waits for the network beside
// it.
//
// The waiting thread sleeps through most of a transfer so that it does not take the core the
// compute lane needs (comm/wait_schedule.h). While the compute lane itself waits (for an exposed
// all-to-all, for the gradient all-reduces at the end of a backward), that core is idle: testing
// at least every 50 us then costs no computation, and it matters there: the sleeping schedule
// noticed a finished transfer up to an eighth of its time late, and Open MPI's non-blocking
// collectives move on only inside a test (an all-reduce of 1.7 MB over shared memory: 0.37 ms
// blocking, 1.3 ms tested every 200 us; docs/BENCHMARKS.md).
//
// The executor (sched/executor.h) owns one per graph runner and says when its compute lane waits;
// its lane threads find it with compute_lane_beside().
#pragma once

#include <atomic>
#include <condition_variable>
#include <mutex>

namespace pm {

class ComputeIdle {
 public:
  // By the compute lane's side: true while it waits with nothing to run.
  void set(bool idle);
  bool idle() const { return idle_.load(std::memory_order_acquire); }
  // Sleeps `us` microseconds, or until the compute lane goes idle if that comes first.
  void sleep_unless_idle(double us);

 private:
  std::atomic<bool> idle_{false};
  std::mutex mutex_;
  std::condition_variable went_idle_;
};

// How many cores this process may run on (its affinity mask). More than the rank's compute
// threads means the cores are shared with other ranks (scripts/emulate-cluster runs unbound ranks
// on one machine): a test every 50 us then takes a core another rank computes on
// (demo model over the emulated 1 Gbit/s link: 0.96x tokens/s), so the caller turns it off.
int cores_allowed();

// The compute lane this thread works beside (an executor's lane threads), or null (the thread
// that runs the compute lane itself, whose own collectives between passes leave nothing else to
// run: they test as often as an idle lane's).
ComputeIdle* compute_lane_beside();
void set_compute_lane_beside(ComputeIdle* lane);

}  // namespace pm
