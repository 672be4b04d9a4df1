// The executor: dependencies, lane priority, overlap, errors.
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <mutex>
#include <thread>

#include "core/compute_idle.h"
#include "core/error.h"
#include "sched/executor.h"
#include "sched/trace.h"

namespace pm {
namespace {

TEST(Executor, RunsEveryTaskAfterItsDependenciesInPriorityOrder) {
  for (auto mode : {Executor::Mode::overlapped, Executor::Mode::serial}) {
    Executor ex(mode);
    std::mutex m;
    std::vector<std::string> order;
    auto log = [&](std::string s) { return [&, s] { std::lock_guard l(m); order.push_back(s); }; };
    TaskGraph g;
    int a = g.add({"a", lanes::compute, "other", -1, {}, {}, log("a")});
    int b = g.add({"b", lanes::comm, "other", -1, {}, {a}, log("b")});
    int c = g.add({"c", lanes::compute, "other", -1, {}, {b}, log("c")});
    g.add({"d", lanes::compute, "other", -1, {}, {}, log("d")});
    g.add({"e", lanes::comm, "other", -1, {}, {c}, log("e")});
    ex.run(g);
    auto pos = [&](const std::string& s) { return std::find(order.begin(), order.end(), s) - order.begin(); };
    ASSERT_EQ(order.size(), 5u);
    EXPECT_LT(pos("a"), pos("b"));
    EXPECT_LT(pos("b"), pos("c"));
    EXPECT_LT(pos("c"), pos("e"));
    EXPECT_LT(pos("a"), pos("d"));  // same lane, both ready: the one added first runs first
  }
}

TEST(Executor, CommunicationLaneOverlapsCompute) {
  Executor ex;
  Trace trace;
  TaskGraph g;
  auto sleep_ms = [](int ms) { return [ms] { std::this_thread::sleep_for(std::chrono::milliseconds(ms)); }; };
  g.add({"comm", lanes::comm, "all_to_all", -1, {}, {}, sleep_ms(60)});
  g.add({"compute", lanes::compute, "expert_fwd", -1, {}, {}, sleep_ms(60)});
  ex.run(g, &trace);
  auto events = trace.events();
  ASSERT_EQ(events.size(), 2u);
  // the two tasks ran at the same time: each started before the other ended
  EXPECT_LT(events[0].start_s, events[1].end_s);
  EXPECT_LT(events[1].start_s, events[0].end_s);
  EXPECT_GT(ex.last_stats().busy(lanes::compute), 0.05);
  EXPECT_GT(ex.last_stats().busy(lanes::comm), 0.05);
}

TEST(Executor, TellsItsLaneThreadsWhenTheComputeLaneHasNothingToRun) {
  // comm's task starts beside a 40 ms compute task (the lane busy), then waits until the compute
  // lane, whose next task needs comm's, says it is idle; after the graph it is busy again
  Executor ex;
  std::atomic<int> busy_at_start{-1}, went_idle{0}, beside{0};
  TaskGraph g;
  g.add({"long compute", lanes::compute, "other", -1, {}, {},
         [] { std::this_thread::sleep_for(std::chrono::milliseconds(40)); }});
  int comm = g.add({"comm", lanes::comm, "all_to_all", -1, {}, {}, [&] {
                      ComputeIdle* lane = compute_lane_beside();
                      beside = lane != nullptr;
                      if (!lane) return;
                      std::this_thread::sleep_for(std::chrono::milliseconds(5));
                      busy_at_start = lane->idle() ? 0 : 1;
                      const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(5);
                      while (!lane->idle() && std::chrono::steady_clock::now() < give_up)
                        std::this_thread::sleep_for(std::chrono::microseconds(100));
                      went_idle = lane->idle();
                    }});
  g.add({"after comm", lanes::compute, "other", -1, {}, {comm}, [] {}});
  ex.run(g);
  EXPECT_EQ(beside, 1);
  EXPECT_EQ(busy_at_start, 1);
  EXPECT_EQ(went_idle, 1);
  EXPECT_EQ(compute_lane_beside(), nullptr);  // the caller's thread is not a lane thread
}

TEST(Executor, ATaskErrorReachesTheCallerAndTheExecutorStaysUsable) {
  Executor ex;
  std::atomic<bool> after{false};
  TaskGraph g;
  int bad = g.add({"bad", lanes::comm, "other", -1, {}, {}, [] { throw Error(ErrorKind::comm, "peer gone"); }});
  g.add({"after", lanes::compute, "other", -1, {}, {bad}, [&] { after = true; }});
  EXPECT_THROW(ex.run(g), Error);
  EXPECT_FALSE(after);
  TaskGraph ok;
  bool ran = false;
  ok.add({"ok", lanes::comm, "other", -1, {}, {}, [&] { ran = true; }});
  ex.run(ok);
  EXPECT_TRUE(ran);
}

TEST(Executor, TheCommunicationLaneRunsItsTasksInTheOrderAddedEvenWhenALaterOneIsReady) {
  // Collectives must be issued in the same order on every rank: a ready later task does not
  // overtake an earlier one that waits for compute. The compute lane takes any ready task.
  for (auto mode : {Executor::Mode::overlapped, Executor::Mode::serial}) {
    Executor ex(mode);
    std::mutex m;
    std::vector<std::string> order;
    auto log = [&](std::string s) { return [&, s] { std::lock_guard l(m); order.push_back(s); }; };
    TaskGraph g;
    int slow = g.add({"slow compute", lanes::compute, "other", -1, {}, {},
                      [&] { std::this_thread::sleep_for(std::chrono::milliseconds(30)); log("slow compute")(); }});
    g.add({"first collective", lanes::comm, "other", -1, {}, {slow}, log("first collective")});
    g.add({"second collective", lanes::comm, "other", -1, {}, {}, log("second collective")});
    ex.run(g);
    EXPECT_EQ(order, (std::vector<std::string>{"slow compute", "first collective", "second collective"}));
  }
}

TEST(Executor, ALaneBeyondTheStandardOnesRunsOnAThreadOfItsOwn) {
  static const Lane stream = add_lane("test stream", false);
  EXPECT_EQ(lane_name(stream), "test stream");
  Executor ex;
  Trace trace;
  TaskGraph g;
  auto sleep_ms = [](int ms) { return [ms] { std::this_thread::sleep_for(std::chrono::milliseconds(ms)); }; };
  g.add({"on the stream", stream, "other", -1, {}, {}, sleep_ms(60)});
  g.add({"on the copy lane", lanes::copy, "other", -1, {}, {}, sleep_ms(60)});
  g.add({"compute", lanes::compute, "other", -1, {}, {}, sleep_ms(60)});
  ex.run(g, &trace);
  auto events = trace.events();
  ASSERT_EQ(events.size(), 3u);
  for (const auto& a : events)
    for (const auto& b : events) EXPECT_LT(a.start_s, b.end_s) << a.name << " and " << b.name << " overlapped";
  EXPECT_GT(ex.last_stats().busy(stream), 0.05);
  EXPECT_GT(ex.last_stats().busy(lanes::copy), 0.05);
}

}  // namespace
}  // namespace pm
