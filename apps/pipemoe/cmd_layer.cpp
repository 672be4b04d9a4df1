// pipemoe layer: one expert-parallel MoE layer, forward and backward, on random data.
//
//   mpirun -q -np 2 build/pipemoe layer --tokens 2048 --model-dim 512 --hidden 1024
//       --experts 8 --top-k 2 --capacity-factor 1.25 --seed 1 [--iters 10]
//       [--degree 4 | --degree auto [--profile profile.json] [--refine 3]] [--degree-bwd ...]
//       [--json] [--trace trace.json] [--breakdown]
//   ... --dump DIR   writes every input, weight, output and gradient as .npy (see README)
#include <cmath>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <optional>
#include <tuple>

#include "apps/pipemoe/command.h"
#include "apps/pipemoe/layer_runner.h"
#include "apps/pipemoe/pass_breakdown.h"
#include "core/clock.h"
#include "core/log.h"
#include "core/memory_use.h"
#include "core/npy.h"
#include "core/rng.h"
#include "kernels/cpu/gemm.h"
#include "moe/ep_graph.h"
#include "perf/degree_choice.h"
#include "sched/executor.h"
#include "sched/trace.h"

namespace pm::cli {
namespace {

// Measured and predicted times further apart than this get a warning.
constexpr double kPredictionWarnRatio = 1.5;

struct LayerOptions {
  MoeShape shape{2048, 512, 1024, 8, 2, 1.25, 1};  // ranks: the world's
  std::string strategy = "ep";
  int tp = 0;  // ppmoe: ranks of each tensor-parallel group (0: the world)
  uint64_t seed = 1;
  float aux_coef = 0.01f;
  float z_loss_coef = 0.0f;
  float skew = 0.0f;  // the selection bias of expert 0 (>= 1: every token's first choice)
  int64_t shared_hidden = 0;  // > 0: a shared expert of this hidden size beside the routed ones
  Activation shared_activation = Activation::gelu;
  RouterLossGrads loss_grads() const { return {aux_coef, z_loss_coef}; }
  std::string degree = "1";
  std::string degree_bwd;  // empty: as --degree
  std::string profile;
  int refine = 0;
  int iters = 10;
  int warmup = 2;
  int alone_iters = 3;
  std::string dump;
  std::string trace;
  bool json = false;
  bool breakdown = false;
  bool weights_change = false;
};

// `--breakdown`: each task's ms per pass beside the pass it belongs to. A lane's tasks together can
// exceed the pass where they overlap (the communication lane's waits run beside the computation).
void print_breakdown(const std::vector<TaskTimeRow>& rows, double forward_ms, double backward_ms) {
  std::printf("where a pass goes (ms per pass, each task summed over its chunks; the median pass, the slowest rank):\n");
  std::printf("  %-9s %-9s %-20s %9s %8s %6s\n", "pass", "lane", "task", "ms", "share", "calls");
  for (const auto& r : rows) {
    const double pass_ms = r.pass == "forward" ? forward_ms : backward_ms;
    std::printf("  %-9s %-9s %-20s %9.2f %7.1f%% %6.4g\n", r.pass.c_str(), r.lane.c_str(), r.task.c_str(), r.ms,
                pass_ms > 0 ? 100 * r.ms / pass_ms : 0.0, r.calls);
  }
}

// Creates DIR/rank<r>/ and checks it can be written, agreeing across ranks before any work.
std::string prepare_dump_dir(Context& ctx, const std::string& dir) {
  namespace fs = std::filesystem;
  std::string rank_dir = dir + "/rank" + std::to_string(ctx.rank());
  std::string error;
  std::error_code ec;
  fs::create_directories(rank_dir, ec);
  if (ec) {
    error = "cannot create dump folder " + rank_dir + ": " + ec.message();
  } else {
    std::string probe = rank_dir + "/.write-test";
    std::ofstream out(probe);
    if (!out.good()) error = "cannot write in dump folder " + rank_dir;
    out.close();
    fs::remove(probe, ec);
  }
  agree_or_throw(ctx.comm, error);
  return rank_dir;
}

void write_dump(Context& ctx, const LayerOptions& o, const std::string& rank_dir, MoeLayer& layer,
                const MoePass& pass, const LayerData& d) {
  const MoeShape& s = layer.shape();
  auto put = [&](const std::string& name, const Tensor& t) { write_npy(rank_dir + "/" + name + ".npy", t); };
  put("x", d.x);
  put("dy", d.dy);
  put("y", d.y);
  Tensor aux = Tensor::empty({1});
  aux.f32()[0] = static_cast<float>(pass.aux_loss());
  put("aux", aux);
  Tensor z = Tensor::empty({1});
  z.f32()[0] = static_cast<float>(pass.z_loss());
  put("z_loss", z);
  put("dx", d.dx);
  std::vector<Parameter> params = layer.parameters();
  if (d.shared)
    for (const Parameter& p : d.shared->parameters()) params.push_back(p);
  for (const Parameter& p : params) {
    put(p.name, *p.value);
    put("d" + p.name, *p.grad);
  }
  const Routing& r = pass.routing();
  put("expert_index", Tensor::view_of(const_cast<int32_t*>(r.expert.data()), {s.tokens, s.top_k}, DType::i32));
  put("expert_slot", Tensor::view_of(const_cast<int32_t*>(r.slot.data()), {s.tokens, s.top_k}, DType::i32));
  if (ctx.rank() == 0) {
    nlohmann::json meta = {{"tokens", s.tokens},        {"model_dim", s.model_dim},
                           {"hidden", s.hidden},        {"experts", s.experts},
                           {"top_k", s.top_k},          {"capacity_factor", s.capacity_factor},
                           {"capacity", s.capacity()},  {"seed", o.seed},
                           {"aux_coef", o.aux_coef},    {"z_loss_coef", o.z_loss_coef},
                           {"normalize_gates", s.normalize_gates}, {"balance_bias", s.balance_bias},
                           {"routed_scale", s.routed_scale}, {"aux_seq_len", s.aux_seq_len},
                           {"drop_policy", s.drop_policy == DropPolicy::probs ? "probs" : "position"},
                           {"activation", activation_name(s.activation)},
                           {"router_score", s.router_score == RouterScore::sigmoid ? "sigmoid" : "softmax"},
                           {"route_groups", s.route_groups},
                           {"route_top_groups", s.route_top_groups},
                           {"dtype", precision_name(s.precision)},
                           {"dedup_dispatch", s.dedup_dispatch},
                           {"recompute_experts", s.recompute_experts},
                           {"shared_hidden", o.shared_hidden},
                           {"shared_activation", activation_name(o.shared_activation)},
                           {"world_size", ctx.world()},
                           {"strategy", layer.strategy().name()}, {"group_size", s.ranks},
                           {"degree_fwd", layer.forward_degree()},
                           {"degree_bwd", layer.backward_degree()}};
    if (s.precision == Precision::bf16) {
      meta["bf16_path"] = ctx.backend.bf16_path();  // which GEMMs ran
      meta["bf16_order"] = bf16_order_name();       // which bits they give
    }
    std::ofstream out(o.dump + "/meta.json");
    out << meta.dump(2) << "\n";
    PM_IO_CHECK(out.good(), "cannot write {}/meta.json", o.dump);
  }
}

nlohmann::json ms_or_null(const std::optional<double>& seconds) {
  return seconds ? nlohmann::json(*seconds * 1e3) : nlohmann::json(nullptr);
}

int run_layer(Context& ctx, const LayerOptions& options) {
  LayerOptions o = options;
  const MoeStrategy& strategy = moe_strategy(o.strategy);
  // ppmoe: the world in tensor-parallel groups of --tp consecutive ranks, each holding the same
  // tokens; the experts split over a group's ranks (and every group has all of them)
  const bool ppmoe = strategy.name() == "ppmoe";
  PM_REQUIRE(o.tp == 0 || ppmoe, "--tp {} is for --strategy ppmoe (ep splits the experts over all ranks)", o.tp);
  const int tp = ppmoe ? (o.tp > 0 ? o.tp : ctx.world()) : 1;
  PM_REQUIRE(tp >= 1 && ctx.world() % tp == 0, "--tp {} must divide the {} ranks", o.tp, ctx.world());
  std::unique_ptr<Communicator> tp_group;
  if (ppmoe) tp_group = ctx.comm.split(ctx.rank() / tp, ctx.rank());
  Communicator& group = ppmoe ? *tp_group : ctx.comm;
  const int data_groups = ppmoe ? ctx.world() / tp : ctx.world();  // ranks or groups with tokens of their own
  o.shape.ranks = group.size();
  PM_REQUIRE(std::isfinite(o.skew), "--skew must be a finite number, got {}", o.skew);
  if (o.skew != 0) o.shape.balance_bias = true;  // the skew is a selection bias
  const MoeShape& shape = o.shape;
  PM_REQUIRE(shape.tokens > 0, "--tokens must be positive, got {}", shape.tokens);
  PM_REQUIRE(o.iters >= 1, "--iters must be at least 1, got {}", o.iters);
  PM_REQUIRE(o.warmup >= 0, "--warmup must not be negative, got {}", o.warmup);
  PM_REQUIRE(o.alone_iters >= 0, "--alone-iters must not be negative, got {}", o.alone_iters);
  PM_REQUIRE(o.refine >= 0, "--refine must not be negative, got {}", o.refine);
  shape.validate();
  int want_fwd = parse_degree(o.degree, "--degree");
  int want_bwd = o.degree_bwd.empty() ? want_fwd : parse_degree(o.degree_bwd, "--degree-bwd");
  for (int d : {want_fwd, want_bwd}) {
    if (d > 0 && !ppmoe) shape.check_degree(d);  // ep chunks each expert's slots
    PM_REQUIRE(d <= shape.tokens || !ppmoe, "ppmoe chunks the tokens: degree {} is more than the {} tokens", d,
               shape.tokens);
  }

  Backend& backend = ctx.backend;
  std::optional<PerfProfile> profile;
  if (!o.profile.empty()) {
    profile = load_profile_for(ctx.comm, o.profile, describe_cluster(ctx.comm, backend));
    warn_if_other_dtype(*profile, o.profile, precision_name(shape.precision), backend.bf16_path());
  }

  Executor executor;
  std::unique_ptr<MoeLayer> layer_ptr = strategy.make_layer(shape, group, backend);
  MoeLayer& layer = *layer_ptr;
  layer.init_parameters(o.seed);
  for (const Parameter& p : layer.parameters()) {
    if (p.name != "router_bias") continue;
    // training starts the bias at 0 and moves it with the load; here it is drawn (about the
    // spread of the probabilities) so that it changes choices, which is what a test must see
    if (options.shape.balance_bias)
      Rng(o.seed, stream_id(8)).fill_normal(p.value->f32(), shape.experts, 0.0f, 0.5f / shape.experts);
    p.value->f32()[0] += o.skew;  // heavy imbalance on purpose: expert 0 chosen first by most tokens
  }
  // the ranks of a ppmoe group draw the same tokens (the group's index names their stream)
  LayerData d = make_layer_data(shape.tokens, shape.model_dim, o.seed, ppmoe ? ctx.rank() / tp : ctx.rank());
  d.weights_change = o.weights_change;
  PM_REQUIRE(o.shared_hidden >= 0, "--shared-hidden must not be negative (0: no shared expert), got {}", o.shared_hidden);
  PM_REQUIRE(o.shared_hidden == 0 || !ppmoe, "--shared-hidden is for --strategy ep for now");
  if (o.shared_hidden > 0) {
    auto se = std::make_shared<SharedExpert>(backend, shape.model_dim, o.shared_hidden, o.shared_activation,
                                             shape.precision);
    se->init(o.seed);
    se->set_recompute(shape.recompute_experts);
    add_shared_expert(d, std::move(se));
  }

  if ((want_fwd == 0 || want_bwd == 0) && !profile)
    log::info("pipemoe layer: --degree auto without --profile: timing every candidate degree");
  auto measure = [&](int f, int b) {
    layer.set_degrees(f, b);
    PassTimes t = run_passes(ctx.comm, layer, executor, d, 0, 1, o.loss_grads());
    return std::make_pair(slowest_rank(ctx.comm, t.forward).median, slowest_rank(ctx.comm, t.backward).median);
  };
  if (want_fwd == 0 || want_bwd == 0) run_passes(ctx.comm, layer, executor, d, 1, 0, o.loss_grads());  // warm before timing
  DegreeChoice choice = choose_degrees(want_fwd, want_bwd, profile ? &*profile : nullptr, shape, o.refine, measure, 3, strategy);
  layer.set_degrees(choice.forward, choice.backward);

  if (!o.dump.empty()) {
    std::string rank_dir = prepare_dump_dir(ctx, o.dump);
    std::shared_ptr<MoePass> pass = run_pass(layer, executor, d, o.loss_grads());
    write_dump(ctx, o, rank_dir, layer, *pass, d);
    ctx.comm.barrier();
    log::info("pipemoe layer: wrote inputs, weights, outputs and gradients of {} ranks to {}", ctx.world(), o.dump);
    return 0;
  }

  Trace trace;
  run_passes(ctx.comm, layer, executor, d, o.warmup, 0, o.loss_grads());
  ctx.comm.barrier();  // every rank's trace starts from (nearly) the same moment
  double origin = now_s();
  PassBreakdown breakdown;
  PassTimes t = run_passes(ctx.comm, layer, executor, d, 0, o.iters, o.loss_grads(), o.trace.empty() ? nullptr : &trace,
                           [&](const LayerPassRun& f, const LayerPassRun& b) { breakdown.add_pass(f, b); });
  const std::vector<TaskTimeRow> task_rows = breakdown.slowest_rank_rows(ctx.comm);
  Summary sf = slowest_rank(ctx.comm, t.forward), sb = slowest_rank(ctx.comm, t.backward);
  Summary sc = slowest_rank(ctx.comm, t.comm_busy), se = slowest_rank(ctx.comm, t.expert);
  Summary scpu = slowest_rank(ctx.comm, t.comm_cpu);
  double gflops = -ctx.comm.allreduce_scalar(-summarize(t.expert_gflops).median, ReduceOp::max);
  // the same expert work on the fastest rank: a core slower than the others shows as a gap here
  const double expert_fastest_ms = -ctx.comm.allreduce_scalar(-summarize(t.expert).median, ReduceOp::max);
  // the real counts: the rows each rank's experts computed, and what holding them cost
  const double rows_max = ctx.comm.allreduce_scalar(static_cast<double>(t.expert_rows), ReduceOp::max);
  const double rows_min = -ctx.comm.allreduce_scalar(-static_cast<double>(t.expert_rows), ReduceOp::max);
  // what the forward dispatch put on the wire (the rank that sent the most)
  const double sent_rows = ctx.comm.allreduce_scalar(static_cast<double>(t.dispatch_rows_sent), ReduceOp::max);
  const double sent_choices = ctx.comm.allreduce_scalar(static_cast<double>(t.dispatch_choices_sent), ReduceOp::max);
  const double grad_sent_rows = ctx.comm.allreduce_scalar(static_cast<double>(t.grad_dispatch_rows_sent), ReduceOp::max);
  const double grad_sent_choices =
      ctx.comm.allreduce_scalar(static_cast<double>(t.grad_dispatch_choices_sent), ReduceOp::max);
  const double peak_mb = ctx.comm.allreduce_scalar(peak_resident_mb(), ReduceOp::max);
  const double huge_mb = ctx.comm.allreduce_scalar(huge_pages_mb(), ReduceOp::min);  // the rank with the fewest
  const double held_mb = ctx.comm.allreduce_scalar(static_cast<double>(t.held_bytes) / (1 << 20), ReduceOp::max);
  std::optional<LanesAlone> alone;
  if (o.alone_iters > 0) alone = time_lanes_alone(ctx.comm, layer, d, o.alone_iters, o.loss_grads());
  double tokens_per_s = static_cast<double>(shape.tokens) * data_groups / ((sf.median + sb.median) / 1e3);
  if (!o.trace.empty()) {
    trace.write_chrome_json(o.trace, origin, ctx.rank(), [&](const std::string& mine) { return ctx.comm.gather_strings(mine, 0); });
    log::info("pipemoe layer: wrote a trace of the {} timed passes, every rank and lane, to {} (open it in "
              "ui.perfetto.dev or chrome://tracing)", o.iters, o.trace);
  }
  if (ctx.rank() != 0) return 0;

  std::optional<double> pred_fwd, pred_bwd;
  if (profile) {
    pred_fwd = predict_layer(*profile, shape, choice.forward, true, strategy);
    pred_bwd = predict_layer(*profile, shape, choice.backward, false, strategy);
    // a prediction this far off means the profile does not describe this machine as it is now
    for (auto [what, measured, predicted] : {std::tuple{"forward", sf.median, *pred_fwd * 1e3},
                                             std::tuple{"backward", sb.median, *pred_bwd * 1e3}}) {
      const double ratio = measured / predicted;
      if (ratio > kPredictionWarnRatio || ratio < 1 / kPredictionWarnRatio)
        log::info("warning: the {} took {:.1f} ms, the profile predicted {:.1f} ms ({:.2f}x): the profile does not "
                  "describe this machine as it is now (busy? another network?); take a new one with `pipemoe profile`",
                  what, measured, predicted, ratio);
    }
  }
  if (o.json) {
    nlohmann::json j = {{"world_size", ctx.world()},  {"tokens", shape.tokens},   {"model_dim", shape.model_dim},
                        {"hidden", shape.hidden},         {"experts", shape.experts}, {"top_k", shape.top_k},
                        {"capacity_factor", shape.capacity_factor}, {"capacity", shape.capacity()},
                        {"strategy", strategy.name()}, {"tp", ppmoe ? nlohmann::json(tp) : nullptr},
                        {"degree_fwd", choice.forward}, {"degree_bwd", choice.backward},
                        {"planned_degree_fwd", choice.planned_forward ? nlohmann::json(choice.planned_forward) : nullptr},
                        {"planned_degree_bwd", choice.planned_backward ? nlohmann::json(choice.planned_backward) : nullptr},
                        {"degree_measured", choice.measured},
                        {"forward_ms", sf.median},   {"backward_ms", sb.median},
                        {"predicted_fwd_ms", ms_or_null(pred_fwd)}, {"predicted_bwd_ms", ms_or_null(pred_bwd)},
                        {"comm_ms", alone ? nlohmann::json(alone->comm_ms()) : nullptr},
                        {"compute_ms", alone ? nlohmann::json(alone->compute_ms()) : nullptr},
                        {"comm_fwd_ms", alone ? nlohmann::json(alone->comm_fwd_ms) : nullptr},
                        {"comm_bwd_ms", alone ? nlohmann::json(alone->comm_bwd_ms) : nullptr},
                        {"compute_fwd_ms", alone ? nlohmann::json(alone->compute_fwd_ms) : nullptr},
                        {"compute_bwd_ms", alone ? nlohmann::json(alone->compute_bwd_ms) : nullptr},
                        {"a2a_busy_ms", sc.median},  {"comm_lane_cpu_ms", scpu.median},
                        {"expert_ms", se.median},    {"expert_ms_fastest_rank", expert_fastest_ms},
                        {"expert_gflops", gflops},
                        {"tokens_per_s", tokens_per_s}, {"iters", o.iters},
                        {"expert_rows_max", rows_max}, {"expert_rows_min", rows_min}, {"peak_rss_mb", peak_mb},
                        {"dispatch_rows_sent", sent_rows}, {"dispatch_choices_sent", sent_choices},
                        {"dedup_dispatch", shape.dedup_dispatch && shape.top_k > 1},
                        {"grad_dispatch_rows_sent", grad_sent_rows}, {"grad_dispatch_choices_sent", grad_sent_choices},
                        {"dedup_grad_dispatch", scale_grad_dispatch_on_experts(shape)},
                        {"huge_pages_mb", std::isnan(huge_mb) ? nlohmann::json(nullptr) : nlohmann::json(huge_mb)},
                        {"held_for_backward_mb", held_mb},
                        {"recompute_experts", shape.recompute_experts},
                        {"route_groups", shape.route_groups}, {"route_top_groups", shape.route_top_groups},
                        {"routed_scale", shape.routed_scale}, {"aux_seq_len", shape.aux_seq_len},
                        {"drop_policy", shape.drop_policy == DropPolicy::probs ? "probs" : "position"},
                        {"weights_change", o.weights_change},
                        {"weight_packings_per_pass", static_cast<double>(t.weight_packings) / o.iters},
                        {"activation", activation_name(shape.activation)}, {"skew", o.skew},
                        {"dtype", precision_name(shape.precision)}, {"bf16_path", backend.bf16_path()}, {"bf16_order", bf16_order_name()},
                        {"shared_hidden", o.shared_hidden},
                        {"gemm_isa", gemm_isa()}, {"threads", backend.threads()},
                        {"backend", backend.name()}, {"transport", ctx.comm.backend()}};
    j["tasks_ms"] = task_time_json(task_rows);
    std::printf("%s\n", j.dump().c_str());
    return 0;
  }
  if (ppmoe)
    std::printf("pipemoe layer: ppmoe, %d group(s) of %d ranks, each holding the same tokens and 1/%d of the experts\n",
                data_groups, tp, tp);
  std::printf("pipemoe layer: %d %s x %ld tokens, model %ld, hidden %ld, %d experts, top-%d, "
              "capacity factor %.2f (%ld slots), GEMM %s x%d threads\n",
              ppmoe ? data_groups : ctx.world(), ppmoe ? "groups" : "ranks", static_cast<long>(shape.tokens), static_cast<long>(shape.model_dim),
              static_cast<long>(shape.hidden), shape.experts, shape.top_k, shape.capacity_factor,
              static_cast<long>(shape.capacity()), gemm_isa().c_str(), backend.threads());
  if (shape.group_limited())
    std::printf("group-limited routing: each token's %d experts within its best %d of %d groups of %d experts\n",
                shape.top_k, shape.route_top_groups, shape.route_groups, shape.experts / shape.route_groups);
  if (backend.device() != Device::cpu) std::printf("backend: %s\n", backend.name().c_str());
  if (ctx.comm.backend() == "nccl") std::printf("transport: NCCL (collectives on the GPUs)\n");
  if (shape.precision == Precision::bf16)
    std::printf("dtype bf16: expert GEMMs on bf16 operands (%s), all-to-all payloads in bf16%s\n",
                backend.bf16_path().c_str(), backend.bf16_note().empty() ? "" : (" (" + backend.bf16_note() + ")").c_str());
  std::printf("pipeline degree: forward %d, backward %d", choice.forward, choice.backward);
  if (choice.plan) std::printf(" (planned %d / %d)", choice.planned_forward, choice.planned_backward);
  if (choice.measured) std::printf(" (timed)");
  std::printf("\n%-24s %10s %10s %10s %12s\n", "ms per iteration", "median", "min", "max", "predicted");
  auto row = [](const char* name, const Summary& s, std::optional<double> predicted) {
    std::printf("%-24s %10.2f %10.2f %10.2f", name, s.median, s.min, s.max);
    if (predicted) std::printf(" %12.2f", *predicted * 1e3);
    std::printf("\n");
  };
  row("forward", sf, pred_fwd);
  row("backward", sb, pred_bwd);
  row(ppmoe ? "all-reduce (busy)" : "all-to-all (busy)", sc, {});
  row("  its thread's CPU", scpu, {});
  row("expert FFN", se, {});
  if (alone)
    std::printf("each lane alone: communication %.2f ms (forward %.2f), computation %.2f ms (forward %.2f); "
                "bound %.2f ms, per pass %.2f ms\n",
                alone->comm_ms(), alone->comm_fwd_ms, alone->compute_ms(), alone->compute_fwd_ms, alone->bound_ms(),
                alone->pass_bound_ms());
  std::printf("expert FFN arithmetic: %.1f GFLOP/s per rank (slowest rank, median); the expert tasks %.1f ms on the "
              "fastest rank, %.1f ms on the slowest (%.1f%% apart)\n",
              gflops, expert_fastest_ms, se.median, 100 * (se.median / expert_fastest_ms - 1));
  std::printf("tokens/s (all ranks, forward+backward): %.0f\n", tokens_per_s);
  // (peak memory comes from /proc: NaN where the system does not say)
  const std::string peak = std::isnan(peak_mb) ? "unknown" : fmt::format("{:.0f} MB", peak_mb);
  const std::string huge = std::isnan(huge_mb) ? "" : fmt::format(", {:.0f} MB in huge pages at the end", huge_mb);
  std::printf("rows the experts computed per rank: %.0f to %.0f (of %ld tokens x top-%d); peak memory %s per rank, "
              "%.1f MB of it kept from the forward for the backward%s\n",
              rows_min, rows_max, static_cast<long>(shape.tokens), shape.top_k, peak.c_str(), held_mb, huge.c_str());
  if (sent_choices > 0)
    std::printf("the forward's dispatch to other ranks: %.0f rows for %.0f choices%s (the rank that sent the most)\n",
                sent_rows, sent_choices,
                shape.dedup_dispatch && shape.top_k > 1
                    ? fmt::format(", each token once per rank: {:.2f}x fewer rows", sent_choices / std::max(sent_rows, 1.0)).c_str()
                    : " (--dedup-dispatch false: a row per choice)");
  if (grad_sent_choices > 0)
    std::printf("the backward's dispatch to other ranks: %.0f rows for %.0f choices%s\n", grad_sent_rows,
                grad_sent_choices,
                scale_grad_dispatch_on_experts(shape)
                    ? fmt::format(", each token's dy once per rank in float32, scaled by its gate values there: {:.2f}x "
                                  "fewer rows, {:.2f}x fewer bytes",
                                  grad_sent_choices / std::max(grad_sent_rows, 1.0),
                                  grad_sent_choices * shape.wire_bytes() / std::max(4 * grad_sent_rows, 1.0))
                          .c_str()
                    : !shape.dedup_dispatch || shape.top_k == 1
                          ? " (a row per choice)"
                          : " (a row per choice: here float32 rows once per token would not take fewer bytes)");
  if (o.breakdown) print_breakdown(task_rows, sf.median, sb.median);
  return 0;
}

}  // namespace

void add_layer_command(CLI::App& app, CommandFn& run) {
  auto o = std::make_shared<LayerOptions>();
  CLI::App* cmd = app.add_subcommand("layer", "run one expert-parallel MoE layer forward and backward");
  add_layer_shape_options(cmd, o->shape);
  cmd->add_option("--strategy", o->strategy,
                  "how tokens reach their experts: ep (all-to-all expert parallelism) or ppmoe (experts split over a "
                  "tensor-parallel group holding the same tokens; index selection and one all-reduce)")
      ->capture_default_str();
  cmd->add_option("--tp", o->tp, "ppmoe: ranks per tensor-parallel group (default: all); --tokens is per group");
  cmd->add_option("--shared-hidden", o->shared_hidden,
                  "a shared expert of this hidden size beside the routed ones (DeepSeek-MoE), computed while the "
                  "dispatch is on the wire; 0: none")
      ->capture_default_str();
  add_activation_option(cmd, "--shared-activation", o->shared_activation, "the shared expert's activation: gelu or swiglu");
  cmd->add_option("--seed", o->seed, "random seed")->capture_default_str();
  cmd->add_option("--aux-coef", o->aux_coef, "weight of the aux loss in the backward")->capture_default_str();
  cmd->add_option("--skew", o->skew,
                  "heavy imbalance on purpose: add this to expert 0's selection bias (1: every token's first choice)")
      ->capture_default_str();
  cmd->add_option("--z-loss-coef", o->z_loss_coef, "weight of the router z-loss (ST-MoE) in the backward")
      ->capture_default_str();
  cmd->add_option("--degree", o->degree, "pipeline degree (chunks) or 'auto', forward and backward")->capture_default_str();
  cmd->add_option("--degree-bwd", o->degree_bwd, "pipeline degree of the backward or 'auto' (default: --degree)");
  cmd->add_option("--profile", o->profile, "performance profile (pipemoe profile) for 'auto' and predictions");
  cmd->add_option("--refine", o->refine, "with auto and a profile: time the planner's best N degrees, keep the fastest")
      ->capture_default_str();
  cmd->add_option("--iters", o->iters, "timed iterations")->capture_default_str();
  cmd->add_option("--warmup", o->warmup, "untimed iterations first")->capture_default_str();
  cmd->add_option("--alone-iters", o->alone_iters, "iterations timing each lane alone (0: skip)")->capture_default_str();
  cmd->add_option("--dump", o->dump, "write every tensor of every rank as .npy under DIR/rank<r>/");
  cmd->add_option("--trace", o->trace, "write a Chrome/Perfetto trace of the timed iterations");
  cmd->add_flag("--json", o->json, "print one JSON object (rank 0) instead of the table");
  cmd->add_flag("--breakdown", o->breakdown,
                "also print where a pass goes: each task's ms per pass (summed over chunks), forward and backward");
  cmd->add_flag("--weights-change", o->weights_change,
                "mark the weights changed before every pass, as an optimizer step does: each pass packs the experts' "
                "weights again (by default they are packed once, as for a step's later micro-batches and inference)");
  cmd->callback([o, &run] { run = [o](Context& ctx) { return run_layer(ctx, *o); }; });
}

}  // namespace pm::cli
