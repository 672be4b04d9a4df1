// pipemoe bench floor: the whole layer (forward + backward) against its GEMM floor, measured in
// interleaved rounds so that the host's drift moves both sides alike.
//
//   mpirun -q -np 2 build/pipemoe bench floor [layer shape flags] [--dtypes fp32,bf16] [--rounds 10]
//       [--iters 3] [--gemm-repeat 3] [--degree 1,2] [--weights-change] [--csv floor.csv] [--json]
// The floor of a pass is its expert FLOPs (the rows the slowest rank's experts computed, forward,
// input gradient and weight gradient) at the GEMM peak (`bench gemm`'s: the 2048^3 product, every
// rank at once, the best of ours and OpenBLAS; bf16: our bf16 GEMM). Each round measures the peak,
// the layer at each pipeline degree, and the peak again, for each dtype in turn: seconds apart,
// where two separate commands would be minutes apart on a host whose speed drifts 10-30% in that
// time. The floor takes the mean of the two peaks; a round whose two peaks differ by more than 5%
// ran while the host changed speed, and the summary also gives the median of the steady rounds.
// Each round also gives the expert tasks' own time (the median pass, on the ranks where it is
// shortest and longest): how far the GEMMs and their elementwise work stand from the floor, apart
// from the router, the all-to-alls and the waits; and how far the ranks' cores differ on the same
// work (a core slowed by its neighbours on the host holds every rank back at the next all-to-all).
// And the expert products' own speed: the six GEMMs of an expert's pass at the layer's shapes
// (balanced rows per expert), timed in the round beside the square; the layer against that
// "shapes floor" leaves out what the shapes themselves cost (a depth of 512 stores C four times as
// often as the square's 2048), so the rest is the layer's own doing.
#include <cmath>
#include <map>
#include <nlohmann/json.hpp>

#include "apps/pipemoe/command.h"
#include "apps/pipemoe/gemm_timing.h"
#include "apps/pipemoe/layer_runner.h"
#include "apps/pipemoe/pass_breakdown.h"
#include "core/csv.h"
#include "core/log.h"
#include "core/stats.h"
#include "sched/executor.h"

