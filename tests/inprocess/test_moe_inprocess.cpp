// The MoE layer, its dispatcher and composed task graphs on ranks run as threads (1 to 4 of
// them): every pipeline degree the planner can pick gives the same bits; dispatch and combine
// deliver every row where its routing says; a layer on a sub-group of the world computes what it
// computes on a world of that size; and a dense block and an MoE layer in one graph overlap the
// all-to-all with the dense compute, as the executor runs it and as the simulator predicts it.
// (PyTorch checks the numbers themselves: tests/reference/test_moe_layer.py, also --inprocess.)
#include <fmt/format.h>
#include <gtest/gtest.h>

#include <chrono>
#include <cstring>
#include <map>
#include <mutex>
#include <thread>
#include <tuple>
#include <utility>

#include "comm/inprocess_communicator.h"
#include "core/rng.h"
#include "moe/dispatcher.h"
#include "moe/gate.h"
#include "moe/ep_graph.h"
#include "moe/moe_layer.h"
#include "sched/executor.h"
#include "sched/simulator.h"
#include "sched/trace.h"

namespace pm {
namespace {

std::vector<float> normal(int64_t n, uint64_t seed, uint64_t stream) {
  std::vector<float> v(n);
  Rng(seed, stream).fill_normal(v.data(), n, 0.0f, 1.0f);
  return v;
}

// One rank's results of a forward and backward pass.
struct Results {
  std::vector<float> y, dx;
  std::vector<std::vector<float>> grads;  // in parameters() order
  bool operator==(const Results&) const = default;
};

Results run_layer(MoeLayer& layer, Executor& ex, const std::vector<float>& x, const std::vector<float>& dy) {
  const MoeShape& s = layer.shape();
  Results r;
  r.y.assign(x.size(), 0.0f);
  r.dx.assign(x.size(), 0.0f);
  layer.zero_grads();
  std::shared_ptr<MoePass> pass = forward_alone(layer, ex, x.data(), s.tokens, r.y.data());
  backward_alone(layer, ex, *pass, dy.data(), r.dx.data(), 0.05f);
  for (const Parameter& p : layer.parameters()) r.grads.emplace_back(p.grad->f32(), p.grad->f32() + p.grad->numel());
  return r;
}

class LayerOnThreadRanks : public ::testing::TestWithParam<int> {};

TEST_P(LayerOnThreadRanks, EveryDegreeThePlannerCanPickGivesTheSameBitsAsDegreeOne) {
  const int P = GetParam();
  // capacity ceil(2 * 4 * 64 / (2P)) >= 16 rows per expert and rank for P <= 4: degree 16 fits
  const MoeShape shape{64, 24, 40, 2 * P, 2, 4.0, P};
  const std::vector<std::pair<int, int>> degrees = {{1, 1}, {2, 2}, {3, 4}, {6, 8}, {12, 16}, {16, 1}, {1, 12}};
  std::mutex m;
  std::map<std::pair<int, int>, std::vector<Results>> by_degree;  // per degree: each rank's
  run_ranks_in_process(P, [&](Communicator& comm) {
    Executor ex;
    auto layer = moe_strategy("ep").make_layer(shape, comm, cpu_backend());
    layer->init_parameters(7);
    auto x = normal(shape.tokens * shape.model_dim, 3, stream_id(1, comm.rank()));
    auto dy = normal(shape.tokens * shape.model_dim, 3, stream_id(2, comm.rank()));
    for (auto [f, b] : degrees) {
      layer->set_degrees(f, b);
      Results r = run_layer(*layer, ex, x, dy);
      std::lock_guard lock(m);
      auto& all = by_degree[{f, b}];
      all.resize(P);
      all[comm.rank()] = std::move(r);
    }
  });
  const auto& base = by_degree.at({1, 1});
  for (const auto& [d, results] : by_degree)
    for (int r = 0; r < P; ++r) EXPECT_TRUE(results[r] == base[r]) << "degree " << d.first << "/" << d.second << " rank " << r;
}

TEST_P(LayerOnThreadRanks, ADeduplicatedDispatchGivesTheBitsOfOneRowPerChoice) {
  // top-3 of 4 experts per rank, and top-6 of 8: tokens often choose several experts of one rank,
  // which the deduplicated dispatch sends once (the backward's too, in fp32: ep_graph.h
  // scale_grad_dispatch_on_experts); the layer must compute exactly what it computes without,
  // with the experts recomputed in the backward too. Top-6 of 8 keeps fewer unique rows than
  // expert rows: the experts read their inputs where they arrived, and the pass holds less for the
  // backward than one that copies every expert row (ForwardPass::inputs_in_place).
  const int P = GetParam();
  for (const std::pair<int, int>& k_experts : {std::pair{3, 4}, std::pair{6, 8}})
    for (double f : {0.0, 1.25}) {
      // (named, not a structured binding: a lambda below captures k, which Clang 14 refuses)
      const int k = k_experts.first, per_rank = k_experts.second;
      MoeShape shape{60, 16, 24, per_rank * P, k, f, P};
      shape.precision = f > 0 ? Precision::bf16 : Precision::fp32;
      const std::string what = fmt::format("top-{} of {}, f {}", k, per_rank * P, f);
      std::mutex m;
      // (dedup, recompute, degree): each rank's results
      std::map<std::tuple<bool, bool, int>, std::vector<Results>> by_variant;
      std::vector<int64_t> rows_sent(P), choices_sent(P), held_dedup(P), held_copied(P);
      run_ranks_in_process(P, [&](Communicator& comm) {
        Executor ex;
        auto x = normal(shape.tokens * shape.model_dim, 5, stream_id(1, comm.rank()));
        auto dy = normal(shape.tokens * shape.model_dim, 5, stream_id(2, comm.rank()));
        for (bool dedup : {false, true})
          for (bool recompute : {false, true}) {
            MoeShape s = shape;
            s.dedup_dispatch = dedup;
            s.recompute_experts = recompute;
            auto layer = moe_strategy("ep").make_layer(s, comm, cpu_backend());
            layer->init_parameters(9);
            for (int degree : {1, 3}) {
              layer->set_degrees(degree, degree == 1 ? 1 : 2);
              Results r = run_layer(*layer, ex, x, dy);
              std::lock_guard lock(m);
              auto& all = by_variant[{dedup, recompute, degree}];
              all.resize(P);
              all[comm.rank()] = std::move(r);
            }
            if (recompute) continue;
            // the last backward's dispatch: fewer rows than choices where the shape deduplicates it
            const int64_t grad_rows = layer->grad_dispatch_rows_sent(),
                          grad_choices = layer->grad_dispatch_choices_sent();
            if (dedup && P > 1 && scale_grad_dispatch_on_experts(s)) {
              EXPECT_LT(grad_rows, grad_choices) << "rank " << comm.rank() << ", " << what;
            } else {
              EXPECT_EQ(grad_rows, grad_choices) << "rank " << comm.rank() << ", " << what << ", dedup " << dedup;
            }
            if (k == 3) {
              EXPECT_EQ(scale_grad_dispatch_on_experts(s), dedup && P > 1 && s.precision == Precision::fp32);
            }
            // one more forward, at degree 1 (where a token's choices on a rank share its chunk), to
            // count what its dispatch sent and what it holds for a backward
            layer->set_degrees(1, 1);
            std::vector<float> y(x.size());
            auto pass = forward_alone(*layer, ex, x.data(), s.tokens, y.data());
            std::lock_guard lock(m);
            (dedup ? held_dedup : held_copied)[comm.rank()] = pass->held_bytes();
            if (dedup) {
              rows_sent[comm.rank()] = pass->dispatch_rows_sent();
            } else {
              choices_sent[comm.rank()] = pass->dispatch_choices_sent();
              EXPECT_EQ(pass->dispatch_rows_sent(), pass->dispatch_choices_sent());
            }
          }
      });
      for (const auto& [variant, results] : by_variant)
        for (int r = 0; r < P; ++r)
          EXPECT_TRUE(results[r] == by_variant.at({false, false, 1})[r])
              << "dedup " << std::get<0>(variant) << ", recompute " << std::get<1>(variant) << ", degree "
              << std::get<2>(variant) << ", rank " << r << ", " << what;
      for (int r = 0; r < P; ++r) {
        if (P == 1) {
          EXPECT_EQ(choices_sent[r], 0);  // nothing leaves a single rank
        } else {
          EXPECT_LT(rows_sent[r], choices_sent[r]) << "rank " << r << ": no row sent once for two choices";
        }
        // never more; less where a token's row reaches a rank for several choices (on 4 ranks top-6 of
        // 32 sends a rank 1.5 choices a token: copied, as without deduplication)
        EXPECT_LE(held_dedup[r], held_copied[r]) << "rank " << r << ", " << what;
        if (k == 6 && P <= 2) {
          EXPECT_LT(held_dedup[r], held_copied[r]) << "rank " << r << ", " << what;
        }
      }
    }
}

TEST_P(LayerOnThreadRanks, DispatchAndCombineDeliverEveryRowWhereItsRoutingSays) {
  // DeepEP's test idea: the payload says where it came from. Row of (rank q, token t) holds
  // 1000 q + t in every column; with gate values 1 and k = 1 the combine gives x back.
  const int P = GetParam(), El = 2, E = P * El;
  const int64_t T = 40, M = 8;
  run_ranks_in_process(P, [&](Communicator& comm) {
    const int me = comm.rank();
    Routing routing;
    routing.tokens = T, routing.experts = E, routing.top_k = 1, routing.capacity = T;
    for (int64_t t = 0; t < T; ++t) routing.expert.push_back(static_cast<int32_t>((t * 7 + me) % E));
    assign_slots(routing);
    std::vector<float> x(T * M);
    for (int64_t t = 0; t < T; ++t)
      for (int64_t i = 0; i < M; ++i) x[t * M + i] = static_cast<float>(1000 * me + t);
    for (int degree : {1, 3}) {
      Dispatcher dispatcher(comm, cpu_backend(), El, M);
      DispatchHandle h = dispatcher.layout(routing, degree);
      Buffer<float> rows = dispatcher.dispatch(x.data(), h);
      // compute order: local expert le's rows, by source rank, in slot order
      int64_t at = 0;
      for (int c = 0; c < degree; ++c)
        for (int le = 0; le < El; ++le)
          for (int q = 0; q < P; ++q)
            for (int64_t i = 0; i < h.experts_compute.block_rows(c, q, le); ++i, ++at) {
              const int source = static_cast<int>(rows[at * M]) / 1000;
              const int64_t token = static_cast<int64_t>(rows[at * M]) % 1000;
              EXPECT_EQ(source, q);
              EXPECT_EQ((token * 7 + source) % E, me * El + le) << "a row for another expert";
            }
      EXPECT_EQ(at, h.experts_wire.total_rows);
      std::vector<float> gate(T, 1.0f), y(T * M, -1.0f);
      dispatcher.combine(rows, gate.data(), h, y.data());
      EXPECT_EQ(y, x) << "degree " << degree;
    }
  });
}

INSTANTIATE_TEST_SUITE_P(Ranks, LayerOnThreadRanks, ::testing::Values(1, 2, 3, 4),
                         [](const ::testing::TestParamInfo<int>& info) { return std::to_string(info.param) + "_ranks"; });

TEST(LayerOnAGroup, ALayerOnEachHalfOfFourRanksComputesWhatItDoesOnTwoRanks) {
  const MoeShape shape{48, 16, 24, 4, 2, 1.25, 2};
  std::mutex m;
  std::map<int, Results> on_world, on_group;  // by rank in the (sub-)group, group 0 only
  auto body = [&](Communicator& group, std::map<int, Results>& out) {
    Executor ex;
    auto layer = moe_strategy("ep").make_layer(shape, group, cpu_backend());
    layer->init_parameters(5);
    layer->set_degrees(2, 3);
    auto x = normal(shape.tokens * shape.model_dim, 9, stream_id(1, group.rank()));
    auto dy = normal(shape.tokens * shape.model_dim, 9, stream_id(2, group.rank()));
    Results r = run_layer(*layer, ex, x, dy);
    std::lock_guard lock(m);
    out[group.rank()] = std::move(r);
  };
  run_ranks_in_process(2, [&](Communicator& world) { body(world, on_world); });
  run_ranks_in_process(4, [&](Communicator& world) {
    auto half = world.split(world.rank() / 2, world.rank());  // expert groups {0, 1} and {2, 3}
    if (world.rank() < 2)
      body(*half, on_group);
    else {
      std::map<int, Results> ignored;
      body(*half, ignored);
    }
  });
  ASSERT_EQ(on_group.size(), 2u);
  for (int r = 0; r < 2; ++r) EXPECT_TRUE(on_group[r] == on_world[r]) << "rank " << r;
}

// Experts are packed for the GEMMs once per change of their weights, not once per pass, and a
// change through parameters() (what the optimizer does) is never missed: after it, a pass gives
// the bits of a new layer created with those weights. Both strategies, fp32 and bf16, GeLU and
// SwiGLU.
TEST(LayerPackings, PacksTheExpertsOncePerChangeOfTheirWeightsAndNeverUsesAStalePacking) {
  for (const char* strategy : {"ep", "ppmoe"})
    for (Precision precision : {Precision::fp32, Precision::bf16}) {
      MoeShape shape{48, 16, 24, 4, 2, 1.25, 2};
      shape.precision = precision;
      shape.activation = precision == Precision::bf16 ? Activation::swiglu : Activation::gelu;
      SCOPED_TRACE(std::string(strategy) + " " + precision_name(precision));
      run_ranks_in_process(2, [&](Communicator& comm) {
        Executor ex;
        auto layer = moe_strategy(strategy).make_layer(shape, comm, cpu_backend());
        layer->init_parameters(5);
        layer->set_degrees(2, 1);
        auto x = normal(shape.tokens * shape.model_dim, 9, stream_id(1, comm.rank()));
        auto dy = normal(shape.tokens * shape.model_dim, 9, stream_id(2, comm.rank()));
        const int64_t before = layer->weight_packings();
        Results first = run_layer(*layer, ex, x, dy);
        EXPECT_EQ(layer->weight_packings() - before, 2) << "the forward's and the backward's packings";
        EXPECT_TRUE(run_layer(*layer, ex, x, dy) == first);
        EXPECT_EQ(layer->weight_packings() - before, 2) << "the same weights packed again";
        // an update of every weight, as an optimizer step makes it
        for (Parameter& p : layer->parameters())
          for (int64_t i = 0; i < p.value->numel(); ++i) p.value->f32()[i] += 0.01f * static_cast<float>(i % 7 - 3);
        Results updated = run_layer(*layer, ex, x, dy);
        EXPECT_EQ(layer->weight_packings() - before, 4);
        EXPECT_FALSE(updated == first);
        auto fresh = moe_strategy(strategy).make_layer(shape, comm, cpu_backend());
        fresh->set_degrees(2, 1);
        std::vector<Parameter> from = layer->parameters(), to = fresh->parameters();
        for (std::size_t i = 0; i < from.size(); ++i)
          std::memcpy(to[i].value->f32(), std::as_const(*from[i].value).f32(), from[i].value->nbytes());
        EXPECT_TRUE(run_layer(*fresh, ex, x, dy) == updated) << "a stale packing";
        // a change of one expert tensor alone is seen too
        layer->parameters()[1].value->f32()[0] += 1.0f;
        EXPECT_FALSE(run_layer(*layer, ex, x, dy) == updated);
        EXPECT_EQ(layer->weight_packings() - before, 6);
      });
    }
}

// Inference passes skip what only a backward reads (GeLU's derivative), and give the bits of a
// training pass's output; a backward after set_inference is a clear error.
TEST(LayerInference, GivesTheTrainingForwardsBitsAndRefusesABackward) {
  for (const char* strategy : {"ep", "ppmoe"}) {
    SCOPED_TRACE(strategy);
    const MoeShape shape{48, 16, 24, 4, 2, 1.25, 2};
    run_ranks_in_process(2, [&](Communicator& comm) {
      Executor ex;
      auto x = normal(shape.tokens * shape.model_dim, 9, stream_id(1, comm.rank()));
      auto dy = normal(shape.tokens * shape.model_dim, 9, stream_id(2, comm.rank()));
      auto layer = moe_strategy(strategy).make_layer(shape, comm, cpu_backend());
      layer->init_parameters(5);
      const Results training = run_layer(*layer, ex, x, dy);
      layer->set_inference();
      std::vector<float> y(x.size(), 0.0f), dx(x.size());
      std::shared_ptr<MoePass> pass = forward_alone(*layer, ex, x.data(), shape.tokens, y.data());
      EXPECT_EQ(y, training.y);
      EXPECT_THROW(backward_alone(*layer, ex, *pass, dy.data(), dx.data(), 0.05f), Error);
    });
  }
}

// A transport whose all-to-alls take at least `delay_s`, as a slow network link would: the
// in-process copies alone are too fast to show an overlap.
class SlowLink : public Communicator {
 public:
  SlowLink(Communicator& inner, double delay_s) : Communicator(inner.shared_waiter()), inner_(inner), delay_s_(delay_s) {}
  int rank() const override { return inner_.rank(); }
  int size() const override { return inner_.size(); }
  std::string backend() const override { return "slow " + inner_.backend(); }
  std::string host() const override { return inner_.host(); }
  RequestPtr ialltoallv(const void* s, const std::vector<int64_t>& sc, const std::vector<int64_t>& sd, void* r,
                        const std::vector<int64_t>& rc, const std::vector<int64_t>& rd, DType dtype) override {
    return std::make_unique<Delayed>(inner_.ialltoallv(s, sc, sd, r, rc, rd, dtype), delay_s_);
  }
  RequestPtr iallreduce(const void* s, void* r, int64_t n, DType d, ReduceOp op) override { return inner_.iallreduce(s, r, n, d, op); }
  RequestPtr iallgather(const void* s, void* r, int64_t n, DType d) override { return inner_.iallgather(s, r, n, d); }
  RequestPtr ibroadcast(void* p, int64_t n, DType d, int root) override { return inner_.ibroadcast(p, n, d, root); }
  RequestPtr ibarrier() override { return inner_.ibarrier(); }
  RequestPtr isend(const void* p, int64_t n, DType d, int peer) override { return inner_.isend(p, n, d, peer); }
  RequestPtr irecv(void* p, int64_t n, DType d, int peer) override { return inner_.irecv(p, n, d, peer); }
  std::unique_ptr<Communicator> split(int, int) override { throw Error(ErrorKind::internal, "SlowLink has no groups"); }

