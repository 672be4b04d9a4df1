// Profiles (format, validation, cluster checks), the planner and the degree choice.
#include <gtest/gtest.h>

#include <algorithm>

#include "core/error.h"
#include "moe/ep_graph.h"
#include "perf/degree_choice.h"
#include "perf/degree_tuner.h"
#include "perf/interference_fit.h"
#include "perf/perf_profile.h"
#include "perf/planner.h"
#include "sched/simulator.h"
#include "support/synthetic_profile.h"

namespace pm {
namespace {

const MoeShape kShape{2048, 512, 1024, 8, 2, 1.25, 2};

TEST(Profile, JsonRoundTripAndValidation) {
  PerfProfile p = synthetic_profile(8e-3, 100);
  p.interference = {1.3, 1.1, 20e-6};
  p.created = "2026-11-23T00:00:00Z";
  PerfProfile q = PerfProfile::from_json(p.to_json(), "test");
  EXPECT_EQ(q.cluster.world_size, 2);
  EXPECT_EQ(q.cluster.network, "test network");
  EXPECT_DOUBLE_EQ(q.interference.compute, 1.3);
  EXPECT_DOUBLE_EQ(q.interference.handoff_s, 20e-6);
  ASSERT_EQ(q.models.size(), p.models.size());
  for (const auto& [cost, m] : p.models) EXPECT_EQ(q.models.at(cost).coef, m.coef) << cost;

  auto error_of = [](const std::string& text) {
    try {
      PerfProfile::from_json(text, "f.json");
    } catch (const Error& e) {
      EXPECT_EQ(e.kind(), ErrorKind::usage);
      return std::string(e.what());
    }
    return std::string("no error");
  };
  EXPECT_NE(error_of("{not json").find("not JSON"), std::string::npos);
  EXPECT_NE(error_of("{\"format\": \"something else\"}").find("not a pipemoe profile"), std::string::npos);
  std::string text = p.to_json();
  std::string v2 = text;
  v2.replace(v2.find("\"version\": 1"), 12, "\"version\": 9");
  EXPECT_NE(error_of(v2).find("version 9"), std::string::npos);
  std::string negative = text;
  negative.replace(negative.find("\"fixed\": "), 9, "\"fixed\": -");
  EXPECT_NE(error_of(negative).find("negative"), std::string::npos);
  std::string missing = text;
  missing.replace(missing.find("\"cluster\""), 9, "\"clusterX\"");
  EXPECT_NE(error_of(missing).find("not a valid profile"), std::string::npos);
}

TEST(Profile, RefitInterferenceAndSelfCheckSurviveTheFileAndOldProfilesLoad) {
  PerfProfile p = synthetic_profile(8e-3, 100);
  p.interference = {1.4, 1.2, 20e-6, 1.5e-3};
  p.interference_measured = {1.3, 1.0, 20e-6, 0};
  p.self_check = {{2, 4, false, 0.125, 0.1}};
  PerfProfile q = PerfProfile::from_json(p.to_json(), "test");
  EXPECT_DOUBLE_EQ(q.interference.comm_task_s, 1.5e-3);
  EXPECT_DOUBLE_EQ(q.interference_measured.compute, 1.3);
  ASSERT_EQ(q.self_check.size(), 1u);
  EXPECT_EQ(q.self_check[0].degree, 4);
  EXPECT_FALSE(q.self_check[0].forward);
  EXPECT_DOUBLE_EQ(q.self_check[0].measured_s, 0.125);
  // a profile written before the refit: no per-task cost, and what it measured is what it plans with
  std::string old = p.to_json();
  old.replace(old.find("\"comm_task_s\""), 13, "\"unknown_key\"");
  old.replace(old.find("\"interference_measured\""), 23, "\"something_else_key___\"");
  PerfProfile r = PerfProfile::from_json(old, "old");
  EXPECT_EQ(r.interference.comm_task_s, 0.0);
  EXPECT_DOUBLE_EQ(r.interference_measured.compute, 1.4);
}

TEST(Planner, ReplanningKeepsTheCurrentDegreesUnlessClearlySlower) {
  LayerPlan plan = pick_degrees({{1, 10.0, 20.0}, {2, 8.0, 15.0}, {4, 8.2, 15.3}, {8, 9.0, 17.0}});
  ASSERT_EQ(plan.forward_degree, 2);
  ASSERT_EQ(plan.backward_degree, 2);
  LayerPlan kept = keep_current_within(plan, 4, 4, 0.05);  // 2.5% and 2% slower: kept
  EXPECT_EQ(kept.forward_degree, 4);
  EXPECT_EQ(kept.backward_degree, 4);
  EXPECT_DOUBLE_EQ(kept.forward_s, 8.2);
  LayerPlan moved = keep_current_within(plan, 8, 1, 0.05);  // 12.5% and 33% slower: re-planned
  EXPECT_EQ(moved.forward_degree, 2);
  EXPECT_EQ(moved.backward_degree, 2);
  LayerPlan unknown = keep_current_within(plan, 3, 16, 0.05);  // not a candidate: the plan's
  EXPECT_EQ(unknown.forward_degree, 2);
  EXPECT_EQ(unknown.backward_degree, 2);
}

// Passes simulated with known interference stand in for measured ones: the refit, started from no
// interference at all, finds parameters that predict them (and the degree-dependent cost).
TEST(InterferenceFit, RecoversWhatTheOverlappedPassesShow) {
  PerfProfile p = synthetic_profile(8e-3, 100);
  const Interference truth{1.3, 1.5, 10e-6, 2e-3};
  std::vector<TaskGraph> graphs;
  std::vector<OverlappedPass> passes;
  graphs.reserve(16);
  for (int r : {1, 2, 4, 8})
    for (bool forward : {true, false}) {
      graphs.emplace_back();
      if (forward)
        moe_strategy("ep").plan_forward(graphs.back(), {}, kShape, r);
      else
        moe_strategy("ep").plan_backward(graphs.back(), {}, kShape, r);
    }
  auto alone = [&](const Task& t) { return p.predict(t); };
  for (const TaskGraph& g : graphs) passes.push_back({&g, simulate(g, alone, truth).makespan_s});
  const InterferenceFit fit = fit_interference(passes, alone, {1.0, 1.0, 10e-6, 0});
  EXPECT_GT(fit.error_before, 0.05);
  EXPECT_LT(fit.error_after, 0.01);
  EXPECT_NEAR(fit.interference.comm_task_s, truth.comm_task_s, 0.5e-3);
  // never worse than where it started
  const InterferenceFit again = fit_interference(passes, alone, truth);
  EXPECT_LE(again.error_after, again.error_before);
}

TEST(Profile, ForeignClusterIsNamed) {
  ClusterInfo taken{2, 2, 1, "cpu A", "emulated: 2 hosts, 1gbit per link"};
  ClusterInfo here = taken;
  EXPECT_EQ(taken.mismatch(here), "");
  here.world_size = 4;
  here.network = "shared memory";
  std::string diff = taken.mismatch(here);
  EXPECT_NE(diff.find("2 ranks, not 4"), std::string::npos) << diff;
  EXPECT_NE(diff.find("network"), std::string::npos) << diff;
}

TEST(Planner, SlowLinkPipelinesAndFastLinkDoesNot) {
  // A slow link: communication is a large share; chunks overlap it with the GEMMs.
  LayerPlan slow = plan_layer(synthetic_profile(20e-3, 100), kShape, 0.0);
  EXPECT_GT(slow.forward_degree, 1);
  EXPECT_GT(slow.backward_degree, 1);
  for (const auto& c : slow.candidates) {
    EXPECT_GE(c.forward_s, slow.forward_s);
    EXPECT_GE(c.backward_s, slow.backward_s);
  }
  // A fast link and a large fixed cost per task: chunks only add fixed costs.
  LayerPlan fast = plan_layer(synthetic_profile(1e-6, 100, 5e-3), kShape);
  EXPECT_EQ(fast.forward_degree, 1);
  EXPECT_EQ(fast.backward_degree, 1);
  // Candidates stop at the capacity.
  EXPECT_EQ(candidate_degrees(5), (std::vector<int>{1, 2, 3, 4}));
}

// A deduplicated dispatch (moe/unique_rows.h) sends a peer each token with a choice among its
// experts once: the planner times the forward's dispatch with those rows, the rest as before.
TEST(Planner, ADeduplicatedDispatchIsPredictedWithTheRowsItSends) {
  MoeShape fine{2048, 512, 128, 64, 8, 0.0, 2};  // top-8 of 64 on 2 ranks: 4 choices a token on each
  const PassRows rows = balanced_rows(fine, 2);
  ASSERT_EQ(rows.chunk_dispatch_rows.size(), 2u);
  const int64_t all = rows.chunk_send_rows[0] + rows.chunk_send_rows[1];
  const int64_t unique = rows.chunk_dispatch_rows[0] + rows.chunk_dispatch_rows[1];
  EXPECT_EQ(all, 4 * 2048);
  // every token but those with none of 8 choices among 32 experts: 1 - C(32, 8) / C(64, 8)
  EXPECT_NEAR(static_cast<double>(unique), 2048 * (1 - 10518300.0 / 4426165368.0), 2.0);
  // top-2 of 8: 1 - (4/8)(3/7) of the tokens, against 1 row per token
  EXPECT_NEAR(static_cast<double>(balanced_rows(kShape, 1).chunk_dispatch_rows.at(0)), 2048 * (1 - 12.0 / 56), 2.0);
  MoeShape top1 = kShape, off = fine;
  top1.top_k = 1;
  off.dedup_dispatch = false;
  EXPECT_TRUE(balanced_rows(top1, 1).chunk_dispatch_rows.empty());
  EXPECT_TRUE(balanced_rows(off, 1).chunk_dispatch_rows.empty());

  // the backward's dispatch too, in float32 rows, where those take fewer bytes than the scaled rows
  EXPECT_EQ(rows.chunk_grad_dispatch_rows, rows.chunk_dispatch_rows);
  MoeShape fine_bf16 = fine, top2_bf16 = kShape;
  fine_bf16.precision = top2_bf16.precision = Precision::bf16;
  EXPECT_TRUE(scale_grad_dispatch_on_experts(fine) && scale_grad_dispatch_on_experts(fine_bf16));
  EXPECT_TRUE(scale_grad_dispatch_on_experts(kShape));      // fp32: 0.79 of the rows, 0.79 of the bytes
  EXPECT_FALSE(scale_grad_dispatch_on_experts(top2_bf16));  // bf16: 1.57x the bytes
  EXPECT_TRUE(balanced_rows(top2_bf16, 1).chunk_grad_dispatch_rows.empty());
  EXPECT_FALSE(balanced_rows(top2_bf16, 1).chunk_dispatch_rows.empty());
  EXPECT_FALSE(scale_grad_dispatch_on_experts(off) || scale_grad_dispatch_on_experts(top1));

  const PerfProfile slow = synthetic_profile(20e-3, 100);
  for (int degree : {1, 2})
    for (bool forward : {true, false})
      EXPECT_LT(predict_layer(slow, fine, degree, forward), predict_layer(slow, off, degree, forward)) << degree;
  MoeShape top2_bf16_off = top2_bf16;
  top2_bf16_off.dedup_dispatch = false;
  EXPECT_EQ(predict_layer(slow, top2_bf16, 1, false), predict_layer(slow, top2_bf16_off, 1, false));
}

TEST(Planner, PicksTheSmallestDegreeWithinTheTolerance) {
  PerfProfile profile = synthetic_profile(20e-3, 100);
  LayerPlan exact = plan_layer(profile, kShape, 0.0);
  for (double tolerance : {0.01, 0.05, 0.2}) {
    LayerPlan plan = plan_layer(profile, kShape, tolerance);
    EXPECT_LE(plan.forward_degree, exact.forward_degree);
    EXPECT_LE(plan.backward_degree, exact.backward_degree);
    EXPECT_LE(plan.forward_s, exact.forward_s * (1 + tolerance));
    EXPECT_LE(plan.backward_s, exact.backward_s * (1 + tolerance));
    // no smaller degree is within the tolerance
    for (const auto& c : plan.candidates) {
      if (c.degree < plan.forward_degree) {
        EXPECT_GT(c.forward_s, exact.forward_s * (1 + tolerance));
      }
      if (c.degree < plan.backward_degree) {
        EXPECT_GT(c.backward_s, exact.backward_s * (1 + tolerance));
      }
    }
  }
}

TEST(Planner, InterferenceMakesOverlapWorthLess) {
  PerfProfile p = synthetic_profile(10e-3, 100);
  double free_overlap = predict_layer(p, kShape, 4, true);
  p.interference = {1.5, 1.2, 0};
  double costly = predict_layer(p, kShape, 4, true);
  EXPECT_GT(costly, free_overlap);
  EXPECT_GT(predict_layer(p, kShape, 1, true), 0);
}

// ScMoE's window: the layer's experts behind `slot` dense tasks beside the dispatch.
TEST(WindowPlanner, WithoutDenseWorkItIsTheLayer) {
  PerfProfile p = synthetic_profile(10e-3, 100);
  for (int r : {1, 4})
    for (bool forward : {true, false})
      EXPECT_NEAR(predict_window(p, kShape, r, 0, {}, forward), predict_layer(p, kShape, r, forward), 1e-9);
}

TEST(WindowPlanner, DenseWorkHidesTheAllToAll) {
  PerfProfile p = synthetic_profile(30e-3, 100);
  TaskGraph alone;
  moe_strategy("ep").plan_forward(alone, {}, kShape, 1);
  Simulation s = simulate(alone, [&](const Task& t) { return p.predict(t); });
  const double layer_compute = s.busy(lanes::compute), comm = s.busy(lanes::comm);
  ASSERT_GT(comm, layer_compute);  // the layer alone waits for its all-to-alls
  // four dense tasks, together twice the communication
  const std::vector<double> dense(4, comm / 2);
  const double serial = 4 * (comm / 2) + layer_compute;  // nothing can be faster than the compute lane's work
  WindowPlan plan = plan_window(p, kShape, dense, true, 0.0);
  EXPECT_GE(plan.predicted_s, serial * (1 - 1e-9));
  EXPECT_LT(plan.predicted_s, serial * 1.02) << "the all-to-alls hide behind the dense tasks";
  // the slot matters: every dense task before the experts leaves the combine exposed (a free
  // lane takes its earliest-added ready task, so dense tasks after the experts still fill the
  // dispatch's window: slot 0 exposes nothing here)
  EXPECT_LT(plan.slot, 4);
  EXPECT_GT(predict_window(p, kShape, plan.degree, 4, dense, true), plan.predicted_s * 1.05);
  EXPECT_LT(predict_window(p, kShape, plan.degree, 0, dense, true), serial * 1.02);
}

TEST(WindowPlanner, ThePlanIsTheShortestWindowAtTheSmallestDegreeWithinTolerance) {
  PerfProfile p = synthetic_profile(20e-3, 100);
  const std::vector<double> dense = {4e-3, 9e-3, 2e-3};
  for (bool forward : {true, false})
    for (double tolerance : {0.0, 0.05}) {
      WindowPlan plan = plan_window(p, kShape, dense, forward, tolerance);
      double fastest = 1e30;
      for (int r : candidate_degrees(kShape.capacity()))
        for (int slot = 0; slot <= 3; ++slot) fastest = std::min(fastest, predict_window(p, kShape, r, slot, dense, forward));
      EXPECT_LE(plan.predicted_s, fastest * (1 + tolerance));
      EXPECT_DOUBLE_EQ(plan.predicted_s, predict_window(p, kShape, plan.degree, plan.slot, dense, forward));
      for (int r : candidate_degrees(kShape.capacity())) {
        if (r >= plan.degree) continue;
        for (int slot = 0; slot <= 3; ++slot) {
          EXPECT_GT(predict_window(p, kShape, r, slot, dense, forward), fastest * (1 + tolerance));
        }
      }
    }
  EXPECT_THROW(predict_window(p, kShape, 1, 4, dense, true), Error);
}

TEST(DegreeChoice, FixedAutoAndRefined) {
  EXPECT_EQ(parse_degree("4", "--degree"), 4);
  EXPECT_EQ(parse_degree("auto", "--degree"), 0);
  EXPECT_THROW(parse_degree("0", "--degree"), Error);
  EXPECT_THROW(parse_degree("4x", "--degree"), Error);
  int calls = 0;
  auto never = [&](int, int) { ++calls; return std::make_pair(1.0, 1.0); };
  DegreeChoice fixed = choose_degrees(3, 2, nullptr, kShape, 0, never);
  EXPECT_EQ(fixed.forward, 3);
  EXPECT_EQ(fixed.backward, 2);
  EXPECT_EQ(calls, 0);

  PerfProfile p = synthetic_profile(20e-3, 100);
  DegreeChoice planned = choose_degrees(0, 0, &p, kShape, 0, never);
  EXPECT_EQ(planned.forward, planned.planned_forward);
  EXPECT_FALSE(planned.measured);
  EXPECT_EQ(calls, 0);

  // Refinement times the planner's pick and its next best two, in 3 interleaved rounds, and keeps
  // the fastest median (here: smaller degrees are made faster whatever the model says).
  std::vector<int> order;
  auto prefer_small = [&](int f, int b) {
    ++calls;
    order.push_back(f);
    return std::make_pair(1.0 + 0.1 * f, 1.0 + 0.1 * b);
  };
  DegreeChoice refined = choose_degrees(0, 0, &p, kShape, 3, prefer_small);
  EXPECT_TRUE(refined.measured);
  EXPECT_EQ(calls, 12);  // one untimed pass at each, then 3 rounds
  ASSERT_EQ(order.size(), 12u);
  EXPECT_EQ(order[0], planned.forward);  // the planner's pick comes first
  EXPECT_EQ(order[3], planned.forward);
  for (int round = 1; round < 4; ++round) {  // every round times the same candidates, from another one
    EXPECT_TRUE(std::is_permutation(order.begin(), order.begin() + 3, order.begin() + 3 * round));
    if (round > 1) {
      EXPECT_NE(order[3 * round], order[3 * (round - 1)]);
    }
  }
  EXPECT_EQ(refined.forward, *std::min_element(order.begin(), order.end()));

  // A noisy pass does not decide: the median of the rounds does; nor does the untimed first pass
  // at each candidate, however slow.
  calls = 0;
  auto one_slow_pass = [&](int f, int b) {
    ++calls;
    double t = 1.0 + 0.1 * f;
    if (calls == 4) t = 100;  // the planner's pick, first timed round: a hiccup of the host
    if (calls <= 3 && f == *std::min_element(order.begin(), order.end())) t = 1000;  // its first pass
    return std::make_pair(t, 1.0 + 0.1 * b);
  };
  DegreeChoice robust = choose_degrees(0, 0, &p, kShape, 3, one_slow_pass);
  EXPECT_EQ(robust.forward, refined.forward);

  // Without a profile every candidate is timed.
  calls = 0;
  DegreeChoice online = choose_degrees(0, 0, nullptr, kShape, 0, prefer_small);
  EXPECT_EQ(online.forward, 1);
  EXPECT_EQ(calls, 4 * static_cast<int>(candidate_degrees(640).size()));

  // Within 1% of the fastest (kPlanTolerance), the fewest chunks win; 2% apart, the fastest does.
  for (const double gap : {0.005, 0.02}) {
    auto more_chunks_slightly_faster = [&](int f, int b) {
      return std::make_pair(f >= 4 ? 1.0 : 1.0 + gap, b >= 8 ? 1.0 : 1.0 + gap);
    };
    DegreeChoice close = choose_degrees(0, 0, nullptr, kShape, 0, more_chunks_slightly_faster);
    EXPECT_EQ(close.forward, gap < kPlanTolerance ? 1 : 4) << gap;
    EXPECT_EQ(close.backward, gap < kPlanTolerance ? 1 : 8) << gap;
  }
}

// A plan with these predicted seconds per degree (forward, backward).
LayerPlan plan_of(const std::vector<std::tuple<int, double, double>>& times) {
  std::vector<DegreePrediction> c;
  for (auto [d, f, b] : times) c.push_back({d, f, b});
  return pick_degrees(c);
}

TEST(DegreeTuner, CandidatesAreTheCurrentThenThePlannersClosest) {
  const LayerPlan plan = plan_of({{1, 1.00, 2.0}, {2, 1.05, 1.9}, {4, 1.10, 1.8}, {8, 1.40, 1.81}});
  EXPECT_EQ(tune_candidates(plan, true, 1, 0.15, 3), (std::vector<int>{1, 2, 4}));
  EXPECT_EQ(tune_candidates(plan, true, 8, 0.15, 3), (std::vector<int>{8, 1, 2}));  // the current first
  EXPECT_EQ(tune_candidates(plan, true, 1, 0.02, 3), (std::vector<int>{1}));      // nothing close
  EXPECT_EQ(tune_candidates(plan, false, 4, 0.15, 3), (std::vector<int>{4, 8, 2}));
  // each round runs every candidate once: 3 rounds of (1.05 - 1.00) + (1.10 - 1.00) forward
  EXPECT_NEAR(predicted_tuning_cost_s(plan, {1, 2, 4}, {4}, 3), 3 * 0.15, 1e-12);
  // each trial of a candidate other than the first charged at least 10% of the fastest: 2 x 0.1
  // forward per round (its gaps 0.05 and 0.10 become 0.10 and 0.10), the backward's first free
  EXPECT_NEAR(predicted_tuning_cost_s(plan, {1, 2, 4}, {4}, 3, 0.10), 3 * 0.20, 1e-12);
  EXPECT_NEAR(predicted_tuning_cost_s(plan, {1}, {4, 8}, 1, 0.10), 0.18, 1e-12);  // 8: gap 0.01, floor 0.18
}

TEST(DegreeTuner, InterleavedRoundsFindTheFastestThroughDrift) {
  DegreeTuner tuner(3);
  tuner.start(7, {2, 1, 4}, {1, 8});
  EXPECT_TRUE(tuner.tuning(7));
  EXPECT_EQ(tuner.steps_per_tuning(7), 9);  // 3 rounds of max(3, 2) steps
  // true seconds: forward 4 fastest, backward 8; the host slows down 20% per round, and one
  // trial of the slowest forward degree is a hiccup that must not matter
  std::map<int, double> fwd = {{1, 1.2}, {2, 1.1}, {4, 1.0}}, bwd = {{1, 2.0}, {8, 1.5}};
  std::vector<std::pair<int, int>> ran;
  DegreeTuner::Decision decided;
  bool done = false;
  for (int step = 0; step < 9; ++step) {
    ASSERT_FALSE(done);
    const auto [f, b] = tuner.next(7);
    ran.push_back({f, b});
    const double drift = 1 + 0.2 * (step / 3);
    done = tuner.record(7, fwd.at(f) * drift * (step == 1 ? 5 : 1), bwd.at(b) * drift, decided);
  }
  ASSERT_TRUE(done);
  EXPECT_FALSE(tuner.tuning(7));
  EXPECT_EQ(decided.forward, 4);
  EXPECT_EQ(decided.backward, 8);
  EXPECT_EQ(decided.forward_s.size(), 3u);
  // every round runs each forward candidate once, each round starting at another
  for (int round = 0; round < 3; ++round) {
    std::vector<int> f;
    for (int s = 0; s < 3; ++s) f.push_back(ran[3 * round + s].first);
    std::sort(f.begin(), f.end());
    EXPECT_EQ(f, (std::vector<int>{1, 2, 4})) << round;
  }
  EXPECT_NE(ran[0].first, ran[3].first);
  EXPECT_EQ(ran[2].second, 1);  // past the backward's two candidates: its first, untimed
  EXPECT_GT(tuner.spent_s(), 0.0);  // the slower candidates' trials cost time
}

}  // namespace
}  // namespace pm
