#include "core/compute_idle.h"

#include <sched.h>

#include <chrono>
#include <thread>

namespace pm {

void ComputeIdle::set(bool idle) {
  if (idle_.load(std::memory_order_relaxed) == idle) return;
  {
    // under the mutex: a waiter that has just found the lane busy is then already waiting
    std::lock_guard lock(mutex_);
    idle_.store(idle, std::memory_order_release);
  }
  if (idle) went_idle_.notify_all();
}

void ComputeIdle::sleep_unless_idle(double us) {
  std::unique_lock lock(mutex_);
  went_idle_.wait_for(lock, std::chrono::duration<double, std::micro>(us), [&] { return idle(); });
}

int cores_allowed() {
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(0, sizeof(set), &set) != 0) return static_cast<int>(std::thread::hardware_concurrency());
  return CPU_COUNT(&set);
}

namespace {
thread_local ComputeIdle* beside = nullptr;
}  // namespace

ComputeIdle* compute_lane_beside() { return beside; }
void set_compute_lane_beside(ComputeIdle* lane) { beside = lane; }

}  // namespace pm
