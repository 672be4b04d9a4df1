// pipemoe bench layer: a grid of MoE layer shapes, every pipeline degree measured and predicted.
//
//   scripts/emulate-cluster --hosts 2 --rate 1gbit -- mpirun -np 2 build/pipemoe bench layer
//       --profile profile.json [--grid small|tiny|full | --shapes "T,M,H,E,k[,f];..."] [--rounds 10]
//       [--iters 1] [--csv out/bench_layer.csv]
// For each shape, in interleaved rounds (this host's speed drifts by 10% and more within seconds,
// so every degree and the bound must see the same drift): each lane alone (the bound), then every
// candidate degree, starting each round at another degree, forward and backward; medians over the
// rounds. Writes one CSV row per shape and degree, and prints how the planner's choices compare
// with the best measured degrees and with the bounds.
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <map>
#include <sstream>

#include "apps/pipemoe/bench_layer_report.h"
#include "apps/pipemoe/command.h"
#include "apps/pipemoe/layer_runner.h"
#include "core/csv.h"
#include "core/round_medians.h"
#include "core/log.h"
#include "perf/degree_choice.h"
#include "perf/model_check.h"
#include "perf/planner.h"
#include "sched/executor.h"

namespace pm::cli {
namespace {

struct BenchLayerOptions {
  std::string profile;
  std::string grid = "small";
  std::string shapes;  // "T,M,H,E,k[,f];...": the user's own grid instead
  std::vector<int> degrees = {1, 2, 3, 4, 6, 8};
  int rounds = 10;
  int iters = 1;
  int refine = 3;
  std::string csv = "out/bench_layer.csv";
  Precision dtype = Precision::fp32;  // every shape's
};

// Shapes in the spirit of PipeMoE's 174 layers (tokens, model and hidden dimensions, experts,
// top-k), scaled to what a 2-core machine runs in minutes.
std::vector<MoeShape> grid_shapes(const std::string& grid, int ranks) {
  std::vector<int64_t> tokens = {1024, 2048}, model = {256, 512}, hidden = {512, 1024, 2048};
  std::vector<int> experts_per_rank = {1, 4}, topk = {1, 2};
  if (grid == "tiny") tokens = {1024}, model = {256, 512}, hidden = {512, 2048}, experts_per_rank = {2}, topk = {2};
  if (grid == "full") tokens = {512, 1024, 2048}, model = {256, 512, 1024}, experts_per_rank = {1, 2, 4};
  PM_REQUIRE(grid == "tiny" || grid == "small" || grid == "full", "--grid must be tiny, small or full, got '{}'", grid);
  std::vector<MoeShape> out;
  for (int64_t t : tokens)
    for (int64_t m : model)
      for (int64_t h : hidden)
        for (int e : experts_per_rank)
          for (int k : topk) out.push_back({t, m, h, e * ranks, k, 1.25, ranks});
  return out;
}

// "T,M,H,E,k[,f];...": tokens per rank, model dim, hidden, experts over all ranks, top-k and
// (default 1.25) the capacity factor, for each shape.
std::vector<MoeShape> parse_shapes(const std::string& text, int ranks) {
  std::vector<MoeShape> out;
  std::stringstream all(text);
  std::string one;
  while (std::getline(all, one, ';')) {
    if (one.find_first_not_of(" ") == std::string::npos) continue;
    std::vector<double> v;
    std::stringstream fields(one);
    std::string field;
    while (std::getline(fields, field, ',')) {
      std::size_t used = 0;
      double x = 0;
      try {
        x = std::stod(field, &used);
      } catch (const std::exception&) {
        used = 0;
      }
      PM_REQUIRE(used > 0 && field.find_first_not_of(" ", used) == std::string::npos,
                 "--shapes: '{}' in '{}' is not a number (each shape is T,M,H,E,k[,f])", field, one);
      v.push_back(x);
    }
    PM_REQUIRE(v.size() == 5 || v.size() == 6, "--shapes: '{}' has {} numbers; each shape is T,M,H,E,k[,f]", one, v.size());
    for (std::size_t i = 0; i < 5; ++i)
      PM_REQUIRE(v[i] == std::floor(v[i]) && v[i] >= 1 && v[i] < 1e9, "--shapes: '{}': T, M, H, E and k must be positive whole numbers", one);
    MoeShape s{static_cast<int64_t>(v[0]), static_cast<int64_t>(v[1]), static_cast<int64_t>(v[2]), static_cast<int>(v[3]),
               static_cast<int>(v[4]), v.size() == 6 ? v[5] : 1.25, ranks};
    s.validate();
    out.push_back(s);
  }
  PM_REQUIRE(!out.empty(), "--shapes needs at least one shape T,M,H,E,k[,f]");
  return out;
}

struct DegreeResult {
  double forward_ms = 0, backward_ms = 0, predicted_fwd_ms = 0, predicted_bwd_ms = 0;
  double spread = 0;  // (max - min) / median over rounds, drift taken out: the noise left
};

double median_of(std::vector<double> v) { return summarize(std::move(v)).median; }

// What each field of a shape's line means, once, before the first.
void print_legend() {
  std::printf(
      "Each shape's line (times: forward + backward in ms, medians over the rounds with each round's drift taken out):\n"
      "  comm       share of the layer's time, lanes run one after the other, that is communication\n"
      "  planner    the degrees the planner picks from the profile (forward/backward), their measured time, and\n"
      "             how much slower that is than the best measured degrees (+%%)\n"
      "  refined    the same after timing the planner's best --refine degrees on the first passes (+%% vs best)\n"
      "  best       the fastest measured degrees (forward/backward chosen apart) and their time\n"
      "  vs degree 1  degree 1's time over the planner's (x: speedup of pipelining)\n"
      "  / bound    the planner's time over max(all communication, all computation); per pass: over the sum of\n"
      "             that max for forward and backward (what a schedule of one pass at a time can reach)\n"
      "The summary's round-to-round spread is (max - min) / median of a degree's time across rounds: the noise.\n\n");
  std::fflush(stdout);
}

// Draws the CSV with bench/plot_layer.py when python3 and matplotlib are there; says where.
void draw_plots(const std::string& csv) {
  namespace fs = std::filesystem;
  std::error_code ec;
  fs::path script = fs::read_symlink("/proc/self/exe", ec).parent_path().parent_path() / "bench" / "plot_layer.py";
  const std::string out = fs::path(csv).replace_extension("").string();
  if (ec || !fs::exists(script) || std::system("/usr/bin/python3 -c 'import matplotlib' >/dev/null 2>&1") != 0) {
    std::printf("no plots drawn (needs python3-matplotlib: scripts/setup bench), draw them later with: "
                "/usr/bin/python3 bench/plot_layer.py %s --out %s\n", csv.c_str(), out.c_str());
    return;
  }
  std::string cmd = "/usr/bin/python3 '" + script.string() + "' '" + csv + "' --out '" + out + "' >/dev/null 2>&1";
  if (std::system(cmd.c_str()) == 0)
    std::printf("plots: %s_degrees.png, %s_regret.png, %s_prediction.png, %s_bound.png\n", out.c_str(), out.c_str(),
                out.c_str(), out.c_str());
  else
    std::printf("drawing the plots failed: %s\n", cmd.c_str());
}

int run_bench_layer(Context& ctx, const BenchLayerOptions& o) {
  PM_REQUIRE(!o.profile.empty(), "bench layer needs --profile FILE (take one with `pipemoe profile`)");
  PM_REQUIRE(o.rounds >= 1 && o.iters >= 1, "--rounds and --iters must be at least 1");
  PerfProfile profile = load_profile_for(ctx.comm, o.profile, describe_cluster(ctx.comm, ctx.backend));
  warn_if_other_dtype(profile, o.profile, precision_name(o.dtype), ctx.backend.bf16_path());
  std::vector<MoeShape> shapes = o.shapes.empty() ? grid_shapes(o.grid, ctx.world()) : parse_shapes(o.shapes, ctx.world());
  for (MoeShape& s : shapes) s.precision = o.dtype;
  if (ctx.rank() == 0) print_legend();
  std::unique_ptr<CsvWriter> csv;
  if (ctx.rank() == 0)
    csv = std::make_unique<CsvWriter>(
        o.csv, std::vector<std::string>{"shape", "tokens", "model_dim", "hidden", "experts", "top_k", "capacity_factor",
                                        "ranks", "degree", "forward_ms", "backward_ms", "predicted_fwd_ms",
                                        "predicted_bwd_ms", "comm_alone_ms", "compute_alone_ms", "planner_fwd_degree",
                                        "planner_bwd_degree", "refined_fwd_degree", "refined_bwd_degree",
                                        "best_fwd_degree", "best_bwd_degree", "round_spread", "comm_fwd_alone_ms",
                                        "comm_bwd_alone_ms", "compute_fwd_alone_ms", "compute_bwd_alone_ms",
                                        "chosen_over_bound", "chosen_over_pass_bound"});
  std::vector<ShapeSummary> summaries;
  std::vector<double> prediction_errors;
  // over all shapes: fixed degree -> summed ms and how many shapes could run it
  std::map<int, std::pair<double, std::size_t>> fixed_sums;
  // per degree, forward and backward: rank 0's tasks measured against their simulation
  std::map<int, PassCheck> checks_fwd, checks_bwd;

  for (std::size_t si = 0; si < shapes.size(); ++si) {
    const MoeShape& s = shapes[si];
    Executor executor;
    std::unique_ptr<MoeLayer> layer_ptr = moe_strategy("ep").make_layer(s, ctx.comm, ctx.backend);
    MoeLayer& layer = *layer_ptr;
    layer.init_parameters(1);
    LayerData data = make_layer_data(s.tokens, s.model_dim, 1, ctx.rank());
    const int64_t capacity = s.capacity();
    // What `--degree auto --profile` does: plan; and with `--refine`, time the planner's best few
    // on the first passes.
    layer.set_degrees(1, 1);
    run_passes(ctx.comm, layer, executor, data, 1, 0, 0.01f);
    const LayerPlan plan = plan_layer(profile, s);
    // the same planner with the interference as measured directly, before the refit on
    // overlapped passes: what the refit changed, in the same rounds
    PerfProfile direct_profile = profile;
    direct_profile.interference = profile.interference_measured;
    const LayerPlan direct = plan_layer(direct_profile, s);
    DegreeChoice refined = choose_degrees(0, 0, &profile, s, o.refine, [&](int f, int b) {
      layer.set_degrees(f, b);
      PassTimes t = run_passes(ctx.comm, layer, executor, data, 0, 1, 0.01f);
      return std::make_pair(slowest_rank(ctx.comm, t.forward).median, slowest_rank(ctx.comm, t.backward).median);
    });
    std::vector<int> degrees;
    for (int d : o.degrees)
      if (d <= capacity) degrees.push_back(d);
    for (int d : {plan.forward_degree, plan.backward_degree, refined.forward, refined.backward, direct.forward_degree,
                  direct.backward_degree})
      if (std::find(degrees.begin(), degrees.end(), d) == degrees.end()) degrees.push_back(d);
    std::sort(degrees.begin(), degrees.end());
    log::info("bench layer: shape {}/{}: T={} M={} H={} E={} k={}, degrees {}", si + 1, shapes.size(), s.tokens,
              s.model_dim, s.hidden, s.experts, s.top_k, fmt::join(degrees, ","));

    layer.set_degrees(1, 1);
    run_passes(ctx.comm, layer, executor, data, 1, 0, 0.01f);
    std::vector<LanesAlone> alone_rounds;
    std::map<int, std::vector<double>> fwd, bwd;
    for (int round = 0; round < o.rounds; ++round) {
      layer.set_degrees(1, 1);
      alone_rounds.push_back(time_lanes_alone(ctx.comm, layer, data, o.iters, 0.01f, /*warmup=*/0));
      for (std::size_t i = 0; i < degrees.size(); ++i) {
        int d = degrees[(i + round) % degrees.size()];
        layer.set_degrees(d, d);
        PassTimes t = run_passes(ctx.comm, layer, executor, data, 0, o.iters, 0.01f, nullptr,
                                 [&](const LayerPassRun& f, const LayerPassRun& b) {
                                   if (ctx.rank() != 0) return;
                                   checks_fwd[d].add(check_pass(profile, f.graph, f.records, f.stats.wall_ms / 1e3));
                                   checks_bwd[d].add(check_pass(profile, b.graph, b.records, b.stats.wall_ms / 1e3));
                                 });
        fwd[d].push_back(slowest_rank(ctx.comm, t.forward).median);
        bwd[d].push_back(slowest_rank(ctx.comm, t.backward).median);
      }
    }
    const LanesAlone alone = median_lanes(alone_rounds);
    if (ctx.rank() != 0) continue;

    const RoundMedians fwd_medians = round_medians(fwd), bwd_medians = round_medians(bwd);
    std::map<int, DegreeResult> results;
    int best_f = degrees[0], best_b = degrees[0];
    for (int d : degrees) {
      DegreeResult& r = results[d];
      r.forward_ms = fwd_medians.median.at(d);
      r.backward_ms = bwd_medians.median.at(d);
      r.spread = std::max(fwd_medians.spread.at(d), bwd_medians.spread.at(d));
      for (const auto& c : plan.candidates)
        if (c.degree == d) r.predicted_fwd_ms = c.forward_s * 1e3, r.predicted_bwd_ms = c.backward_s * 1e3;
      if (r.forward_ms < results[best_f].forward_ms) best_f = d;
      if (r.backward_ms < results[best_b].backward_ms) best_b = d;
      prediction_errors.push_back(std::abs(r.predicted_fwd_ms - r.forward_ms) / r.forward_ms);
      prediction_errors.push_back(std::abs(r.predicted_bwd_ms - r.backward_ms) / r.backward_ms);
    }
    // the chosen degrees against the bounds, round by round (both measured in the same round)
    std::vector<double> bound_ratios, pass_bound_ratios;
    for (int round = 0; round < o.rounds; ++round) {
      double chosen = fwd[plan.forward_degree][round] + bwd[plan.backward_degree][round];
      bound_ratios.push_back(chosen / alone_rounds[round].bound_ms());
      pass_bound_ratios.push_back(chosen / alone_rounds[round].pass_bound_ms());
    }
    const double bound_ratio = median_of(bound_ratios);
    const double pass_bound_ratio = median_of(pass_bound_ratios);
    for (int d : degrees) {
      const DegreeResult& r = results[d];
      csv->row({std::to_string(si), std::to_string(s.tokens), std::to_string(s.model_dim), std::to_string(s.hidden),
                std::to_string(s.experts), std::to_string(s.top_k), fmt::format("{}", s.capacity_factor),
                std::to_string(s.ranks), std::to_string(d), fmt::format("{:.3f}", r.forward_ms),
                fmt::format("{:.3f}", r.backward_ms), fmt::format("{:.3f}", r.predicted_fwd_ms),
                fmt::format("{:.3f}", r.predicted_bwd_ms), fmt::format("{:.3f}", alone.comm_ms()),
                fmt::format("{:.3f}", alone.compute_ms()), std::to_string(plan.forward_degree),
                std::to_string(plan.backward_degree), std::to_string(refined.forward),
                std::to_string(refined.backward), std::to_string(best_f), std::to_string(best_b),
                fmt::format("{:.4f}", r.spread), fmt::format("{:.3f}", alone.comm_fwd_ms),
                fmt::format("{:.3f}", alone.comm_bwd_ms), fmt::format("{:.3f}", alone.compute_fwd_ms),
                fmt::format("{:.3f}", alone.compute_bwd_ms), fmt::format("{:.4f}", bound_ratio),
                fmt::format("{:.4f}", pass_bound_ratio)});
    }
    for (int d : o.degrees)
      if (results.count(d)) fixed_sums[d].first += results[d].forward_ms + results[d].backward_ms, ++fixed_sums[d].second;
    ShapeSummary sum;
    sum.chosen = results[plan.forward_degree].forward_ms + results[plan.backward_degree].backward_ms;
    sum.refined = results[refined.forward].forward_ms + results[refined.backward].backward_ms;
    sum.direct = results[direct.forward_degree].forward_ms + results[direct.backward_degree].backward_ms;
    sum.best_cross = best_on_held_out_rounds(fwd, plan.forward_degree, results[plan.forward_degree].forward_ms) +
                     best_on_held_out_rounds(bwd, plan.backward_degree, results[plan.backward_degree].backward_ms);
    sum.best = results[best_f].forward_ms + results[best_b].backward_ms;
    sum.d1 = results[1].forward_ms + results[1].backward_ms;
    sum.d4 = results.count(4) ? results[4].forward_ms + results[4].backward_ms : 0;
    sum.bound_ratio = bound_ratio;
    sum.pass_bound_ratio = pass_bound_ratio;
    sum.comm_share = alone.comm_ms() / (alone.comm_ms() + alone.compute_ms());
    sum.noise = std::max({results[plan.forward_degree].spread, results[plan.backward_degree].spread,
                          results[best_f].spread, results[best_b].spread});
    summaries.push_back(sum);
    std::printf("shape %2zu T=%-5ld M=%-5ld H=%-5ld E=%-3d k=%d | comm %4.1f%% | planner %d/%d %7.1f ms %+5.1f%% | "
                "refined %d/%d %+5.1f%% | best %d/%d %7.1f ms | vs degree 1 x%.2f | / bound %.2f, per pass %.2f\n",
                si, static_cast<long>(s.tokens), static_cast<long>(s.model_dim), static_cast<long>(s.hidden), s.experts,
                s.top_k, sum.comm_share * 100, plan.forward_degree, plan.backward_degree, sum.chosen,
                (sum.chosen / sum.best - 1) * 100, refined.forward, refined.backward, (sum.refined / sum.best - 1) * 100,
                best_f, best_b, sum.best, sum.d1 / sum.chosen, sum.bound_ratio, sum.pass_bound_ratio);
    std::fflush(stdout);
  }
  if (ctx.rank() != 0) return 0;

  int within5 = 0, refined5 = 0, bounded = 0, pass_bounded = 0, in_range = 0, within_noise = 0;
  std::vector<double> vs1, vs4, bound_ratio, pass_bound_ratio, noise;
  for (const ShapeSummary& s : summaries) {
    within5 += s.chosen <= 1.05 * s.best;
    within_noise += s.chosen <= (1 + std::max(0.05, s.noise)) * s.best;
    noise.push_back(s.noise);
    refined5 += s.refined <= 1.05 * s.best;
    vs1.push_back(s.d1 / s.chosen);
    if (s.d4 > 0) vs4.push_back(s.d4 / s.chosen);
    if (s.comm_share >= 0.3 && s.comm_share <= 0.7) {
      ++in_range;
      bound_ratio.push_back(s.bound_ratio);
      bounded += s.bound_ratio <= 1.15;
      pass_bound_ratio.push_back(s.pass_bound_ratio);
      pass_bounded += s.pass_bound_ratio <= 1.15;
    }
  }
  auto dist = [](const std::vector<double>& v) {
    Summary s = summarize(v);
    return fmt::format("min {:.2f} median {:.2f} max {:.2f}", s.min, s.median, s.max);
  };
  std::printf("\n%zu shapes on %s\n", summaries.size(), profile.cluster.summary().c_str());
  std::printf("planner within 5%% of the best measured degrees: %d of %zu shapes (%.0f%%)\n", within5, summaries.size(),
              100.0 * within5 / summaries.size());
  std::printf("round-to-round spread of those measurements: %s; planner within 5%% or within that spread: "
              "%d of %zu shapes (%.0f%%)\n", dist(noise).c_str(), within_noise, summaries.size(),
              100.0 * within_noise / summaries.size());
  std::printf("planner + online refinement (its best %d timed): %d of %zu shapes (%.0f%%)\n", o.refine, refined5,
              summaries.size(), 100.0 * refined5 / summaries.size());
  std::printf("speedup of the planner's degrees over degree 1: %s\n", dist(vs1).c_str());
  if (!vs4.empty()) std::printf("speedup over a fixed degree 4: %s\n", dist(vs4).c_str());
  if (in_range) {
    std::printf("shapes with communication 30-70%% of the sequential time: %d\n", in_range);
    std::printf("  chosen / max(all comm, all compute): %s; within 1.15x: %d (%.0f%%)\n", dist(bound_ratio).c_str(),
                bounded, 100.0 * bounded / in_range);
    std::printf("  chosen / sum over passes of max(comm, compute): %s; within 1.15x: %d (%.0f%%)\n",
                dist(pass_bound_ratio).c_str(), pass_bounded, 100.0 * pass_bounded / in_range);
  }
  std::printf("prediction error |predicted - measured| / measured: median %.1f%% over %zu (shape, degree, direction)\n",
              summarize(prediction_errors).median * 100, prediction_errors.size());
  print_sums(summaries, fixed_sums, o.csv);
  print_model_check(checks_fwd, checks_bwd, o.csv);
  std::printf("wrote %s\n", o.csv.c_str());
  csv.reset();  // flushed before the plots read it
  draw_plots(o.csv);
  return 0;
}

}  // namespace

void add_bench_layer_command(CLI::App& bench, CommandFn& run) {
  auto o = std::make_shared<BenchLayerOptions>();
  CLI::App* cmd = bench.add_subcommand("layer", "a grid of layer shapes: every degree measured and predicted");
  cmd->add_option("--profile", o->profile, "performance profile: required (take one with `pipemoe profile --out FILE`)");
  cmd->add_option("--grid", o->grid, "tiny (4 shapes), small (48) or full (162)")->capture_default_str();
  cmd->add_option("--shapes", o->shapes,
                  "your own shapes instead of a grid: \"T,M,H,E,k[,f];...\" (tokens per rank, model dim, hidden, "
                  "experts over all ranks, top-k, capacity factor, default 1.25)");
  cmd->add_option("--degrees", o->degrees, "degrees to measure (the planner's picks are added)")->delimiter(',')->capture_default_str();
  cmd->add_option("--rounds", o->rounds, "interleaved rounds over the bound and the degrees")->capture_default_str();
  cmd->add_option("--iters", o->iters, "timed passes per degree (and lanes alone) in each round")->capture_default_str();
  cmd->add_option("--refine", o->refine, "how many of the planner's best degrees the refinement times")->capture_default_str();
  cmd->add_option("--csv", o->csv, "CSV file to write")->capture_default_str();
  add_dtype_option(cmd, o->dtype, "every shape's precision: fp32, or bf16 (GEMMs and all-to-all payloads)");
  cmd->callback([o, &run] { run = [o](Context& ctx) { return run_bench_layer(ctx, *o); }; });
}

}  // namespace pm::cli