namespace pm::cli {
namespace {

struct FloorOptions {
  MoeShape shape{2048, 512, 1024, 8, 2, 1.25, 1};
  std::vector<std::string> dtypes = {"fp32", "bf16"};
  int rounds = 10;
  int iters = 3;
  int gemm_repeat = 3;
  std::vector<int> degrees = {1};
  uint64_t seed = 1;
  bool weights_change = false;
  std::string csv;
  bool json = false;
};

struct RoundResult {
  int round;
  std::string dtype;
  int degree;
  double peak_before, peak_after, expert_rows_max, flops, forward_ms, backward_ms;
  double experts_fastest_ms, experts_slowest_ms;  // the expert tasks' median pass, on the fastest / slowest rank
  double shapes_gflops;  // the expert products at the layer's shapes (ExpertProducts), slowest rank
  double peak_gflops() const { return (peak_before + peak_after) / 2; }
  double floor_ms() const { return flops / (peak_gflops() * 1e9) * 1e3; }
  double layer_ms() const { return forward_ms + backward_ms; }
  double ratio() const { return layer_ms() / floor_ms(); }
  double experts_ratio() const { return experts_slowest_ms / floor_ms(); }
  double shapes_floor_ms() const { return flops / (shapes_gflops * 1e9) * 1e3; }
  double shapes_ratio() const { return layer_ms() / shapes_floor_ms(); }
  double rank_spread() const { return experts_slowest_ms / experts_fastest_ms - 1; }
  // the host's speed held across the round: the peak after the layer within 5% of the one before
  bool steady() const { return std::abs(peak_after / peak_before - 1) <= kSteadyDrift; }
  static constexpr double kSteadyDrift = 0.05;
};

Precision parse_dtype(const std::string& name) {
  PM_REQUIRE(name == "fp32" || name == "bf16", "--dtypes: unknown dtype '{}' (fp32 or bf16)", name);
  return name == "bf16" ? Precision::bf16 : Precision::fp32;
}

// The tasks other than the experts' GEMM steps, largest first, ms per pass (median pass of all
// rounds, slowest rank): where the layer's time over its expert tasks goes.
std::string beside_experts(const std::vector<TaskTimeRow>& rows) {
  std::vector<TaskTimeRow> others;
  for (const auto& r : rows)
    if (r.task != "expert" && r.task != "expert_dgrad" && r.task != "expert_wgrad") others.push_back(r);
  std::stable_sort(others.begin(), others.end(), [](const auto& a, const auto& b) { return a.ms > b.ms; });
  std::string line = "ms per pass (median pass, slowest rank; (comm): on the communication lane, beside the computation):";
  for (const auto& r : others)
    if (r.ms >= 0.01) line += fmt::format(" {} {:.2f}{}", r.task, r.ms, r.lane == "compute" ? "" : " (" + r.lane + ")");
  return line;
}

int run_floor_bench(Context& ctx, const FloorOptions& o) {
  PM_REQUIRE(o.rounds >= 1 && o.iters >= 1 && o.gemm_repeat >= 1,
             "--rounds, --iters and --gemm-repeat must be at least 1 (got {}, {}, {})", o.rounds, o.iters, o.gemm_repeat);
  PM_REQUIRE(!o.dtypes.empty(), "--dtypes needs at least one of fp32, bf16");
  struct Arm {
    std::string dtype;
    std::unique_ptr<MoeLayer> layer;
  };
  // rows per expert when the tokens spread evenly: what each expert GEMM of the layer is near
  const MoeShape& s0 = o.shape;
  const int64_t balanced_rows = std::max<int64_t>(1, s0.tokens * s0.top_k * ctx.world() / s0.experts);
  ExpertProducts products(balanced_rows, s0.model_dim, s0.hidden, s0.fc1_width());
  std::vector<Arm> arms;
  for (const std::string& name : o.dtypes) {
    MoeShape shape = o.shape;
    shape.ranks = ctx.world();
    shape.precision = parse_dtype(name);
    shape.validate();
    for (int degree : o.degrees) shape.check_degree(degree);
    Arm arm{name, moe_strategy("ep").make_layer(shape, ctx.comm, ctx.backend)};
    arm.layer->init_parameters(o.seed);
    arms.push_back(std::move(arm));
  }
  LayerData data = make_layer_data(o.shape.tokens, o.shape.model_dim, o.seed, ctx.rank());
  data.weights_change = o.weights_change;
  Executor executor;
  SquareProduct square;
  const RouterLossGrads loss_grads{0.01f, 0.0f};

  std::vector<RoundResult> results;
  // every timed pass of a dtype and degree, over all rounds: where the passes go beside the experts
  std::map<std::pair<std::string, int>, PassBreakdown> breakdowns;
  for (int round = 1; round <= o.rounds; ++round) {
    for (Arm& arm : arms) {
      const MoeShape& shape = arm.layer->shape();
      const double peak = square.peak_gflops(ctx.comm, shape.precision, o.gemm_repeat);
      const double shapes = products.gflops(ctx.comm, shape.precision, o.gemm_repeat);
      const std::size_t first = results.size();
      for (int degree : o.degrees) {
        arm.layer->set_degrees(degree, degree);
        PassBreakdown& breakdown = breakdowns[{arm.dtype, degree}];
        PassTimes t = run_passes(ctx.comm, *arm.layer, executor, data, round == 1 ? 1 : 0, o.iters, loss_grads, nullptr,
                                 [&](const LayerPassRun& f, const LayerPassRun& b) { breakdown.add_pass(f, b); });
        const double rows = ctx.comm.allreduce_scalar(static_cast<double>(t.expert_rows), ReduceOp::max);
        // forward, input gradient and weight gradient: three times the forward's FLOPs
        const double flops = 3.0 * rows * shape.expert_flops_per_row();
        const double experts_ms = summarize(t.expert).median;
        results.push_back({round, arm.dtype, degree, peak, peak, rows, flops, slowest_rank(ctx.comm, t.forward).median,
                           slowest_rank(ctx.comm, t.backward).median,
                           -ctx.comm.allreduce_scalar(-experts_ms, ReduceOp::max),
                           ctx.comm.allreduce_scalar(experts_ms, ReduceOp::max), shapes});
      }
      const double peak_after = square.peak_gflops(ctx.comm, shape.precision, o.gemm_repeat);
      for (std::size_t i = first; i < results.size(); ++i) results[i].peak_after = peak_after;
    }
    // progress on stderr: a long run shows where it is and how the rounds come out
    std::string line;
    for (auto r = results.end() - static_cast<std::ptrdiff_t>(arms.size() * o.degrees.size()); r != results.end(); ++r)
      line += fmt::format("{}{} degree {} {:.3f}x", line.empty() ? "" : ", ", r->dtype, r->degree, r->ratio());
    log::info("bench floor: round {}/{}: {}", round, o.rounds, line);
  }
  const double ceiling = fma_ceiling_all_ranks(ctx.comm);
  std::map<std::pair<std::string, int>, std::vector<TaskTimeRow>> task_rows;
  for (const auto& [key, breakdown] : breakdowns) task_rows[key] = breakdown.slowest_rank_rows(ctx.comm);
  if (ctx.rank() != 0) return 0;

  std::unique_ptr<CsvWriter> csv;
  if (!o.csv.empty())
    csv = std::make_unique<CsvWriter>(o.csv, std::vector<std::string>{"round", "dtype", "degree", "peak_gflops", "expert_rows_max",
                                                                      "floor_ms", "forward_ms", "backward_ms", "layer_ms",
                                                                      "ratio", "peak_before_gflops", "peak_after_gflops",
                                                                      "steady", "experts_fastest_rank_ms",
                                                                      "experts_slowest_rank_ms", "experts_ratio",
                                                                      "shapes_gflops", "shapes_floor_ms", "shapes_ratio"});
  nlohmann::json summary = nlohmann::json::object();
  if (!o.json) {
    const MoeShape& s = o.shape;
    std::printf("the layer against its GEMM floor: %d ranks x %ld tokens, model %ld, hidden %ld (%s), %d experts, "
                "top-%d, capacity factor %.2f%s; %d rounds of %d passes\n",
                ctx.world(), static_cast<long>(s.tokens), static_cast<long>(s.model_dim), static_cast<long>(s.hidden),
                activation_name(s.activation), s.experts, s.top_k, s.capacity_factor,
                o.weights_change ? ", weights changing every pass" : "", o.rounds, o.iters);
    std::printf("%5s %5s %6s %10s %7s %10s %10s %10s %10s %10s %7s %11s %7s %7s %10s %7s\n", "round", "dtype", "degree",
                "peak GF/s", "drift", "rows", "floor ms", "fwd ms", "bwd ms", "layer ms", "ratio", "experts ms", "ratio",
                "ranks", "shapes GF", "ratio");
  }
  for (const RoundResult& r : results) {
    if (!o.json)
      std::printf("%5d %5s %6d %10.1f %+6.1f%% %10.0f %10.1f %10.1f %10.1f %10.1f %6.3fx %11.1f %6.3fx %+6.1f%% %10.1f "
                  "%6.3fx%s\n",
                  r.round, r.dtype.c_str(), r.degree, r.peak_gflops(), 100 * (r.peak_after / r.peak_before - 1),
                  r.expert_rows_max, r.floor_ms(), r.forward_ms, r.backward_ms, r.layer_ms(), r.ratio(),
                  r.experts_slowest_ms, r.experts_ratio(), 100 * r.rank_spread(), r.shapes_gflops, r.shapes_ratio(),
                  r.steady() ? "" : "  (host changed speed)");
    if (csv)
      csv->row({std::to_string(r.round), r.dtype, std::to_string(r.degree), fmt::format("{:.2f}", r.peak_gflops()),
                fmt::format("{:.0f}", r.expert_rows_max), fmt::format("{:.3f}", r.floor_ms()),
                fmt::format("{:.3f}", r.forward_ms), fmt::format("{:.3f}", r.backward_ms),
                fmt::format("{:.3f}", r.layer_ms()), fmt::format("{:.4f}", r.ratio()), fmt::format("{:.2f}", r.peak_before),
                fmt::format("{:.2f}", r.peak_after), r.steady() ? "1" : "0", fmt::format("{:.3f}", r.experts_fastest_ms),
                fmt::format("{:.3f}", r.experts_slowest_ms), fmt::format("{:.4f}", r.experts_ratio()),
                fmt::format("{:.2f}", r.shapes_gflops), fmt::format("{:.3f}", r.shapes_floor_ms()),
                fmt::format("{:.4f}", r.shapes_ratio())});
  }
  for (const Arm& arm : arms) {
    nlohmann::json per_degree = nlohmann::json::object();
    int best_degree = 0;
    double best_ratio = 0;
    for (int degree : o.degrees) {
      std::vector<double> ratios, steady_ratios, peaks, layer_ms, experts_ratios, spreads, shapes_ratios, shapes_gflops;
      for (const RoundResult& r : results)
        if (r.dtype == arm.dtype && r.degree == degree) {
          ratios.push_back(r.ratio()), peaks.push_back(r.peak_gflops()), layer_ms.push_back(r.layer_ms());
          experts_ratios.push_back(r.experts_ratio()), spreads.push_back(r.rank_spread());
          shapes_ratios.push_back(r.shapes_ratio()), shapes_gflops.push_back(r.shapes_gflops);
          if (r.steady()) steady_ratios.push_back(r.ratio());
        }
      const Summary ratio = summarize(ratios), peak = summarize(peaks), ms = summarize(layer_ms);
      const Summary experts = summarize(experts_ratios), spread = summarize(spreads);
      const Summary shapes = summarize(shapes_ratios), shapes_rate = summarize(shapes_gflops);
      const Summary steady = steady_ratios.empty() ? Summary{} : summarize(steady_ratios);
      per_degree[std::to_string(degree)] = {{"median_ratio", ratio.median}, {"min_ratio", ratio.min},
                                            {"max_ratio", ratio.max}, {"median_peak_gflops", peak.median},
                                            {"median_layer_ms", ms.median},
                                            {"median_experts_ratio", experts.median},
                                            {"median_rank_spread", spread.median},
                                            {"median_shapes_ratio", shapes.median},
                                            {"median_shapes_gflops", shapes_rate.median},
                                            {"steady_rounds", static_cast<int64_t>(steady_ratios.size())},
                                            {"steady_median_ratio", steady_ratios.empty() ? nlohmann::json(nullptr)
                                                                                          : nlohmann::json(steady.median)}};
      const std::vector<TaskTimeRow>& tasks = task_rows[{arm.dtype, degree}];
      per_degree[std::to_string(degree)]["tasks_ms"] = task_time_json(tasks);
      if (best_degree == 0 || ratio.median < best_ratio) best_degree = degree, best_ratio = ratio.median;
      if (!o.json)
        std::printf("%s, degree %d: layer/floor median %.3fx (rounds %.3f-%.3f), layer %.1f ms, peak %.1f GFLOP/s per "
                    "rank%s\n",
                    arm.dtype.c_str(), degree, ratio.median, ratio.min, ratio.max, ms.median, peak.median,
                    arm.dtype == "bf16" ? (" (bf16 path " + ctx.backend.bf16_path() + ")").c_str() : "");
      if (!o.json)
        std::printf("%s, degree %d: the %zu steady rounds (peak within %.0f%% across the round): median %s\n", arm.dtype.c_str(),
                    degree, steady_ratios.size(), 100 * RoundResult::kSteadyDrift,
                    steady_ratios.empty() ? "none" : fmt::format("{:.3f}x (rounds {:.3f}-{:.3f})", steady.median, steady.min, steady.max).c_str());
      if (!o.json)
        std::printf("%s, degree %d: the expert tasks alone %.3fx of the floor (slowest rank, median); the ranks' cores "
                    "%.1f%% apart on their experts (median, rounds %.1f-%.1f%%)\n",
                    arm.dtype.c_str(), degree, experts.median, 100 * spread.median, 100 * spread.min, 100 * spread.max);
      if (!o.json)
        std::printf("%s, degree %d: against its products at their own shapes' speed (%.1f GFLOP/s per rank, %.0f%% of the "
                    "peak): median %.3fx (rounds %.3f-%.3f)\n",
                    arm.dtype.c_str(), degree, shapes_rate.median, 100 * shapes_rate.median / peak.median, shapes.median,
                    shapes.min, shapes.max);
      if (!o.json) std::printf("%s, degree %d: beside the expert tasks, %s\n", arm.dtype.c_str(), degree,
                               beside_experts(tasks).c_str());
    }
    // the dtype's headline: its best degree (by median), as the planner would run it
    summary[arm.dtype] = per_degree[std::to_string(best_degree)];
    summary[arm.dtype].update({{"best_degree", best_degree}, {"degrees", per_degree},
                               {"bf16_path", ctx.backend.bf16_path()},
                               {"bf16_order", bf16_order_name()}});
  }
  if (!o.json && ceiling > 0)
    std::printf("the cores' FMA ceiling (independent FMA chains, no memory, every rank at once): %.1f GFLOP/s per rank\n",
                ceiling);
  if (o.json) {
    nlohmann::json j = {{"world_size", ctx.world()}, {"tokens", o.shape.tokens}, {"model_dim", o.shape.model_dim},
                        {"hidden", o.shape.hidden}, {"experts", o.shape.experts}, {"top_k", o.shape.top_k},
                        {"capacity_factor", o.shape.capacity_factor}, {"degrees", o.degrees},
                        {"weights_change", o.weights_change}, {"rounds", o.rounds}, {"iters", o.iters},
                        {"gemm_isa", gemm_isa()}, {"fma_ceiling_gflops", ceiling}, {"dtypes", summary}};
    nlohmann::json rows = nlohmann::json::array();
    for (const RoundResult& r : results)
      rows.push_back({{"round", r.round}, {"dtype", r.dtype}, {"degree", r.degree}, {"peak_gflops", r.peak_gflops()},
                      {"peak_before_gflops", r.peak_before}, {"peak_after_gflops", r.peak_after}, {"steady", r.steady()},
                      {"expert_rows_max", r.expert_rows_max}, {"floor_ms", r.floor_ms()}, {"forward_ms", r.forward_ms},
                      {"backward_ms", r.backward_ms}, {"ratio", r.ratio()},
                      {"experts_fastest_rank_ms", r.experts_fastest_ms}, {"experts_slowest_rank_ms", r.experts_slowest_ms},
                      {"experts_ratio", r.experts_ratio()}, {"shapes_gflops", r.shapes_gflops},
                      {"shapes_floor_ms", r.shapes_floor_ms()}, {"shapes_ratio", r.shapes_ratio()}});
    j["results"] = rows;
    std::printf("%s\n", j.dump().c_str());
  }
  return 0;
}

}  // namespace

void add_bench_floor_command(CLI::App& bench, CommandFn& run) {
  auto o = std::make_shared<FloorOptions>();
  CLI::App* cmd = bench.add_subcommand("floor", "the layer (forward + backward) against its GEMM floor, interleaved rounds");
  add_layer_shape_options(cmd, o->shape);
  cmd->add_option("--dtypes", o->dtypes, "dtypes measured in turn in each round: fp32, bf16")
      ->delimiter(',')
      ->capture_default_str();
  cmd->add_option("--rounds", o->rounds, "rounds (each: the peak, the layer, the peak again, per dtype)")->capture_default_str();
  cmd->add_option("--iters", o->iters, "layer passes per round and dtype (their median)")->capture_default_str();
  cmd->add_option("--gemm-repeat", o->gemm_repeat, "timed 2048^3 products per round and dtype (their median)")
      ->capture_default_str();
  cmd->add_option("--degree", o->degrees, "pipeline degrees (forward and backward), each measured in every round")
      ->delimiter(',')
      ->capture_default_str();
  cmd->add_option("--seed", o->seed, "random seed")->capture_default_str();
  cmd->add_flag("--weights-change", o->weights_change,
                "mark the weights changed before every pass, so each pass packs them again (a training step's cost)");
  cmd->add_option("--csv", o->csv, "write one row per round and dtype as CSV");
  cmd->add_flag("--json", o->json, "print one JSON object (rank 0) instead of the table");
  cmd->callback([o, cmd, &run] {
    // --dtype (the layer's flag) measures that one dtype; --dtypes a list
    const bool one = cmd->get_option("--dtype")->count() > 0, list = cmd->get_option("--dtypes")->count() > 0;
    PM_REQUIRE(!(one && list), "give --dtype or --dtypes, not both");
    if (one) o->dtypes = {precision_name(o->shape.precision)};
    run = [o](Context& ctx) { return run_floor_bench(ctx, *o); };
  });
}

}  // namespace pm::cli