 private:
  struct Delayed : CommRequest {
    Delayed(RequestPtr inner, double delay_s) : inner(std::move(inner)), delay_s(delay_s) {}
    bool test() override { return inner->test() && std::chrono::duration<double>(clock::now() - begun).count() >= delay_s; }
    std::string what() const override { return inner->what(); }
    void abandon() override { inner->abandon(); }
    using clock = std::chrono::steady_clock;
    RequestPtr inner;
    double delay_s;
    clock::time_point begun = clock::now();
  };
  Communicator& inner_;
  double delay_s_;
};

// The seam ScMoE builds on: an MoE layer whose input is the previous block's output, and the
// current block's dense work, in one graph. The MoE's all-to-all runs on the communication lane
// while the dense block computes on the compute lane; the simulator predicts the same overlap.
TEST(TwoBlockGraph, TheMoeAllToAllRunsWhileTheDenseBlockComputes) {
  const MoeShape shape{64, 32, 48, 4, 2, 1.25, 2};
  const double a2a_s = 0.030, dense_s = 0.120;
  std::mutex m;
  std::vector<Results> composed(2), alone(2);
  std::vector<std::vector<TraceEvent>> traces(2);
  std::vector<Simulation> predicted(2);
  std::vector<TaskGraph> graphs(2);
  run_ranks_in_process(2, [&](Communicator& world) {
    SlowLink link(world, a2a_s);
    Executor ex;
    auto layer = moe_strategy("ep").make_layer(shape, link, cpu_backend());
    layer->init_parameters(11);
    auto x = normal(shape.tokens * shape.model_dim, 4, stream_id(1, world.rank()));
    auto dy = normal(shape.tokens * shape.model_dim, 4, stream_id(2, world.rank()));
    Results lone = run_layer(*layer, ex, x, dy);

    // one graph: the MoE layer on x (the previous block's output) and, beside it, a dense block
    // (here a stand-in of known length) that also needs only x
    Results r;
    r.y.assign(x.size(), 0.0f);
    layer->zero_grads();
    TaskGraph g;
    MoeForward moe = layer->append_forward(g, {}, x.data(), shape.tokens, r.y.data());
    int dense = g.add({"dense block", lanes::compute, "dense", -1, {1, dense_s, 0}, {},
                       [&] { std::this_thread::sleep_for(std::chrono::duration<double>(dense_s)); }});
    g.add({"join", lanes::compute, "residual", -1, {}, {dense, moe.tasks.output}, [] {}});
    Trace trace;
    ex.run(g, &trace);
    std::map<int, double> measured;  // each task's duration in this run
    for (const TaskRecord& rec : ex.last_stats().records) measured[rec.task] = rec.end_s - rec.start_s;
    r.dx.assign(x.size(), 0.0f);
    backward_alone(*layer, ex, *moe.pass, dy.data(), r.dx.data(), 0.05f);
    for (const Parameter& p : layer->parameters()) r.grads.emplace_back(p.grad->f32(), p.grad->f32() + p.grad->numel());

    // the simulator on the same graph, with each task's duration as measured in this run
    Simulation sim = simulate(g, [&](const Task& t) { return measured.at(static_cast<int>(&t - &g.tasks()[0])); });
    std::lock_guard lock(m);
    composed[world.rank()] = std::move(r);
    alone[world.rank()] = std::move(lone);
    traces[world.rank()] = trace.events();
    predicted[world.rank()] = sim;
    graphs[world.rank()] = std::move(g);
  });
  for (int rank = 0; rank < 2; ++rank) {
    EXPECT_TRUE(composed[rank] == alone[rank]) << "rank " << rank << ": the graph it runs in changed the layer's bits";
    // the trace: some all-to-all ran while the dense block was computing
    const TraceEvent* dense = nullptr;
    for (const TraceEvent& e : traces[rank])
      if (e.name == "dense block") dense = &e;
    ASSERT_NE(dense, nullptr);
    double overlapped = 0;
    for (const TraceEvent& e : traces[rank])
      if (e.lane == lanes::comm.id) overlapped += std::max(0.0, std::min(e.end_s, dense->end_s) - std::max(e.start_s, dense->start_s));
    EXPECT_GT(overlapped, a2a_s) << "rank " << rank << ": the all-to-alls did not run beside the dense block";
    // the prediction: the same overlap, so the graph takes less than its lanes one after the other
    const Simulation& sim = predicted[rank];
    const TaskGraph& g = graphs[rank];
    double dense_start = 0, dense_end = 0, comm_in_dense = 0;
    for (int id = 0; id < g.size(); ++id)
      if (g.task(id).name == "dense block") dense_start = sim.start_s[id], dense_end = sim.end_s[id];
    for (int id = 0; id < g.size(); ++id)
      if (g.task(id).lane == lanes::comm)
        comm_in_dense += std::max(0.0, std::min(sim.end_s[id], dense_end) - std::max(sim.start_s[id], dense_start));
    EXPECT_GT(comm_in_dense, a2a_s) << "rank " << rank;
    EXPECT_LT(sim.makespan_s, sim.busy(lanes::compute) + sim.busy(lanes::comm)) << "rank " << rank;
  }
}

}  // namespace
}  // namespace pm
