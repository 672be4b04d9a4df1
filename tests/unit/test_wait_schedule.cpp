// The waiting side's sleep schedule and the transfer-time model it predicts with.
#include <gtest/gtest.h>

#include <chrono>
#include <thread>

#include "comm/wait_schedule.h"
#include "comm/waiter.h"
#include "core/clock.h"
#include "core/compute_idle.h"

namespace pm {
namespace {

WaitPolicy policy() {
  WaitPolicy p;
  p.spin_us = 5;
  p.min_sleep_us = 20;
  p.max_sleep_us = 2000;
  p.early_polls = 3;
  p.approach_fraction = 0.5;
  p.overdue_fraction = 1.0 / 32;
  p.sleep_fraction = 1.0 / 8;
  return p;
}

TEST(WaitSchedule, SpinsFirstThenDoublesTheEarlyPolls) {
  WaitPolicy p = policy();
  EXPECT_EQ(next_sleep_us(p, 2e-6, 0.01, 0), 0);  // still spinning
  EXPECT_DOUBLE_EQ(next_sleep_us(p, 10e-6, 0.01, 0), 20);
  EXPECT_DOUBLE_EQ(next_sleep_us(p, 40e-6, 0.01, 1), 40);
  EXPECT_DOUBLE_EQ(next_sleep_us(p, 90e-6, 0.01, 2), 80);
}

TEST(WaitSchedule, SleepsHalfThePredictedTimeLeftThenTestsFinelyWhenOverdue) {
  WaitPolicy p = policy();
  // 10 ms predicted, 3 ms waited: half of the 7 ms left, capped at max_sleep_us
  EXPECT_DOUBLE_EQ(next_sleep_us(p, 0.003, 0.010, 3), 2000);
  EXPECT_DOUBLE_EQ(next_sleep_us(p, 0.009, 0.010, 5), 500);
  EXPECT_DOUBLE_EQ(next_sleep_us(p, 0.00999, 0.010, 9), 20);  // never below min_sleep_us
  // overdue: every 1/32 of the prediction, wider the later it gets
  EXPECT_DOUBLE_EQ(next_sleep_us(p, 0.0101, 0.010, 10), 312.5);
  EXPECT_DOUBLE_EQ(next_sleep_us(p, 0.0300, 0.010, 20), 2000);
}

TEST(WaitSchedule, WithoutAPredictionSleepsAShareOfTheTimeWaited) {
  WaitPolicy p = policy();
  EXPECT_DOUBLE_EQ(next_sleep_us(p, 0.004, 0, 3), 500);
  EXPECT_DOUBLE_EQ(next_sleep_us(p, 0.0001, 0, 3), 20);
  EXPECT_DOUBLE_EQ(next_sleep_us(p, 1.0, 0, 3), 2000);
}

TEST(WaitSchedule, FewWakeUpsForATransferThatEndsWhenPredicted) {
  // a 10 ms transfer predicted right: count the sleeps until it is seen complete, and how late
  WaitPolicy p = policy();
  const double duration = 0.010;
  double t = 0;
  int polls = 0;
  while (t < duration) {
    double s = next_sleep_us(p, t, duration, polls);
    t += s > 0 ? s * 1e-6 : 1e-6;
    if (s > 0) ++polls;
  }
  EXPECT_LE(polls, 16);                 // the old 1/32-of-waited rule took ~120
  EXPECT_LE(t - duration, 320e-6);      // seen within one overdue step
}

// A request that completes `after_s` after it was made.
class DoneAfter : public CommRequest {
 public:
  explicit DoneAfter(double after_s) : end_s_(now_s() + after_s) {}
  bool test() override {
    ++tests;
    return now_s() >= end_s_;
  }
  std::string what() const override { return "a timed request"; }
  void abandon() override {}
  int tests = 0;

 private:
  double end_s_;
};

TEST(WaitSchedule, TestsOftenWhileTheComputeLaneBesideHasNothingToRun) {
  // predicted 2 s: beside a busy compute lane the waiter sleeps ~1 s before its next test; beside
  // an idle one it tests at least every idle_max_sleep_us and sees the 20 ms transfer end in time
  WaitPolicy p = policy();
  p.max_sleep_us = 1e6;
  p.idle_max_sleep_us = 50;
  ComputeIdle lane;
  set_compute_lane_beside(&lane);
  lane.set(true);
  DoneAfter idle_wait(0.020);
  const double idle_s = idle_wait.wait(p, 2.0);
  EXPECT_LT(idle_s, 0.020 + 0.1);
  EXPECT_GT(idle_wait.tests, 20);  // 20 ms in steps of at most 50 us (and sleeps overrun)

  // busy, then idle after 30 ms: the long sleep is cut short there
  lane.set(false);
  DoneAfter busy_wait(0.020);
  std::thread compute([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(30));
    lane.set(true);
  });
  const double busy_s = busy_wait.wait(p, 2.0);
  compute.join();
  EXPECT_GE(busy_s, 0.030 - 0.005);  // it slept until the lane went idle...
  EXPECT_LT(busy_s, 0.3);            // ...not through the ~1 s the schedule alone gives

  // the compute thread's own wait (no lane beside: nothing else runs meanwhile): as an idle lane's
  set_compute_lane_beside(nullptr);
  DoneAfter own_wait(0.020);
  EXPECT_LT(own_wait.wait(p, 2.0), 0.020 + 0.1);

  // turned off (idle_max_sleep_us 0, ranks sharing cores): the schedule alone, idle or not
  set_compute_lane_beside(&lane);
  p.idle_max_sleep_us = 0;
  DoneAfter off_wait(0.020);
  EXPECT_GT(off_wait.wait(p, 0.2), 0.09);  // its first long sleep: half of the 0.2 s predicted
  set_compute_lane_beside(nullptr);
}

TEST(TransferModel, PredictsOnlyLargeTransfersAfterEnoughSamples) {
  TransferModel m;
  EXPECT_EQ(m.predict_s(1e6), 0);
  for (int i = 0; i < 3; ++i) m.record(1e6, 0.008);
  EXPECT_EQ(m.predict_s(1e6), 0);  // three samples are not enough
  m.record(1e6, 0.008);
  EXPECT_NEAR(m.predict_s(2e6), 0.016, 1e-12);
  EXPECT_EQ(m.predict_s(1000), 0);  // latency-bound: no prediction
  m.record(1000, 5.0);              // too small to learn from
  EXPECT_EQ(m.samples(), 4u);
}

TEST(TransferModel, TakesALowQuantileSoThatLatePeersDoNotStretchThePrediction) {
  TransferModel m;
  for (int i = 0; i < 8; ++i) m.record(1e6, 0.008);
  for (int i = 0; i < 8; ++i) m.record(1e6, 0.050);  // half of them waited for a late peer
  EXPECT_NEAR(m.predict_s(1e6), 0.008, 1e-12);
}

TEST(TransferModel, ForgetsOldSamples) {
  TransferModel m;
  for (std::size_t i = 0; i < TransferModel::kWindow; ++i) m.record(1e6, 0.001);
  for (std::size_t i = 0; i < TransferModel::kWindow; ++i) m.record(1e6, 0.004);  // the link got slower
  EXPECT_EQ(m.samples(), TransferModel::kWindow);
  EXPECT_NEAR(m.predict_s(1e6), 0.004, 1e-12);
}

}  // namespace
}  // namespace pm
