// Capacity, slot filling order, and the chunk layouts the pipeline moves rows through.
#include <gtest/gtest.h>

#include <bit>
#include <cmath>
#include <algorithm>
#include <numeric>
#include <random>
#include <set>
#include <tuple>

#include "core/error.h"
#include "core/rng.h"
#include "moe/gate.h"
#include "moe/routing.h"
#include "moe/unique_rows.h"

namespace pm {
namespace {

TEST(Capacity, CeilOfKFTOverE) {
  EXPECT_EQ(expert_capacity(2, 1.25, 2048, 8), 640);
  EXPECT_EQ(expert_capacity(1, 1.0, 10, 4), 3);
  EXPECT_EQ(expert_capacity(2, 0.5, 7, 8), 1);
}

TEST(Slots, FillChoiceByChoiceThenTokenByTokenAndDropWhenFull) {
  Routing r;
  r.tokens = 4;
  r.experts = 2;
  r.top_k = 2;
  r.capacity = 3;
  // token: (first, second) choice
  r.expert = {0, 1, 0, 1, 0, 1, 1, 0};
  assign_slots(r);
  // first choices in token order: t0->e0 s0, t1->e0 s1, t2->e0 s2, t3->e1 s0
  // second choices: t0->e1 s1, t1->e1 s2, t2->e1 full (dropped), t3->e0 full (dropped)
  EXPECT_EQ(r.slot, (std::vector<int32_t>{0, 1, 1, 2, 2, -1, 0, -1}));
  EXPECT_EQ(r.count, (std::vector<int64_t>{3, 3}));
  EXPECT_EQ(r.kept(), 6);
}

// Megatron-Core's "probs" drop policy: a full expert keeps its largest gate values (equal ones in
// filling order) and gives the kept their slots in filling order; an expert within its capacity
// keeps all, as the position policy does.
TEST(Slots, TheProbsPolicyDropsTheSmallestGateValuesAndKeepsTheFillingOrder) {
  Routing r;
  r.tokens = 4, r.experts = 3, r.top_k = 2, r.capacity = 2;
  r.expert = {0, 1, 0, 2, 0, 1, 1, 0};
  // expert 0 is asked by t0 j0 (0.5), t1 j0 (0.4), t2 j0 (0.3), t3 j1 (0.45): keeps t0, t3 (0.5, 0.45)
  // expert 1 by t0 j1 (0.2), t2 j1 (0.2), t3 j0 (0.2): all equal, keeps the first two in filling
  // order: t3 j0 (a first choice), then t0 j1; expert 2 by t1 j1 only
  const std::vector<float> gate = {0.5f, 0.2f, 0.4f, 0.6f, 0.3f, 0.2f, 0.2f, 0.45f};
  assign_slots(r, DropPolicy::probs, gate.data());
  // filling order: t0 j0 -> e0 s0, t1 j0 dropped, t2 j0 dropped, t3 j0 -> e1 s0, t0 j1 -> e1 s1,
  // t1 j1 -> e2 s0, t2 j1 dropped, t3 j1 -> e0 s1
  EXPECT_EQ(r.slot, (std::vector<int32_t>{0, 1, -1, 0, -1, -1, 0, 1}));
  EXPECT_EQ(r.count, (std::vector<int64_t>{2, 2, 1}));
  Routing position = r;
  assign_slots(position);
  EXPECT_NE(position.slot, r.slot);
  r.capacity = 4;  // no expert over its capacity: the same slots as the position policy
  position.capacity = 4;
  assign_slots(r, DropPolicy::probs, gate.data());
  assign_slots(position);
  EXPECT_EQ(r.slot, position.slot);
}

TEST(BalanceBias, CountsEveryChoiceAndMovesTheBiasAgainstTheLoad) {
  Routing r;
  r.tokens = 3;
  r.experts = 4;
  r.top_k = 2;
  r.expert = {0, 1, 0, 2, 0, 1};
  r.slot = {0, 0, -1, 0, -1, 1};  // dropped choices are load the router asked for, counted too
  std::vector<double> load(4, 0.0);
  add_expert_load(r, load.data());
  EXPECT_EQ(load, (std::vector<double>{3, 2, 1, 0}));  // mean 1.5
  std::vector<float> bias{0.5f, 0.0f, 0.0f, -0.25f};
  update_balance_bias(bias.data(), load.data(), 4, 0.125);
  EXPECT_EQ(bias, (std::vector<float>{0.375f, -0.125f, 0.125f, -0.125f}));
  std::vector<double> even(4, 2.0);  // balanced: nothing moves
  update_balance_bias(bias.data(), even.data(), 4, 0.125);
  EXPECT_EQ(bias, (std::vector<float>{0.375f, -0.125f, 0.125f, -0.125f}));
}

// Inference skips the router's losses and nothing else: the same choices, slots, gate values and
// scores as a training pass, softmax or sigmoid, with a selection bias or not; the losses it did
// not compute are NaN, and a backward of such a pass is refused.
TEST(Gate, InferenceSkipsTheLossesAndRoutesTheSame) {
  MoeShape shape;
  shape.tokens = 37, shape.model_dim = 24, shape.hidden = 8, shape.experts = 16, shape.top_k = 4;
  shape.capacity_factor = 0;
  Rng rng(3, 0);
  std::vector<float> x(shape.tokens * shape.model_dim), wg(shape.model_dim * shape.experts), bias(shape.experts);
  rng.fill_uniform(x.data(), static_cast<int64_t>(x.size()), -1.0f, 1.0f);
  rng.fill_uniform(wg.data(), static_cast<int64_t>(wg.size()), -0.5f, 0.5f);
  rng.fill_uniform(bias.data(), shape.experts, -0.05f, 0.05f);
  for (RouterScore score : {RouterScore::softmax, RouterScore::sigmoid}) {
    for (bool balance : {false, true}) {
      shape.router_score = score;
      shape.balance_bias = balance;
      const float* b = balance ? bias.data() : nullptr;
      const Gating train = gate_forward(cpu_backend(), x.data(), wg.data(), shape.tokens, shape, b);
      const Gating infer =
          gate_forward(cpu_backend(), x.data(), wg.data(), shape.tokens, shape, b, RouterLosses::skip);
      EXPECT_EQ(infer.routing.expert, train.routing.expert);
      EXPECT_EQ(infer.routing.slot, train.routing.slot);
      EXPECT_EQ(infer.gate, train.gate);
      EXPECT_EQ(std::vector<float>(infer.probs.begin(), infer.probs.end()),
                std::vector<float>(train.probs.begin(), train.probs.end()));
      EXPECT_TRUE(std::isfinite(train.aux_loss) && std::isfinite(train.z_loss()));
      EXPECT_TRUE(std::isnan(infer.aux_loss) && std::isnan(infer.z_loss()));
      std::vector<float> dgate(shape.tokens * shape.top_k, 1.0f), dwg(wg.size()), dx(x.size());
      EXPECT_ANY_THROW(gate_backward(cpu_backend(), x.data(), wg.data(), shape, infer, dgate.data(), {0.01f, 0.001f},
                                     dwg.data(), dx.data()));
    }
  }
}

// Group-limited routing (DeepSeek-V3's n_group, topk_group), checked against a plain reading of
// the rule: each group scored by the sum of its two best selection scores (its one score for
// groups of one), the route_top_groups best groups (ties to the lower group), then top-k among their
// experts by the plain gate run on scores with every other expert at -inf. Scores drawn from a few
// values, so that groups and experts tie; softmax and sigmoid, with a bias or not.
TEST(Gate, GroupLimitedRoutingChoosesWithinTheBestGroups) {
  struct Case {
    int experts, groups, top_groups, top_k;
  };
  for (const Case cs : {Case{16, 4, 2, 4}, Case{16, 8, 3, 6}, Case{12, 3, 1, 4}, Case{8, 8, 2, 2}, Case{16, 4, 4, 3}}) {
    MoeShape shape;
    shape.tokens = 61, shape.model_dim = 6, shape.hidden = 4, shape.experts = cs.experts, shape.top_k = cs.top_k;
    shape.capacity_factor = 0;
    shape.route_groups = cs.groups, shape.route_top_groups = cs.top_groups;
    shape.validate();
    Rng rng(5, cs.experts * 10 + cs.groups);
    std::vector<float> x(shape.tokens * shape.model_dim), wg(shape.model_dim * shape.experts), bias(shape.experts);
    for (float& v : x) v = static_cast<float>(rng.next_u64() % 3) - 1.0f;  // few distinct logits: ties
    for (float& v : wg) v = static_cast<float>(rng.next_u64() % 3) * 0.5f;
    for (float& v : bias) v = static_cast<float>(rng.next_u64() % 2) * 0.25f;
    for (RouterScore score : {RouterScore::softmax, RouterScore::sigmoid})
      for (bool balance : {false, true}) {
        shape.router_score = score, shape.balance_bias = balance;
        const std::string where = fmt::format("{} groups {} of {} k {} {} bias {}", cs.experts, cs.top_groups,
                                              cs.groups, cs.top_k, score == RouterScore::sigmoid ? "sigmoid" : "softmax",
                                              balance);
        const float* b = balance ? bias.data() : nullptr;
        const Gating g = gate_forward(cpu_backend(), x.data(), wg.data(), shape.tokens, shape, b);
        const int E = cs.experts, per = E / cs.groups;
        for (int64_t t = 0; t < shape.tokens; ++t) {
          std::vector<float> sel(E);
          for (int e = 0; e < E; ++e) sel[e] = g.probs[t * E + e] + (b ? b[e] : 0.0f);
          std::vector<std::pair<float, int>> groups;  // (score, group), best first, ties to the lower group
          for (int q = 0; q < cs.groups; ++q) {
            std::vector<float> in(sel.begin() + q * per, sel.begin() + (q + 1) * per);
            std::sort(in.rbegin(), in.rend());
            groups.push_back({per == 1 ? in[0] : in[0] + in[1], q});
          }
          std::stable_sort(groups.begin(), groups.end(), [](auto& l, auto& r) { return l.first > r.first; });
          std::vector<int> order;  // allowed experts by score, ties to the lower index
          for (int j = 0; j < cs.top_groups; ++j)
            for (int e = groups[j].second * per; e < (groups[j].second + 1) * per; ++e) order.push_back(e);
          std::sort(order.begin(), order.end());
          std::stable_sort(order.begin(), order.end(), [&](int l, int r) { return sel[l] > sel[r]; });
          for (int j = 0; j < cs.top_k; ++j) {
            ASSERT_EQ(g.routing.expert[t * cs.top_k + j], order[j]) << where << " token " << t << " choice " << j;
            // the gate values stay the probabilities (normalised over the chosen)
            EXPECT_GT(g.gate[t * cs.top_k + j], 0.0f) << where;
          }
        }
      }
  }
}

// The chance that a token reaches a rank, which decides the backward's scaled dispatch: the
// formula (and its average over ranks whose experts cut groups differently) against counting
// every choice of groups and of k experts among theirs.
TEST(UniqueRows, TheChanceATokenReachesARankCountsItsAllowedGroups) {
  struct Case {
    int experts, ranks, top_k, groups, top_groups;
  };
  for (const Case cs : {Case{8, 2, 2, 1, 0}, Case{12, 4, 3, 3, 2}, Case{12, 3, 2, 4, 2}, Case{8, 4, 3, 4, 2},
                        Case{10, 2, 2, 5, 3}, Case{12, 2, 4, 6, 6}}) {
    MoeShape s;
    s.tokens = 1, s.model_dim = 1, s.hidden = 1, s.experts = cs.experts, s.ranks = cs.ranks, s.top_k = cs.top_k;
    s.route_groups = cs.groups, s.route_top_groups = cs.top_groups;
    s.validate();
    const int E = cs.experts, L = E / cs.ranks;
    const int G = s.group_limited() ? cs.groups : 1, K = s.group_limited() ? cs.top_groups : 1, per = E / G;
    double reach_sum = 0;
    for (int r = 0; r < cs.ranks; ++r) {
      int64_t draws = 0, reached = 0;
      for (uint32_t gs = 0; gs < (1u << G); ++gs) {
        if (std::popcount(gs) != K) continue;
        std::vector<int> allowed;
        for (int e = 0; e < E; ++e)
          if (gs >> (e / per) & 1) allowed.push_back(e);
        const int A = static_cast<int>(allowed.size());
        for (uint32_t es = 0; es < (1u << A); ++es) {
          if (std::popcount(es) != cs.top_k) continue;
          bool hit = false;
          for (int i = 0; i < A; ++i) hit |= (es >> i & 1) && allowed[i] / L == r;
          ++draws;
          reached += hit;
        }
      }
      reach_sum += static_cast<double>(reached) / static_cast<double>(draws);
    }
    EXPECT_NEAR(chance_token_reaches_rank(s), reach_sum / cs.ranks, 1e-12)
        << cs.experts << " experts on " << cs.ranks << " ranks, top-" << cs.top_k << ", groups " << cs.top_groups
        << " of " << cs.groups;
  }
  // DeepSeek's shape on 4 ranks: without the limit the float32 rows would save too little; with a
  // token on at most 2 ranks' groups they save half
  MoeShape s;
  s.tokens = 1, s.model_dim = 1, s.hidden = 1, s.experts = 64, s.ranks = 4, s.top_k = 8;
  s.precision = Precision::bf16;
  EXPECT_FALSE(scaled_dispatch_pays(s));
  s.route_groups = 4, s.route_top_groups = 2;
  EXPECT_TRUE(scaled_dispatch_pays(s));
}

TEST(Layout, ChunksAreEvenUpToTwoThenTaperedAtBothEnds) {
  // degree 1 and 2: even; from 3 on the first and last chunks are half the others
  EXPECT_EQ(chunk_begin(100, 2, 1), 50);
  EXPECT_EQ(chunk_begin(100, 3, 1), 25);
  EXPECT_EQ(chunk_begin(100, 3, 2), 75);
  std::vector<int64_t> sizes;
  for (int c = 0; c < 5; ++c) sizes.push_back(chunk_begin(800, 5, c + 1) - chunk_begin(800, 5, c));
  EXPECT_EQ(sizes, (std::vector<int64_t>{100, 200, 200, 200, 100}));
  for (int degree = 1; degree <= 16; ++degree)
    for (int64_t rows : {0, 1, 7, 100, 1001}) {
      EXPECT_EQ(chunk_begin(rows, degree, 0), 0);
      EXPECT_EQ(chunk_begin(rows, degree, degree), rows);
      for (int c = 0; c < degree; ++c) EXPECT_LE(chunk_begin(rows, degree, c), chunk_begin(rows, degree, c + 1));
    }
}

TEST(Layout, EveryRowHasOnePlaceAndEveryChunkItsRows) {
  const int peers = 3, local = 2;
  std::vector<int64_t> filled = {5, 0, 7, 1, 3, 9};
  for (int degree : {1, 2, 3, 4, 6}) {
    for (BlockOrder order : {BlockOrder::wire, BlockOrder::compute}) {
      BlockLayout l = make_block_layout(filled, peers, local, degree, order);
      for (int c = 0; c < degree; ++c)
        for (int q = 0; q < peers; ++q)
          for (int le = 0; le < local; ++le) {
            int64_t n = filled[q * local + le];
            EXPECT_EQ(l.block_rows(c, q, le), chunk_begin(n, degree, c + 1) - chunk_begin(n, degree, c));
          }
      EXPECT_EQ(l.total_rows, 25);
      std::set<int64_t> seen;
      for (int q = 0; q < peers; ++q)
        for (int le = 0; le < local; ++le)
          for (int64_t i = 0; i < filled[q * local + le]; ++i) seen.insert(l.position(q, le, i));
      EXPECT_EQ(seen.size(), 25u);
      EXPECT_EQ(*seen.rbegin(), 24);
      // a run of rows' positions at once: each row's own, across chunk boundaries
      for (int q = 0; q < peers; ++q)
        for (int le = 0; le < local; ++le) {
          const int64_t n = filled[q * local + le];
          for (int64_t first = 0; first <= n; ++first)
            for (int64_t count = 0; first + count <= n; ++count) {
              std::vector<int64_t> run = {-7}, one_by_one = {-7};  // appended after what is there
              l.append_positions(q, le, first, count, run);
              for (int64_t i = first; i < first + count; ++i) one_by_one.push_back(l.position(q, le, i));
              EXPECT_EQ(run, one_by_one) << "degree " << degree << " block " << q << "," << le << " rows " << first
                                         << "+" << count;
            }
        }
      int64_t sum = 0;
      for (int c = 0; c < degree; ++c) sum += l.chunk_rows(c);
      EXPECT_EQ(sum, 25);
      if (order == BlockOrder::wire) {  // each (chunk, peer) is contiguous: one all-to-all block
        for (int c = 0; c < degree; ++c)
          for (int q = 0; q + 1 < peers; ++q)
            EXPECT_EQ(l.block_offset(c, q, 0) + l.peer_chunk_rows(c, q), l.block_offset(c, q + 1, 0));
      }
    }
  }
}

TEST(Layout, SegmentsMoveEveryRowOfAChunkToItsPlace) {
  const int peers = 2, local = 3;
  std::vector<int64_t> filled = {4, 2, 6, 3, 0, 5};
  for (int degree : {1, 2, 3}) {
    BlockLayout wire = make_block_layout(filled, peers, local, degree, BlockOrder::wire);
    BlockLayout compute = make_block_layout(filled, peers, local, degree, BlockOrder::compute);
    BlockLayout canonical = make_block_layout(filled, peers, local, 1, BlockOrder::compute);
    // tag each row of the wire buffer with its (peer, expert, row) identity
    std::vector<float> src(wire.total_rows), dst(wire.total_rows, -1), canon(wire.total_rows, -1);
    for (int q = 0; q < peers; ++q)
      for (int le = 0; le < local; ++le)
        for (int64_t i = 0; i < filled[q * local + le]; ++i) src[wire.position(q, le, i)] = q * 100 + le * 10 + i;
    for (int c = 0; c < degree; ++c) {
      cpu_backend().copy_rows(src.data(), dst.data(), 1, chunk_segments(wire, compute, c));
      cpu_backend().copy_rows(dst.data(), canon.data(), 1, chunk_segments(compute, canonical, c));
    }
    for (int q = 0; q < peers; ++q)
      for (int le = 0; le < local; ++le)
        for (int64_t i = 0; i < filled[q * local + le]; ++i) {
          EXPECT_EQ(dst[compute.position(q, le, i)], q * 100 + le * 10 + i);
          EXPECT_EQ(canon[canonical.position(q, le, i)], q * 100 + le * 10 + i);
        }
  }
}

// Copying expert by expert (sorted_runs_within each expert's rows of a chunk, on the compute side)
// moves the same rows as the chunk's runs at once, with one peer, where adjacent blocks join into
// runs that span experts, and with two; and a run is cut where it crosses the range.
TEST(Layout, RunsWithinOneExpertsRowsMoveTheChunkExpertByExpert) {
  const RowRun run{10, 100, 6};
  const auto src_cut = sorted_runs_within({run}, RunSide::source, 12, 2),
             dst_cut = sorted_runs_within({run}, RunSide::destination, 98, 5);
  ASSERT_EQ(src_cut.size(), 1u);
  EXPECT_EQ(src_cut[0].src_row, 12);
  EXPECT_EQ(src_cut[0].dst_row, 102);
  EXPECT_EQ(src_cut[0].rows, 2);
  ASSERT_EQ(dst_cut.size(), 1u);
  EXPECT_EQ(dst_cut[0].src_row, 10);
  EXPECT_EQ(dst_cut[0].dst_row, 100);
  EXPECT_EQ(dst_cut[0].rows, 3);
  EXPECT_TRUE(sorted_runs_within({run}, RunSide::source, 16, 4).empty());
  for (int peers : {1, 2}) {
    const int local = 3;
    std::vector<int64_t> filled = {4, 2, 6, 3, 0, 5};
    filled.resize(peers * local);
    for (int degree : {1, 2, 3}) {
      BlockLayout wire = make_block_layout(filled, peers, local, degree, BlockOrder::wire);
      BlockLayout compute = make_block_layout(filled, peers, local, degree, BlockOrder::compute);
      std::vector<float> src(wire.total_rows), at_once(wire.total_rows, -1), by_expert(wire.total_rows, -1);
      for (int64_t r = 0; r < wire.total_rows; ++r) src[r] = static_cast<float>(r);
      for (int c = 0; c < degree; ++c) {
        auto in = chunk_segments(wire, compute, c), out = chunk_segments(compute, wire, c);
        sort_runs(in, RunSide::destination);
        sort_runs(out, RunSide::source);
        cpu_backend().copy_rows(src.data(), at_once.data(), 1, in);
        std::vector<float> back(wire.total_rows, -1);
        for (int le = 0; le < local; ++le) {
          int64_t first = compute.block_offset(c, 0, le), rows = 0;
          for (int q = 0; q < peers; ++q) rows += compute.block_rows(c, q, le);
          cpu_backend().copy_rows(src.data(), by_expert.data(), 1, sorted_runs_within(in, RunSide::destination, first, rows));
          cpu_backend().copy_rows(by_expert.data(), back.data(), 1, sorted_runs_within(out, RunSide::source, first, rows));
        }
        for (const RowRun& r : out)  // and back to where each row came from
          for (int64_t i = 0; i < r.rows; ++i) EXPECT_EQ(back[r.dst_row + i], src[r.dst_row + i]);
      }
      EXPECT_EQ(by_expert, at_once) << "peers " << peers << " degree " << degree;
    }
  }
}

// The parts of runs within [first, first + rows) on one side, by reading every run.
std::vector<RowRun> scanned_runs_within(const std::vector<RowRun>& runs, RunSide side, int64_t first, int64_t rows) {
  std::vector<RowRun> within;
  for (const RowRun& run : runs) {
    const int64_t start = side == RunSide::source ? run.src_row : run.dst_row;
    const int64_t lo = std::max(start, first), hi = std::min(start + run.rows, first + rows);
    if (lo < hi) within.push_back({run.src_row + (lo - start), run.dst_row + (lo - start), hi - lo});
  }
  return within;
}

// sorted_runs_within (a binary search over runs sorted by one side) cuts the same runs as a scan
// of every run, for runs of one row and longer, in shuffled order, on both sides, over ranges
// inside, across and outside them; and sort_runs refuses runs that overlap on its side.
TEST(Layout, SortedRunsWithinCutTheRunsAScanCuts) {
  for (RunSide side : {RunSide::source, RunSide::destination}) {
    std::vector<RowRun> runs;
    int64_t at = 3;
    for (int i = 0; i < 40; ++i) {  // rows apart on `side`, anywhere on the other
      const int64_t rows = 1 + (i * 7) % 4, other = 1000 - 11 * i;
      runs.push_back(side == RunSide::source ? RowRun{at, other, rows} : RowRun{other, at, rows});
      at += rows + (i % 3 == 0 ? 2 : 0);  // gaps after some
    }
    std::vector<RowRun> shuffled = runs;
    for (std::size_t i = shuffled.size() - 1; i > 0; --i) std::swap(shuffled[i], shuffled[(i * 13 + 5) % (i + 1)]);
    std::vector<RowRun> sorted = shuffled;
    sort_runs(sorted, side);
    auto key = [](const RowRun& r) { return std::tuple{r.src_row, r.dst_row, r.rows}; };
    for (int64_t first = 0; first < at + 3; first += 2)
      for (int64_t rows : {1, 3, 10, 200}) {
        std::vector<RowRun> scan = scanned_runs_within(shuffled, side, first, rows),
                            search = sorted_runs_within(sorted, side, first, rows);
        auto by_key = [&](const RowRun& a, const RowRun& b) { return key(a) < key(b); };
        std::sort(scan.begin(), scan.end(), by_key);
        std::sort(search.begin(), search.end(), by_key);
        ASSERT_EQ(scan.size(), search.size()) << "first " << first << " rows " << rows;
        for (std::size_t i = 0; i < scan.size(); ++i) ASSERT_EQ(key(scan[i]), key(search[i]));
      }
  }
  std::vector<RowRun> overlapping = {{0, 10, 4}, {5, 12, 1}};  // destination rows 12 twice
  EXPECT_THROW(sort_runs(overlapping, RunSide::destination), std::exception);
  EXPECT_NO_THROW(sort_runs(overlapping, RunSide::source));
}

// A rank's own rows skip the all-to-all: the runs of the other peers plus the runs of its own
// blocks from the token side's layout (a different one, that agrees with the expert side only on
// this peer) put every row where the all-to-all and the copy to compute order would have.
TEST(Layout, OwnRowsGoFromTheTokenSideStraightToComputeOrder) {
  const int peers = 3, local = 2, me = 1;
  const std::vector<int64_t> received = {4, 2, 6, 3, 0, 5};  // [peer sending, local expert]
  std::vector<int64_t> sent = {7, 1, 6, 3, 2, 0};            // [peer receiving, local expert]: mine agree
  for (int degree : {1, 2, 3}) {
    BlockLayout wire = make_block_layout(received, peers, local, degree, BlockOrder::wire);
    BlockLayout compute = make_block_layout(received, peers, local, degree, BlockOrder::compute);
    BlockLayout tokens = make_block_layout(sent, peers, local, degree, BlockOrder::wire);
    std::vector<float> recv(wire.total_rows, -1), send(tokens.total_rows, -1), dst(compute.total_rows, -1);
    for (int q = 0; q < peers; ++q)
      for (int le = 0; le < local; ++le) {
        for (int64_t i = 0; i < received[q * local + le]; ++i)
          if (q != me) recv[wire.position(q, le, i)] = q * 100 + le * 10 + i;  // my own block never arrives
        for (int64_t i = 0; i < sent[q * local + le]; ++i)
          send[tokens.position(q, le, i)] = q == me ? q * 100 + le * 10 + i : -2;
      }
    for (int c = 0; c < degree; ++c) {
      cpu_backend().copy_rows(recv.data(), dst.data(), 1, chunk_segments(wire, compute, c, me));
      cpu_backend().copy_rows(send.data(), dst.data(), 1, peer_segments(tokens, compute, me, c));
    }
    for (int q = 0; q < peers; ++q)
      for (int le = 0; le < local; ++le)
        for (int64_t i = 0; i < received[q * local + le]; ++i)
          EXPECT_EQ(dst[compute.position(q, le, i)], q * 100 + le * 10 + i) << "degree " << degree;
    // and back: compute order to the token side's own blocks
    std::vector<float> back(tokens.total_rows, -1);
    for (int c = 0; c < degree; ++c) cpu_backend().copy_rows(dst.data(), back.data(), 1, peer_segments(compute, tokens, me, c));
    for (int le = 0; le < local; ++le)
      for (int64_t i = 0; i < sent[me * local + le]; ++i) EXPECT_EQ(back[tokens.position(me, le, i)], me * 100 + le * 10 + i);
  }
  sent[me * local] += 1;  // my blocks disagree: a clear error
  BlockLayout tokens = make_block_layout(sent, peers, local, 1, BlockOrder::wire);
  BlockLayout compute = make_block_layout(received, peers, local, 1, BlockOrder::compute);
  EXPECT_THROW(peer_segments(tokens, compute, me, 0), Error);
}

TEST(Layout, RowPositionsFindEveryRowInAnotherPipeliningAndInCanonicalOrder) {
  const int peers = 3, local = 2;
  std::vector<int64_t> filled = {4, 2, 6, 3, 0, 5};
  for (int from_degree : {1, 2, 3})
    for (int to_degree : {1, 2, 4}) {
      BlockLayout from = make_block_layout(filled, peers, local, from_degree, BlockOrder::compute);
      BlockLayout to = make_block_layout(filled, peers, local, to_degree, BlockOrder::compute);
      // tag every row of `to` with its identity; read them back through the positions
      std::vector<float> tagged(to.total_rows, -1);
      for (int q = 0; q < peers; ++q)
        for (int le = 0; le < local; ++le)
          for (int64_t i = 0; i < filled[q * local + le]; ++i) tagged[to.position(q, le, i)] = q * 100 + le * 10 + i;
      for (int c = 0; c < from_degree; ++c) {
        std::vector<int64_t> pos = chunk_row_positions(from, to, c);
        ASSERT_EQ(static_cast<int64_t>(pos.size()), from.chunk_rows(c));
        for (int q = 0; q < peers; ++q)
          for (int le = 0; le < local; ++le)
            for (int64_t i = 0; i < filled[q * local + le]; ++i) {
              int64_t at = from.position(q, le, i) - from.chunk_offset(c);
              if (at >= 0 && at < from.chunk_rows(c)) {
                EXPECT_EQ(tagged[pos[at]], q * 100 + le * 10 + i);
              }
            }
      }
      for (int le = 0; le < local; ++le) {
        std::vector<int64_t> pos = canonical_row_positions(to, le);
        std::vector<float> expected;
        for (int q = 0; q < peers; ++q)
          for (int64_t i = 0; i < filled[q * local + le]; ++i) expected.push_back(q * 100 + le * 10 + i);
        ASSERT_EQ(pos.size(), expected.size());
        for (std::size_t r = 0; r < pos.size(); ++r) EXPECT_EQ(tagged[pos[r]], expected[r]);
      }
    }
}

// The deduplicated dispatch (unique_rows.h): with top-4 of 8 experts on 2 ranks a token often
// chooses several experts of one rank. A rank is sent each token once a pass (unless a chunk would
// save too little: then it sends every row), every unique row is packed by exactly one choice, a
// chunk's rows read only rows sent by then, and the rows each peer's experts read through the map
// are the rows the undeduplicated runs would have given them, at every degree, dropping or dropless.
TEST(UniqueRows, ATokenGoesOnceToEachRankAndEveryExpertRowReadsItsToken) {
  const int peers = 2, local = 4, E = peers * local, k = 4;
  const int64_t T = 50;
  for (double f : {0.0, 1.0})
    for (int degree : {1, 2, 3}) {
      Routing r;
      r.tokens = T, r.experts = E, r.top_k = k, r.capacity = expert_capacity(k, f, T, E);
      std::mt19937 random(static_cast<unsigned>(degree * 10 + (f > 0)));
      for (int64_t t = 0; t < T; ++t) {
        std::vector<int32_t> experts(E);
        std::iota(experts.begin(), experts.end(), 0);
        std::shuffle(experts.begin(), experts.end(), random);
        r.expert.insert(r.expert.end(), experts.begin(), experts.begin() + k);
      }
      assign_slots(r);
      const BlockLayout wire = make_block_layout(r.count, peers, local, degree, BlockOrder::wire);
      std::vector<int64_t> positions(T * k, -1);
      std::vector<float> token_of_row(wire.total_rows, -1);
      for (int64_t i = 0; i < T * k; ++i)
        if (r.slot[i] >= 0) {
          positions[i] = wire.position(r.expert[i] / local, r.expert[i] % local, r.slot[i]);
          token_of_row[positions[i]] = static_cast<float>(i / k);
        }
      const UniqueRows u = unique_token_rows(wire, positions, T, k);
      const std::string where = "f " + std::to_string(f) + ", degree " + std::to_string(degree);

      std::vector<float> unique_token(u.send_rows, -1);  // the send buffer, each row its token
      for (int64_t i = 0; i < T * k; ++i) {
        if (u.positions[i] < 0) continue;
        EXPECT_EQ(unique_token[u.positions[i]], -1) << "a unique row packed twice, " << where;
        unique_token[u.positions[i]] = static_cast<float>(i / k);
      }
      EXPECT_EQ(std::count(unique_token.begin(), unique_token.end(), -1.0f), 0) << "a unique row never packed, " << where;
      // each chunk sends a peer only tokens it has not sent it before, each once, or every row
      for (int q = 0; q < peers; ++q) {
        std::set<float> sent_before;
        for (int c = 0; c < degree; ++c) {
          const int64_t g = c * peers + q, rows = wire.peer_chunk_rows(c, q);
          const auto first = unique_token.begin() + u.send_offset[g];
          const std::set<float> sent(first, first + u.send_count[g]);
          if (!UniqueRows::sends_every_row(u.send_count, wire, c, q)) {
            EXPECT_EQ(static_cast<int64_t>(sent.size()), u.send_count[g]) << "a token twice in one chunk, " << where;
            for (float t : sent) EXPECT_EQ(sent_before.count(t), 0u) << "a token sent again, " << where;
            EXPECT_GE((rows - u.send_count[g]) * 10, rows) << "too few rows saved to deduplicate, " << where;
          }
          sent_before.insert(sent.begin(), sent.end());
        }
      }
      // each peer as if it received these rows: through the maps, and as every row sent
      const BlockLayout compute = make_block_layout(r.count, peers, local, degree, BlockOrder::compute);
      std::vector<float> via_unique(compute.total_rows, -1), via_rows(compute.total_rows, -1);
      for (int c = 0; c < degree; ++c)
        for (int q = 0; q < peers; ++q) {
          const std::vector<RowRun> runs = unique_row_runs(u.send_offset, u.send_map, wire, compute, c, q);
          const int64_t arrived = u.send_offset[c * peers + q] + u.send_count[c * peers + q];
          for (const RowRun& run : runs) EXPECT_LE(run.src_row + run.rows, arrived) << "a row read before it is sent, " << where;
          cpu_backend().copy_rows(unique_token.data(), via_unique.data(), 1, runs);
          cpu_backend().copy_rows(token_of_row.data(), via_rows.data(), 1, peer_segments(wire, compute, q, c));
        }
      EXPECT_EQ(via_unique, via_rows) << where;
      EXPECT_EQ(std::count(via_rows.begin(), via_rows.end(), -1.0f), 0) << where;
      // top-4 of 8 on 2 ranks: ~2 choices of a token on each rank, all chunks' repeats worth leaving out
      EXPECT_LE(u.send_rows, peers * T) << "a token sent to a rank twice, " << where;
      EXPECT_GT(wire.total_rows, peers * T * 3 / 2) << where;
    }
}

// A map from the wire names unique rows the peer sent, numbered as it first met them: one that
// skips ahead, reads past them, or leaves some unread is an error, never a read out of bounds.
TEST(UniqueRows, AReceivedMapThatDoesNotFitItsRowsIsAnError) {
  // peer 1 sends 2 rows in chunk 0 and 2 in chunk 1 (degree 2, one local expert of 4 rows)
  const BlockLayout wire = make_block_layout({3, 4}, 2, 1, 2, BlockOrder::wire);
  auto check = [&](int chunk, std::vector<int32_t> map_of_peer_1, int64_t new_rows_0, int64_t new_rows_1) {
    UniqueRows u;
    lay_out_expert_side(u, {0, new_rows_0, 0, new_rows_1}, 2, wire.total_rows);
    std::copy(map_of_peer_1.begin(), map_of_peer_1.end(), u.recv_map.begin() + wire.block_offset(chunk, 1, 0));
    check_received_map(u, wire, chunk, 1);
  };
  EXPECT_NO_THROW(check(0, {0, 1}, 2, 1));
  EXPECT_NO_THROW(check(0, {0, 0}, 1, 2));
  EXPECT_NO_THROW(check(1, {1, 2}, 2, 1));  // a row of chunk 0 again, and one new
  EXPECT_NO_THROW(check(1, {1, 0}, 2, 0));  // only rows sent before
  EXPECT_THROW(check(0, {1, 0}, 2, 1), Error);   // skips ahead
  EXPECT_THROW(check(0, {0, 2}, 2, 1), Error);   // past the rows sent
  EXPECT_THROW(check(0, {0, 0}, 2, 1), Error);   // a row sent and never read
  EXPECT_THROW(check(1, {3, 2}, 2, 2), Error);   // a new row out of order
  EXPECT_THROW(check(0, {-1, 0}, 1, 1), Error);
}

}  // namespace
}  // namespace pm
