#include "perf/profiler.h"

#include <algorithm>
#include <cmath>
#include <ctime>
#include <nlohmann/json.hpp>

#include "comm/communicator.h"
#include "core/aligned.h"
#include "core/clock.h"
#include "core/rng.h"
#include "core/stats.h"
#include "moe/moe_layer.h"
#include "perf/interference_fit.h"
#include "perf/linear_fit.h"
#include "perf/serial_samples.h"
#include "sched/executor.h"

namespace pm {
namespace {

// One timed task: its cost class, its work's features and its duration alone.
struct Sample {
  std::string cost;
  std::array<double, kNumFeatures> features;
  double seconds;
};

// One overlapped pass: its graph (sizes from the real routing) and its measured wall time.
struct OverlapRun {
  TaskGraph graph;
  double seconds;
  int shape, degree;
  bool forward;
  int round;
};

std::string utc_now() {
  std::time_t t = std::time(nullptr);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%SZ", std::gmtime(&t));
  return buf;
}

// Samples of one serial pass, one per task, kept on rank 0 (see serial_task_samples). With other
// ranks, all-to-alls of token rows are measured on a busy link instead (measure_link).
void collect_serial(Communicator& comm, const TaskGraph& graph, const ExecutorStats& stats,
                    std::vector<Sample>& samples) {
  std::vector<TaskSample> taken = serial_task_samples(comm, graph, stats);
  if (comm.rank() != 0) return;
  for (const TaskSample& t : taken)
    if (t.cost != "all_to_all" || comm.size() == 1) samples.push_back({t.cost, task_features(t.work), t.seconds});
}

// All-to-alls back to back, as a pipeline's chunks go over a busy link: for each size, the time
// of one (a run of them over their number, slowest rank), with the bytes each rank sends to the
// others. Kept on rank 0. Why not the layer's own all-to-alls: in serial passes the link idles
// between them, and an idle emulated link (tc tbf) banks a burst of credit, which made small
// transfers look cheaper than on a busy link and hid the cost each transfer adds.
void measure_link(Communicator& comm, std::vector<Sample>& samples) {
  const int P = comm.size();
  for (int64_t per_peer_bytes : {32 << 10, 128 << 10, 512 << 10, 2 << 20}) {
    const int64_t per_peer = per_peer_bytes / 4;
    std::vector<float> send(per_peer * P, 1.0f), recv(per_peer * P);
    std::vector<int64_t> counts(P, per_peer), displs(P);
    for (int q = 0; q < P; ++q) displs[q] = q * per_peer;
    auto run = [&](int n) {
      comm.barrier();
      Stopwatch w;
      for (int i = 0; i < n; ++i) comm.alltoallv(send.data(), counts, displs, recv.data(), counts, displs, DType::f32);
      return comm.allreduce_scalar(w.elapsed_s(), ReduceOp::max) / n;
    };
    double one = run(2);  // also warms the connections and the transfer-time model
    int n = static_cast<int>(std::clamp(0.06 / std::max(one, 1e-6), 3.0, 200.0));
    for (int rep = 0; rep < 3; ++rep) {
      double seconds = run(n);
      TaskWork w{1, 0, static_cast<double>(per_peer_bytes) * (P - 1)};
      if (comm.rank() == 0) samples.push_back({"all_to_all", task_features(w), seconds});
    }
  }
}

// All-reduces (sum, float) back to back over the group, as PPMoE's chunks go: for each size, the
// time of one (slowest rank), with the bytes a ring moves per rank, 2 (P-1)/P of the buffer (the
// work moe/ppmoe_graph.cpp gives its reduce tasks). Kept on rank 0. With one rank: the fixed cost.
void measure_all_reduce(Communicator& comm, std::vector<Sample>& samples) {
  const int P = comm.size();
  for (int64_t bytes : {16 << 10, 128 << 10, 1 << 20, 4 << 20}) {
    const int64_t floats = bytes / 4;
    std::vector<float> buffer(floats, 1.0f);
    auto run = [&](int n) {
      comm.barrier();
      Stopwatch w;
      for (int i = 0; i < n; ++i) comm.allreduce(buffer.data(), buffer.data(), floats, DType::f32, ReduceOp::sum);
      return comm.allreduce_scalar(w.elapsed_s(), ReduceOp::max) / n;
    };
    double one = run(2);
    int n = static_cast<int>(std::clamp(0.06 / std::max(one, 1e-6), 3.0, 200.0));
    for (int rep = 0; rep < 3; ++rep) {
      double seconds = run(n);
      TaskWork w{1, 0, 2.0 * (P - 1) / P * static_cast<double>(bytes)};
      if (comm.rank() == 0) samples.push_back({"all_reduce", task_features(w), seconds});
    }
  }
}

std::string samples_to_json(const std::vector<Sample>& samples) {
  nlohmann::json j = nlohmann::json::array();
  for (const Sample& s : samples) j.push_back({s.cost, s.features, s.seconds});
  return j.dump();
}

void samples_from_json(const std::string& text, std::vector<Sample>& out) {
  for (const auto& e : nlohmann::json::parse(text))
    out.push_back({e[0].get<std::string>(), e[1].get<std::array<double, kNumFeatures>>(), e[2].get<double>()});
}

// Measures how the lanes slow each other, directly:
//  - hand-off: a chain of empty tasks alternating lanes, each waiting for the previous one;
//  - compute factor: expert FFNs (the layer's GEMMs) alone, then the same beside a stream of
//    all-to-alls; over the window where both ran, compute progressed (work done) / (window) of its
//    own speed;
//  - comm factor: the all-to-alls' time beside the GEMMs over their time alone.
// Medians of `repeats` runs: the machine is noisy.
Interference measure_interference(Communicator& comm, Backend& backend, int repeats) {
  Executor ex;
  const int64_t rows = 512, M = 512, H = 1024;
  Buffer<float> u(rows * M, 0.5f), w1(M * H, 0.25f), w2(H * M, 0.25f), b1(H, 0.0f), b2(M, 0.0f);
  Buffer<float> hpre(rows * H), act(rows * H), y(rows * M);
  std::unique_ptr<PackedExpert> packed = backend.new_packed_expert(Activation::gelu, Precision::fp32);
  backend.pack_expert_forward(*packed, w1.data(), w2.data(), b1.data(), b2.data(), M, H);
  const int P = comm.size();
  const int64_t per_peer = 256 * 1024;  // floats: 1 MiB to every peer
  std::vector<float> send(per_peer * P, 1.0f), recv(per_peer * P);
  std::vector<int64_t> counts(P, per_peer), displs(P);
  for (int q = 0; q < P; ++q) displs[q] = q * per_peer;
  const RowList u_rows(u.data(), rows, M);
  auto gemms = [&](int n) {
    for (int i = 0; i < n; ++i)
      backend.expert_forward(*packed, rows, M, H, u_rows.pointers(), hpre.data(), act.data(), y.data(),
                             ForwardFor::backward);
  };
  auto a2as = [&](int n) {
    for (int i = 0; i < n; ++i) comm.alltoallv(send.data(), counts, displs, recv.data(), counts, displs, DType::f32);
  };
  auto timed = [&](const std::function<void()>& fn) {
    comm.barrier();
    Stopwatch w;
    fn();
    double t = w.elapsed_s();
    return comm.allreduce_scalar(t, ReduceOp::max);
  };
  // size both loops so that the all-to-alls cover about half of the GEMMs' time
  double one_gemm = timed([&] { gemms(4); }) / 4, one_a2a = timed([&] { a2as(2); }) / 2;
  int n_gemm = std::max(4, static_cast<int>(0.3 / one_gemm));
  int n_a2a = std::max(2, static_cast<int>(0.5 * n_gemm * one_gemm / one_a2a));

  std::vector<double> compute_factor, comm_factor, handoff;
  for (int r = 0; r < repeats; ++r) {
    double g_alone = timed([&] { gemms(n_gemm); });
    double a_alone = timed([&] { a2as(n_a2a); });
    comm.barrier();
    TaskGraph g;
    g.add({"gemms", lanes::compute, "other", -1, {}, {}, [&] { gemms(n_gemm); }});
    g.add({"a2as", lanes::comm, "other", -1, {}, {}, [&] { a2as(n_a2a); }});
    ex.run(g);
    double g_both = 0, a_both = 0;
    for (const TaskRecord& rec : ex.last_stats().records) (rec.task == 0 ? g_both : a_both) = rec.end_s - rec.start_s;
    double both[2] = {g_both, a_both};
    comm.allreduce(both, both, 2, DType::f64, ReduceOp::max);
    g_both = both[0], a_both = both[1];
    double window = std::min(a_both, g_both);
    double work_in_window = g_alone - (g_both - window);  // the rest ran alone, at full speed
    if (work_in_window > 0) compute_factor.push_back(std::clamp(window / work_in_window, 1.0, 4.0));
    if (a_alone > 0) comm_factor.push_back(std::clamp(a_both / a_alone, 1.0, 4.0));

    TaskGraph chain;
    const int links = 200;
    for (int i = 0; i < links; ++i)
      chain.add({"link", i % 2 ? lanes::comm : lanes::compute, "other", -1, {}, i ? std::vector<int>{i - 1} : std::vector<int>{}, [] {}});
    ex.run(chain);
    handoff.push_back(ex.last_stats().wall_s / links);
  }
  // Where the GEMMs' own noise exceeded the all-to-alls' window in every repeat (fast shared
  // memory), no slow-down was measurable: factor 1. (It once came out as the median of nothing,
  // 0, and the simulator could not make progress with it.)
  auto median_or_one = [](const std::vector<double>& v) { return v.empty() ? 1.0 : summarize(v).median; };
  return {median_or_one(compute_factor), median_or_one(comm_factor), summarize(handoff).median};
}

}  // namespace

std::vector<MoeShape> default_profile_shapes(int ranks) {
  auto experts = [&](int per_rank) { return per_rank * ranks; };
  return {
      {2048, 512, 1024, experts(4), 2, 1.25, ranks},
      {1024, 256, 512, experts(2), 1, 1.25, ranks},
      {2048, 256, 2048, experts(2), 2, 1.25, ranks},
      {1024, 512, 512, experts(4), 2, 1.25, ranks},
      {512, 1024, 1024, experts(1), 1, 1.25, ranks},
  };
}

PerfProfile take_profile(Communicator& comm, Backend& backend, const ProfileOptions& o) {
  PerfProfile profile;
  profile.cluster = describe_cluster(comm, backend);
  profile.created = utc_now();
  std::vector<Sample> samples;
  std::vector<OverlapRun> overlap_runs;
  Executor serial(Executor::Mode::serial), overlapped(Executor::Mode::overlapped);

  profile.dtype = precision_name(o.precision);
  if (o.precision == Precision::bf16) profile.bf16_path = backend.bf16_path();
  for (std::size_t si = 0; si < o.shapes.size(); ++si) {
    MoeShape s = o.shapes[si];
    s.precision = o.precision;
    std::unique_ptr<MoeLayer> layer = o.strategy->make_layer(s, comm, backend);
    layer->init_parameters(o.seed);
    // the layer's own kind of memory (huge pages for large blocks), as a real run's inputs and outputs
    FloatBuffer x(s.tokens * s.model_dim), dy(x.size()), y(x.size()), dx(x.size());
    Rng(o.seed, stream_id(1, comm.rank())).fill_normal(x.data(), x.size(), 0, 1);
    Rng(o.seed, stream_id(7, comm.rank())).fill_normal(dy.data(), dy.size(), 0, 1);
    std::vector<int> degrees;
    for (int degree : o.degrees)
      if (degree <= s.capacity()) degrees.push_back(degree);
    // One forward and backward pass at a degree, on an executor; a barrier before.
    auto pass = [&](Executor& ex, int degree, LayerPassRun& fwd, LayerPassRun& bwd, ExecutorStats& fwd_stats,
                    ExecutorStats& bwd_stats) {
      layer->set_degrees(degree, degree);
      comm.barrier();
      layer->zero_grads();
      // as after an optimizer step: the pass packs the experts' weights again (PackedExperts),
      // so the samples of that task and the passes' times are a training step's
      for (Parameter& w : layer->parameters()) w.value->mark_changed();
      // each pass's graph carries the rows its routing really gave every task
      std::shared_ptr<MoePass> p = forward_alone(*layer, ex, x.data(), s.tokens, y.data(), nullptr, &fwd);
      fwd_stats = ex.last_stats();
      backward_alone(*layer, ex, *p, dy.data(), dx.data(), 0.01f, nullptr, &bwd);
      bwd_stats = ex.last_stats();
    };
    // Each task alone: serial passes, degree by degree (the first warms caches and buffers).
    for (int degree : degrees) {
      if (o.progress && comm.rank() == 0)
        o.progress(fmt::format("shape {}/{} ({}), degree {}", si + 1, o.shapes.size(), s.str(), degree));
      for (int it = 0; it <= o.iters; ++it) {
        LayerPassRun fwd, bwd;
        ExecutorStats fwd_stats, bwd_stats;
        pass(serial, degree, fwd, bwd, fwd_stats, bwd_stats);
        if (it == 0) continue;
        collect_serial(comm, fwd.graph, fwd_stats, samples);
        collect_serial(comm, bwd.graph, bwd_stats, samples);
      }
    }
    // Overlapped passes, one degree after another in rounds (each round starting at another
    // degree), as the planner's users run them: a layer's passes meet other degrees' and other
    // work's in between, never a run of identical ones (those were measured 1.3-1.8x slower from
    // the second on, on the emulated link, and made the refit below plan badly).
    for (int round = 0; round <= o.iters; ++round)
      for (std::size_t i = 0; i < degrees.size(); ++i) {
        const int degree = degrees[(i + round) % degrees.size()];
        LayerPassRun fwd, bwd;
        ExecutorStats fwd_stats, bwd_stats;
        pass(overlapped, degree, fwd, bwd, fwd_stats, bwd_stats);
        if (round == 0) continue;
        double walls[2] = {fwd_stats.wall_s, bwd_stats.wall_s};
        comm.allreduce(walls, walls, 2, DType::f64, ReduceOp::max);
        overlap_runs.push_back({std::move(fwd.graph), walls[0], static_cast<int>(si), degree, true, round});
        overlap_runs.push_back({std::move(bwd.graph), walls[1], static_cast<int>(si), degree, false, round});
      }
  }

  if (o.progress && comm.rank() == 0) o.progress("all-to-alls back to back: the link's cost per transfer and per byte");
  if (comm.size() > 1) measure_link(comm, samples);
  if (o.progress && comm.rank() == 0) o.progress("all-reduces back to back: what PPMoE's layer moves instead");
  measure_all_reduce(comm, samples);
  if (o.progress && comm.rank() == 0) o.progress("how the lanes slow each other");
  Interference interference = measure_interference(comm, backend, 5);

  // Rank 0 pools every rank's samples, fits, and sends the profile to all.
  std::vector<std::string> gathered = comm.gather_strings(samples_to_json(samples), 0);
  std::string text;
  if (comm.rank() == 0) {
    std::vector<Sample> all;
    for (const std::string& g : gathered) samples_from_json(g, all);
    std::map<std::string, std::pair<std::vector<std::vector<double>>, std::vector<double>>> by_cost;
    for (const Sample& s : all) {
      auto& [X, y] = by_cost[s.cost];
      X.emplace_back(s.features.begin(), s.features.end());
      y.push_back(s.seconds);
    }
    for (const auto& [cost, data] : by_cost) {
      const auto& [X, y] = data;
      LinearFit fit = fit_nonnegative(X, y);
      CostModel& m = profile.models[cost];
      m.fitted = true;
      std::copy(fit.coef.begin(), fit.coef.end(), m.coef.begin());
      m.samples = static_cast<int>(X.size());
      m.r2 = fit.r2;
      m.median_rel_err = fit.median_rel_err;
    }
    auto alone = [&](const Task& t) { return profile.predict(t); };
    std::vector<OverlappedPass> passes;
    for (const OverlapRun& r : overlap_runs)
      passes.push_back({&r.graph, r.seconds, (r.shape * 1000 + r.round) * 2 + (r.forward ? 1 : 0)});
    const InterferenceFit fit = fit_interference(passes, alone, interference);
    profile.interference_measured = interference;
    interference = fit.interference;
    if (o.progress)
      o.progress(fmt::format("interference refit on {} overlapped passes: compute x{:.2f}, communication x{:.2f}, "
                             "{:.2f} ms per communication task; mean error {:.1f}% -> {:.1f}%",
                             passes.size(), interference.compute, interference.comm, interference.comm_task_s * 1e3,
                             fit.error_before * 100, fit.error_after * 100));
    if (o.progress) o.progress("self-check: overlapped layer passes against the simulation");
    profile.interference = interference;
    // The self-check compares each pass with its round's level (drift_free_errors): these hosts
    // drift 1.3-1.8x within a minute, which no model of the layer can predict, and the planner
    // only compares degrees measured at one speed.
    const std::vector<double> errors = drift_free_errors(passes, alone, interference);
    for (std::size_t i = 0; i < overlap_runs.size(); ++i) {
      const OverlapRun& r = overlap_runs[i];
      double predicted = simulate(r.graph, alone, interference).makespan_s;
      profile.self_check.push_back({r.shape, r.degree, r.forward, r.seconds, predicted});
    }
    profile.self_check_median_error = summarize(errors).median;
    text = profile.to_json();
  }
  return PerfProfile::from_json(comm.broadcast_string(text, 0), "the new profile");
}

}  // namespace pm
