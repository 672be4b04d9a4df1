// Pipeline parallelism without ranks: the 1F1B and GPipe orders, the bubble they leave, and the
// tp x dp x pp layout's numbering and stage split.
#include <gtest/gtest.h>

#include <algorithm>
#include <set>

#include "core/error.h"
#include "model/parallel_layout.h"
#include "model/pipeline_schedule.h"
#include "model/stage_split.h"

namespace pm {
namespace {

std::string order(const std::vector<PipelineOp>& ops) {
  std::string s;
  // appended piece by piece: `"F" + std::to_string(...)` made GCC 12 warn of an overlapping memcpy
  // that cannot happen (-Wrestrict, a known false positive)
  for (const PipelineOp& op : ops) s.append(op.forward ? "F" : "B").append(std::to_string(op.micro_batch)).append(" ");
  return s;
}

TEST(PipelineSchedule, OneFOneBWarmsUpThenAlternates) {
  EXPECT_EQ(order(pipeline_ops(PipelineSchedule::one_f_one_b, 0, 2, 4)), "F0 F1 B0 F2 B1 F3 B2 B3 ");
  EXPECT_EQ(order(pipeline_ops(PipelineSchedule::one_f_one_b, 1, 2, 4)), "F0 B0 F1 B1 F2 B2 F3 B3 ");
  EXPECT_EQ(order(pipeline_ops(PipelineSchedule::one_f_one_b, 0, 4, 4)), "F0 F1 F2 F3 B0 B1 B2 B3 ");
  EXPECT_EQ(order(pipeline_ops(PipelineSchedule::one_f_one_b, 0, 1, 3)), "F0 B0 F1 B1 F2 B2 ");  // accumulation
  EXPECT_EQ(order(pipeline_ops(PipelineSchedule::gpipe, 1, 2, 3)), "F0 F1 F2 B0 B1 B2 ");
}

TEST(PipelineSchedule, EveryPassOnceForwardBeforeBackwardAndFewInFlight) {
  for (PipelineSchedule schedule : {PipelineSchedule::one_f_one_b, PipelineSchedule::gpipe})
    for (int S = 1; S <= 5; ++S)
      for (int M = 1; M <= 9; ++M)
        for (int s = 0; s < S; ++s) {
          std::set<int> in_flight, forwarded, backwarded;
          std::size_t most = 0;
          for (const PipelineOp& op : pipeline_ops(schedule, s, S, M)) {
            if (op.forward) {
              EXPECT_TRUE(forwarded.insert(op.micro_batch).second);
              in_flight.insert(op.micro_batch);
            } else {
              EXPECT_TRUE(in_flight.erase(op.micro_batch)) << "backward before forward";
              EXPECT_TRUE(backwarded.insert(op.micro_batch).second);
            }
            most = std::max(most, in_flight.size());
          }
          EXPECT_EQ(static_cast<int>(forwarded.size()), M);
          EXPECT_EQ(static_cast<int>(backwarded.size()), M);
          // 1F1B holds at most S - s micro-batches' activations, GPipe all M
          if (schedule == PipelineSchedule::one_f_one_b) {
            EXPECT_LE(static_cast<int>(most), std::min(S - s, M));
          }
        }
}

TEST(PipelineSchedule, SimulatedStepLeavesTheFormulasBubble) {
  for (int S = 1; S <= 4; ++S)
    for (int M : {1, 2, 4, 8}) {
      if (M < S) continue;
      const double tf = 1.0, tb = 2.0;
      for (PipelineSchedule schedule : {PipelineSchedule::one_f_one_b, PipelineSchedule::gpipe}) {
        const double step = simulate_pipeline(schedule, S, M, tf, tb);
        EXPECT_DOUBLE_EQ(step, (M + S - 1) * (tf + tb)) << "S " << S << " M " << M;
        // every stage computes M (tf + tb); the rest of the step is bubble
        EXPECT_NEAR(1.0 - M * (tf + tb) / step, pipeline_bubble_formula(S, M), 1e-12);
      }
    }
  EXPECT_THROW(parse_pipeline_schedule("zero-bubble", "pipeline_schedule"), Error);
}

TEST(ParallelLayout, MegatronNumberingAndAnEvenSplitOfTheBlocks) {
  ParallelLayout l = ParallelLayout::make(8, 2, 2, 5);
  EXPECT_EQ(l.dp, 2);
  // rank = tp_rank + tp * (dp_rank + dp * stage)
  for (int r = 0; r < 8; ++r) EXPECT_EQ(l.rank_at(l.tp_rank(r), l.dp_rank(r), l.stage(r)), r);
  EXPECT_EQ(l.stage(3), 0);
  EXPECT_EQ(l.stage(4), 1);
  EXPECT_EQ(l.tp_rank(5), 1);
  EXPECT_EQ(l.dp_rank(6), 1);
  EXPECT_EQ(l.first_block(0), 0);
  EXPECT_EQ(l.end_block(0), 2);  // 5 blocks over 2 stages: 2 and 3
  EXPECT_EQ(l.end_block(1), 5);
  EXPECT_EQ(l.table().size(), 9u);
  EXPECT_THROW(ParallelLayout::make(4, 2, 3, 8), Error);  // does not divide the ranks
  EXPECT_THROW(ParallelLayout::make(4, 1, 4, 3), Error);  // more stages than blocks
}

TEST(StageSplit, EvenCostOrWrittenOut) {
  ModelConfig m;  // 8 blocks, MoE every second one (1, 3, 5, 7)
  m.layers = 8, m.d_model = 256, m.mlp_hidden = 1024, m.expert_hidden = 1024, m.experts = 8, m.top_k = 2;
  EXPECT_EQ(stage_starts(m, 2048, 4, "even"), (std::vector<int>{0, 2, 4, 6, 8}));
  EXPECT_EQ(stage_starts(m, 2048, 2, "3,5"), (std::vector<int>{0, 3, 8}));
  // cost: the most expensive stage as cheap as any split makes it
  auto worst = [&](const std::vector<int>& starts, int vocab) {
    double most = 0;
    for (std::size_t s = 0; s + 1 < starts.size(); ++s) {
      double c = s + 2 == starts.size() ? head_cost(m, vocab) : 0.0;
      for (int l = starts[s]; l < starts[s + 1]; ++l) c += block_cost(m, l);
      most = std::max(most, c);
    }
    return most;
  };
  for (int vocab : {2048, 50000})
    for (int pp : {2, 3, 4}) {
      const std::vector<int> cost = stage_starts(m, vocab, pp, "cost");
      EXPECT_LE(worst(cost, vocab), worst(stage_starts(m, vocab, pp, "even"), vocab));
      // against every split written out (pp 2: all 7 of them)
      if (pp == 2) {
        for (int first = 1; first < 8; ++first)
          EXPECT_LE(worst(cost, vocab), worst({0, first, 8}, vocab) + 1e-6) << "vocab " << vocab << " split " << first;
      }
    }
  // a large vocabulary's head leaves the last stage fewer blocks
  EXPECT_GT(stage_starts(m, 50000, 2, "cost")[1], stage_starts(m, 2048, 2, "cost")[1]);
  EXPECT_THROW(stage_starts(m, 2048, 2, "3,4"), Error);  // 7 blocks of 8
  EXPECT_THROW(stage_starts(m, 2048, 2, "8,0"), Error);
  EXPECT_THROW(stage_starts(m, 2048, 2, "balanced"), Error);
  EXPECT_THROW(stage_starts(m, 2048, 9, "even"), Error);
}

}  // namespace
}  // namespace pm
