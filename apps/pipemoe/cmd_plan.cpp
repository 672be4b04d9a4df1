// pipemoe plan: the planner's predictions for one layer shape, per pipeline degree.
//
//   build/pipemoe plan --profile profile.json --tokens 2048 --model-dim 512 --hidden 1024
//       --experts 8 --top-k 2 --capacity-factor 1.25 [--json] [--trace FILE [--trace-degree N]]
// Runs on one process: the rank count is the profile's. Prints predicted forward and backward
// time for every candidate degree and the degrees it would choose.
#include <fmt/format.h>

#include <fstream>
#include <nlohmann/json.hpp>

#include "apps/pipemoe/command.h"
#include "core/log.h"
#include "moe/moe_layer.h"
#include "perf/planner.h"

namespace pm::cli {
namespace {

struct PlanOptions {
  std::string profile;
  MoeShape shape{2048, 512, 1024, 8, 2, 1.25, 1};  // ranks: the profile's
  std::string strategy = "ep";
  bool json = false;
  std::string trace;
  int trace_degree = 0;  // 0: the chosen degrees
  // --strategy all: the dense work beside each MoE layer (ms per rank; backward default: twice
  // the forward's), which ScMoE's shortcut lets the layer's all-to-all overlap
  double dense_fwd_ms = 0, dense_bwd_ms = -1;
};

// The simulated forward and backward passes at the given degrees, as a Chrome trace: the
// prediction, to lay beside a real run's trace (pipemoe layer --trace).
void write_predicted_trace(const std::string& path, const PerfProfile& profile, const MoeStrategy& strategy,
                           const MoeShape& s, int forward_degree, int backward_degree) {
  nlohmann::json events = nlohmann::json::array();
  events.push_back({{"name", "process_name"}, {"ph", "M"}, {"pid", 0}, {"args", {{"name", "predicted"}}}});
  for (int lane = 0; lane < lane_count(); ++lane)
    events.push_back({{"name", "thread_name"}, {"ph", "M"}, {"pid", 0}, {"tid", lane},
                      {"args", {{"name", lane_name(Lane{lane})}}}});
  double offset = 0;
  for (bool forward : {true, false}) {
    int degree = forward ? forward_degree : backward_degree;
    TaskGraph g;
    if (forward)
      strategy.plan_forward(g, {}, s, degree);
    else
      strategy.plan_backward(g, {}, s, degree);
    Simulation sim = simulate(g, [&](const Task& t) { return profile.predict(t); }, profile.interference);
    for (int id = 0; id < g.size(); ++id)
      events.push_back({{"name", g.tasks()[id].name}, {"cat", forward ? "forward" : "backward"}, {"ph", "X"},
                        {"pid", 0}, {"tid", g.tasks()[id].lane.id},
                        {"ts", (offset + sim.start_s[id]) * 1e6}, {"dur", (sim.end_s[id] - sim.start_s[id]) * 1e6}});
    offset += sim.makespan_s;
  }
  std::ofstream out(path);
  PM_IO_CHECK(out.good(), "cannot write trace file {}", path);
  out << nlohmann::json{{"traceEvents", events}, {"displayTimeUnit", "ms"}}.dump() << "\n";
}

// --strategy all: every strategy on the same model and global batch: expert parallelism with
// --tokens per rank over the profile's P ranks, PPMoE with one tensor-parallel group of the P
// ranks holding all P T tokens (its dense parts split P ways: the same dense work per rank), and,
// given the dense work beside the layer (dense_fwd_s > 0), ScMoE: the EP layer whose all-to-alls
// overlap that dense work (the planner's window, perf/planner.h plan_window). With dense work,
// every row's times include it: EP and PPMoE run it before the layer, ScMoE beside it.
int compare_strategies(const PerfProfile& profile, MoeShape shape, bool json, double dense_fwd_s, double dense_bwd_s) {
  struct Row {
    std::string name;
    MoeShape shape;
    LayerPlan plan;
    double global_tokens = 0;
    double tokens_per_s() const { return global_tokens / (plan.forward_s + plan.backward_s); }
  };
  std::vector<Row> rows;
  for (const char* name : {"ep", "ppmoe"}) {
    MoeShape s = shape;
    if (std::string(name) == "ppmoe") s.tokens = shape.tokens * shape.ranks;
    rows.push_back({name, s, plan_layer(profile, s, kPlanTolerance, moe_strategy(name)),
                    static_cast<double>(shape.tokens * shape.ranks)});
    rows.back().plan.forward_s += dense_fwd_s, rows.back().plan.backward_s += dense_bwd_s;
  }
  if (dense_fwd_s > 0) {
    const WindowPlan f = plan_window(profile, shape, {dense_fwd_s}, /*forward=*/true);
    const WindowPlan b = plan_window(profile, shape, {dense_bwd_s}, /*forward=*/false);
    LayerPlan window;
    window.forward_degree = f.degree, window.backward_degree = b.degree;
    window.forward_s = f.predicted_s, window.backward_s = b.predicted_s;
    rows.push_back({"scmoe", shape, window, static_cast<double>(shape.tokens * shape.ranks)});
  }
  const Row* best = &rows[0];
  for (const Row& r : rows)
    if (r.tokens_per_s() > best->tokens_per_s()) best = &r;
  if (json) {
    nlohmann::json j = nlohmann::json::array();
    for (const Row& r : rows)
      j.push_back({{"strategy", r.name}, {"tokens", r.shape.tokens}, {"degree_fwd", r.plan.forward_degree},
                   {"degree_bwd", r.plan.backward_degree}, {"predicted_fwd_ms", r.plan.forward_s * 1e3},
                   {"predicted_bwd_ms", r.plan.backward_s * 1e3}, {"tokens_per_s", r.tokens_per_s()},
                   {"dense_fwd_ms", dense_fwd_s * 1e3}, {"dense_bwd_ms", dense_bwd_s * 1e3}});
    std::printf("%s\n", nlohmann::json{{"strategies", j}, {"chosen", best->name}, {"cluster", profile.cluster.summary()}}
                             .dump()
                             .c_str());
    return 0;
  }
  std::printf("strategies for a global batch of %ld tokens, M=%ld H=%ld E=%d k=%d f=%.2f on %s\n",
              static_cast<long>(shape.tokens * shape.ranks), static_cast<long>(shape.model_dim),
              static_cast<long>(shape.hidden), shape.experts, shape.top_k, shape.capacity_factor,
              profile.cluster.summary().c_str());
  std::printf("%-8s %-34s %8s %12s %12s %12s\n", "strategy", "layout", "degrees", "forward ms", "backward ms",
              "tokens/s");
  for (const Row& r : rows) {
    std::string layout =
        r.name == "ep"      ? fmt::format("{} ranks x {} tokens, all-to-all", r.shape.ranks, r.shape.tokens)
        : r.name == "ppmoe" ? fmt::format("1 group of {} x {} tokens, all-reduce", r.shape.ranks, r.shape.tokens)
                            : fmt::format("{} ranks x {} tokens, behind the dense", r.shape.ranks, r.shape.tokens);
    std::printf("%-8s %-34s %4d/%-3d %12.2f %12.2f %12.0f%s\n", r.name.c_str(), layout.c_str(), r.plan.forward_degree,
                r.plan.backward_degree, r.plan.forward_s * 1e3, r.plan.backward_s * 1e3, r.tokens_per_s(),
                &r == best ? " *" : "");
  }
  if (dense_fwd_s > 0)
    std::printf("(each row with %.2f ms forward and %.2f ms backward of dense work beside the layer)\n",
                dense_fwd_s * 1e3, dense_bwd_s * 1e3);
  std::printf("chosen: %s\n", best->name.c_str());
  return 0;
}

int run_plan(Context& ctx, const PlanOptions& o) {
  PM_REQUIRE(!o.profile.empty(), "plan needs --profile FILE (take one with `pipemoe profile`)");
  PM_REQUIRE(o.shape.tokens > 0, "--tokens must be positive, got {}", o.shape.tokens);
  // Planning is offline: the profile says how many ranks the layer runs on.
  PerfProfile profile = PerfProfile::load(o.profile);
  warn_if_untrusted(profile, o.profile);
  warn_if_other_dtype(profile, o.profile, precision_name(o.shape.precision), ctx.backend.bf16_path());
  MoeShape shape = o.shape;
  shape.ranks = profile.cluster.world_size;
  shape.validate();
  PM_REQUIRE(o.dense_fwd_ms >= 0, "--dense-fwd-ms must not be negative, got {}", o.dense_fwd_ms);
  const double dense_bwd_ms = o.dense_bwd_ms >= 0 ? o.dense_bwd_ms : 2 * o.dense_fwd_ms;
  if (o.strategy == "all")
    return ctx.rank() == 0 ? compare_strategies(profile, shape, o.json, o.dense_fwd_ms / 1e3, dense_bwd_ms / 1e3) : 0;
  const MoeStrategy& strategy = moe_strategy(o.strategy);
  LayerPlan plan = plan_layer(profile, shape, kPlanTolerance, strategy);
  if (ctx.rank() != 0) return 0;
  if (!o.trace.empty()) {
    if (o.trace_degree != 0) shape.check_degree(o.trace_degree, "--trace-degree");
    write_predicted_trace(o.trace, profile, strategy, shape, o.trace_degree ? o.trace_degree : plan.forward_degree,
                          o.trace_degree ? o.trace_degree : plan.backward_degree);
    log::info("pipemoe plan: wrote the predicted schedule to {} (open it in ui.perfetto.dev or chrome://tracing)",
              o.trace);
  }
  if (o.json) {
    nlohmann::json c = nlohmann::json::array();
    for (const auto& p : plan.candidates)
      c.push_back({{"degree", p.degree}, {"forward_ms", p.forward_s * 1e3}, {"backward_ms", p.backward_s * 1e3}});
    nlohmann::json j = {{"degree_fwd", plan.forward_degree}, {"degree_bwd", plan.backward_degree},
                        {"predicted_fwd_ms", plan.forward_s * 1e3}, {"predicted_bwd_ms", plan.backward_s * 1e3},
                        {"candidates", c}, {"cluster", profile.cluster.summary()}};
    std::printf("%s\n", j.dump().c_str());
    return 0;
  }
  std::printf("plan for T=%ld M=%ld H=%ld E=%d k=%d f=%.2f (%s) on %s\n", static_cast<long>(shape.tokens),
              static_cast<long>(shape.model_dim), static_cast<long>(shape.hidden), shape.experts, shape.top_k,
              shape.capacity_factor, strategy.name().c_str(), profile.cluster.summary().c_str());
  std::printf("%8s %14s %14s\n", "degree", "forward ms", "backward ms");
  for (const auto& p : plan.candidates)
    std::printf("%8d %13.2f%s %13.2f%s\n", p.degree, p.forward_s * 1e3, p.degree == plan.forward_degree ? "*" : " ",
                p.backward_s * 1e3, p.degree == plan.backward_degree ? "*" : " ");
  std::printf("chosen: forward %d (%.2f ms), backward %d (%.2f ms)\n", plan.forward_degree, plan.forward_s * 1e3,
              plan.backward_degree, plan.backward_s * 1e3);
  return 0;
}

}  // namespace

void add_plan_command(CLI::App& app, CommandFn& run) {
  auto o = std::make_shared<PlanOptions>();
  CLI::App* cmd = app.add_subcommand("plan", "predict a layer's time per pipeline degree and choose");
  cmd->add_option("--profile", o->profile, "performance profile: required (take one with `pipemoe profile --out FILE`)");
  add_layer_shape_options(cmd, o->shape);
  cmd->add_option("--strategy", o->strategy,
                  "ep (all-to-all expert parallelism), ppmoe (one tensor-parallel group of the profile's ranks; "
                  "--tokens per group), or all: both (and ScMoE with --dense-fwd-ms) on the same global batch, and "
                  "which it would pick")
      ->capture_default_str();
  cmd->add_option("--dense-fwd-ms", o->dense_fwd_ms,
                  "--strategy all: the dense work beside the layer (ms per rank, e.g. the attention before it in a "
                  "training trace): adds ScMoE, whose all-to-alls overlap it");
  cmd->add_option("--dense-bwd-ms", o->dense_bwd_ms, "the same in the backward (default: twice --dense-fwd-ms)");
  cmd->add_flag("--json", o->json, "print one JSON object");
  cmd->add_option("--trace", o->trace, "write the predicted schedule as a Chrome/Perfetto trace");
  cmd->add_option("--trace-degree", o->trace_degree, "trace this degree (both passes) instead of the chosen ones");
  cmd->callback([o, &run] { run = [o](Context& ctx) { return run_plan(ctx, *o); }; });
}

}  // namespace pm::cli
