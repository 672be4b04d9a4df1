// The simulator against schedules worked out by hand, and against the PipeMoE closed form.
#include <gtest/gtest.h>

#include <cmath>

#include "core/error.h"

#include "sched/simulator.h"

namespace pm {
namespace {

// Durations carried in work.flops for these tests.
double from_flops(const Task& t) { return t.work.flops; }

Task task(const char* name, Lane lane, double seconds, std::vector<int> deps) {
  Task t;
  t.name = name;
  t.lane = lane;
  t.work.flops = seconds;
  t.deps = std::move(deps);
  return t;
}

TEST(Simulator, SequentialChainAddsUp) {
  TaskGraph g;
  int a = g.add(task("a", lanes::compute, 1, {}));
  int b = g.add(task("b", lanes::comm, 2, {a}));
  g.add(task("c", lanes::compute, 3, {b}));
  EXPECT_DOUBLE_EQ(simulate(g, from_flops).makespan_s, 6);
}

TEST(Simulator, IndependentLanesOverlapAndInterferenceStretchesTheOverlap) {
  TaskGraph g;
  g.add(task("x", lanes::compute, 4, {}));
  g.add(task("y", lanes::comm, 2, {}));
  EXPECT_DOUBLE_EQ(simulate(g, from_flops).makespan_s, 4);
  // both run at half speed while both are busy: y ends at 4, then x has 2 seconds of work left
  Simulation s = simulate(g, from_flops, {2.0, 2.0});
  EXPECT_DOUBLE_EQ(s.end_s[1], 4);
  EXPECT_DOUBLE_EQ(s.makespan_s, 6);
}

TEST(Simulator, LanePriorityIsInsertionOrder) {
  TaskGraph g;
  g.add(task("late-ready", lanes::compute, 1, {}));
  int first = g.add(task("comm", lanes::comm, 1, {}));
  g.add(task("after-comm", lanes::compute, 1, {first}));
  g.add(task("free", lanes::compute, 5, {}));
  Simulation s = simulate(g, from_flops);
  // at t=1 both "after-comm" and "free" are ready: the one added first runs first
  EXPECT_DOUBLE_EQ(s.start_s[2], 1);
  EXPECT_DOUBLE_EQ(s.start_s[3], 2);
}

// r chunks, dispatch then expert then combine on one link: PipeMoE's model says
// T(r) = max(2 r t_a, 2 t_a + r t_e) for dispatch-first ordering when no other tasks exist.
TEST(Simulator, MatchesPipeMoEClosedFormForAChunkedLayer) {
  for (int r : {2, 3, 4, 8})
    for (auto [ta, te] : {std::pair<double, double>{1.0, 0.3}, {0.3, 1.0}, {1.0, 1.0}}) {
      TaskGraph g;
      std::vector<int> dispatch, expert;
      for (int c = 0; c < r; ++c) dispatch.push_back(g.add(task("d", lanes::comm, ta, {})));
      for (int c = 0; c < r; ++c) {
        std::vector<int> deps = {dispatch[c]};
        if (c) deps.push_back(expert[c - 1]);
        expert.push_back(g.add(task("e", lanes::compute, te, deps)));
      }
      for (int c = 0; c < r; ++c) g.add(task("o", lanes::comm, ta, {expert[c]}));
      double expected = std::max(2 * r * ta, 2 * ta + r * te);
      EXPECT_NEAR(simulate(g, from_flops).makespan_s, expected, 1e-9) << "r=" << r << " ta=" << ta << " te=" << te;
    }
}

}  // namespace
}  // namespace pm

namespace pm {
namespace {

TEST(Simulator, HandOffDelaysOnlyTasksThatWaitForTheOtherLane) {
  TaskGraph g;
  int a = g.add(task("a", lanes::compute, 1, {}));
  int b = g.add(task("b", lanes::comm, 1, {a}));     // crosses lanes: starts at 1 + 0.25
  g.add(task("c", lanes::comm, 1, {b}));             // same lane: no hand-off
  g.add(task("d", lanes::compute, 1, {a}));          // same lane
  Simulation s = simulate(g, from_flops, {1.0, 1.0, 0.25});
  EXPECT_DOUBLE_EQ(s.start_s[1], 1.25);
  EXPECT_DOUBLE_EQ(s.start_s[2], 2.25);
  EXPECT_DOUBLE_EQ(s.start_s[3], 1.0);
  EXPECT_DOUBLE_EQ(s.makespan_s, 3.25);
}

TEST(Simulator, EveryCommunicationTaskPaysItsPerTaskCost) {
  TaskGraph g;
  int a = g.add(task("a", lanes::compute, 1, {}));
  int b = g.add(task("b", lanes::comm, 1, {a}));
  g.add(task("c", lanes::comm, 1, {b}));
  g.add(task("d", lanes::compute, 1, {a}));
  Interference f;
  f.comm_task_s = 0.5;
  Simulation s = simulate(g, from_flops, f);
  EXPECT_DOUBLE_EQ(s.end_s[1], 2.5);
  EXPECT_DOUBLE_EQ(s.end_s[2], 4.0);
  EXPECT_DOUBLE_EQ(s.end_s[3], 2.0) << "compute tasks do not pay it";
  EXPECT_DOUBLE_EQ(s.makespan_s, 4.0);
}

TEST(Simulator, InterferenceBelowOneOrADurationThatIsNotANumberIsRefusedWithAMessage) {
  // A profile once measured no interference sample and stored a factor of 0: the simulation then
  // stalled with "cannot make progress". Now it says what is wrong.
  TaskGraph g;
  g.add(task("x", lanes::compute, 1, {}));
  g.add(task("y", lanes::comm, 1, {}));
  try {
    simulate(g, from_flops, {0.0, 1.0});
    FAIL() << "a factor of 0 should be refused";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("interference factors"), std::string::npos) << e.what();
  }
  try {
    simulate(g, [](const Task&) { return std::nan(""); });
    FAIL() << "a NaN duration should be refused";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("predicted duration"), std::string::npos) << e.what();
  }
}

TEST(Simulator, ThreeLanesOverlapAndTheCommunicationLaneKeepsItsOrder) {
  TaskGraph g;
  int a = g.add(task("a", lanes::compute, 2, {}));
  g.add(task("first comm", lanes::comm, 1, {a}));   // waits for a
  g.add(task("second comm", lanes::comm, 1, {}));  // ready at once, but after "first comm"
  g.add(task("copy", lanes::copy, 3, {}));
  Simulation s = simulate(g, from_flops);
  EXPECT_DOUBLE_EQ(s.start_s[1], 2);
  EXPECT_DOUBLE_EQ(s.start_s[2], 3);
  EXPECT_DOUBLE_EQ(s.start_s[3], 0);
  EXPECT_DOUBLE_EQ(s.makespan_s, 4);
}

}  // namespace
}  // namespace pm
