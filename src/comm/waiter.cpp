#include "comm/waiter.h"

#include <algorithm>
#include <chrono>
#include <thread>

#include "core/clock.h"
#include "core/compute_idle.h"
#include "core/error.h"

namespace pm {

CommRequest::CommRequest() : start_s(now_s()) {}

double CommRequest::wait(const WaitPolicy& policy, double expected_s) {
  int polls = 0;
  while (!test()) {
    double waited = now_s() - start_s;
    if (waited > policy.timeout_s) {
      abandon();
      throw Error(ErrorKind::comm,
                  fmt::format("{} did not finish in {:.0f} s: a peer rank is dead or stuck", what(),
                              policy.timeout_s));
    }
    double sleep_us = next_sleep_us(policy, waited, expected_s, polls);
    if (sleep_us <= 0) continue;
    ++polls;
    sleep_us = std::min(sleep_us, (policy.timeout_s - waited) * 1e6 + 1);
    if (policy.idle_max_sleep_us > 0) {
      ComputeIdle* lane = compute_lane_beside();
      if (lane && !lane->idle()) {
        lane->sleep_unless_idle(sleep_us);  // cut short when the compute lane runs out of work
        continue;
      }
      // the compute lane beside has nothing to run, or this is the compute thread itself (the
      // collectives between passes): no core to take from it, test at least this often
      sleep_us = std::min(sleep_us, policy.idle_max_sleep_us);
    }
    std::this_thread::sleep_for(std::chrono::duration<double, std::micro>(sleep_us));
  }
  return now_s() - start_s;
}

void Waiter::wait(CommRequest& request) {
  TransferModel& model = models_[static_cast<int>(request.op)];
  double seconds = request.wait(policy_, model.predict_s(request.wire_bytes));
  model.record(request.wire_bytes, seconds);
}

}  // namespace pm
