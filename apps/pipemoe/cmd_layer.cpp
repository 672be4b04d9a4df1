// pipemoe layer: one expert-parallel MoE layer, forward and backward, on random data.
//
//   mpirun -q -np 2 build/pipemoe layer --tokens 2048 --model-dim 512 --hidden 1024
//       --experts 8 --top-k 2 --capacity-factor 1.25 --seed 1 [--iters 10]
//       [--degree 4 | --degree auto [--profile profile.json] [--refine 3]] [--degree-bwd ...]
//       [--json] [--trace trace.json]
//   ... --dump DIR   writes every input, weight, output and gradient as .npy (see README)
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <optional>

#include "apps/pipemoe/command.h"
#include "apps/pipemoe/layer_runner.h"
#include "core/clock.h"
#include "core/log.h"
#include "core/npy.h"
#include "kernels/cpu/gemm.h"
#include "kernels/cpu/thread_pool.h"
#include "perf/degree_choice.h"
#include "sched/executor.h"
#include "sched/trace.h"

namespace pm::cli {
namespace {

struct LayerOptions {
  int64_t tokens = 2048;
  int64_t model_dim = 512;
  int64_t hidden = 1024;
  int experts = 8;
  int top_k = 2;
  double capacity_factor = 1.25;
  uint64_t seed = 1;
  float aux_coef = 0.01f;
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
};

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
                const LayerData& d) {
  auto put = [&](const char* name, const Tensor& t) { write_npy(rank_dir + "/" + name + ".npy", t); };
  put("x", d.x);
  put("wg", layer.wg);
  put("w1", layer.w1);
  put("b1", layer.b1);
  put("w2", layer.w2);
  put("b2", layer.b2);
  put("dy", d.dy);
  put("y", d.y);
  Tensor aux = Tensor::empty({1});
  aux.f32()[0] = static_cast<float>(layer.aux_loss());
  put("aux", aux);
  put("dx", d.dx);
  put("dwg", layer.dwg);
  put("dw1", layer.dw1);
  put("db1", layer.db1);
  put("dw2", layer.dw2);
  put("db2", layer.db2);
  const Routing& r = layer.routing();
  put("expert_index", Tensor::view_of(const_cast<int32_t*>(r.expert.data()), {o.tokens, o.top_k}, DType::i32));
  put("expert_slot", Tensor::view_of(const_cast<int32_t*>(r.slot.data()), {o.tokens, o.top_k}, DType::i32));
  if (ctx.rank() == 0) {
    nlohmann::json meta = {{"tokens", o.tokens},        {"model_dim", o.model_dim},
                           {"hidden", o.hidden},        {"experts", o.experts},
                           {"top_k", o.top_k},          {"capacity_factor", o.capacity_factor},
                           {"capacity", layer.capacity()}, {"seed", o.seed},
                           {"aux_coef", o.aux_coef},    {"world_size", ctx.world()},
                           {"degree_fwd", layer.forward_degree()},
                           {"degree_bwd", layer.backward_degree()}};
    std::ofstream out(o.dump + "/meta.json");
    out << meta.dump(2) << "\n";
    PM_IO_CHECK(out.good(), "cannot write {}/meta.json", o.dump);
  }
}

nlohmann::json ms_or_null(const std::optional<double>& seconds) {
  return seconds ? nlohmann::json(*seconds * 1e3) : nlohmann::json(nullptr);
}

int run_layer(Context& ctx, const LayerOptions& o) {
  PM_REQUIRE(o.tokens > 0, "--tokens must be positive, got {}", o.tokens);
  PM_REQUIRE(o.iters >= 1, "--iters must be at least 1, got {}", o.iters);
  PM_REQUIRE(o.warmup >= 0, "--warmup must not be negative, got {}", o.warmup);
  PM_REQUIRE(o.alone_iters >= 0, "--alone-iters must not be negative, got {}", o.alone_iters);
  PM_REQUIRE(o.refine >= 0, "--refine must not be negative, got {}", o.refine);
  MoeLayerConfig config{o.model_dim, o.hidden, o.experts, o.top_k, o.capacity_factor};
  config.validate(ctx.world());
  int want_fwd = parse_degree(o.degree, "--degree");
  int want_bwd = o.degree_bwd.empty() ? want_fwd : parse_degree(o.degree_bwd, "--degree-bwd");
  int64_t capacity = expert_capacity(o.top_k, o.capacity_factor, o.tokens, o.experts);
  for (int d : {want_fwd, want_bwd})
    PM_REQUIRE(d <= capacity, "pipeline degree {} is more than the capacity of {} slots per expert: use a degree of at most {}",
               d, capacity, capacity);

  std::optional<PerfProfile> profile;
  if (!o.profile.empty()) profile = load_profile_for(ctx.comm, o.profile, describe_cluster(ctx.comm));
  const LayerShape shape{o.tokens, o.model_dim, o.hidden, o.experts, o.top_k, o.capacity_factor, ctx.world()};

  Executor executor;
  MoeLayer layer(config, ctx.comm, executor);
  layer.init_parameters(o.seed);
  LayerData d = make_layer_data(o.tokens, o.model_dim, o.seed, ctx.rank());

  if ((want_fwd == 0 || want_bwd == 0) && !profile)
    log::info("pipemoe layer: --degree auto without --profile: timing every candidate degree");
  auto measure = [&](int f, int b) {
    layer.set_degrees(f, b);
    PassTimes t = run_passes(ctx.comm, layer, d, 0, 1, o.aux_coef);
    return std::make_pair(slowest_rank(ctx.comm, t.forward).median, slowest_rank(ctx.comm, t.backward).median);
  };
  if (want_fwd == 0 || want_bwd == 0) run_passes(ctx.comm, layer, d, 1, 0, o.aux_coef);  // warm before timing
  DegreeChoice choice = choose_degrees(want_fwd, want_bwd, profile ? &*profile : nullptr, shape, o.refine, measure);
  layer.set_degrees(choice.forward, choice.backward);

  if (!o.dump.empty()) {
    std::string rank_dir = prepare_dump_dir(ctx, o.dump);
    layer.zero_grads();
    layer.forward(d.x.f32(), o.tokens, d.y.f32());
    layer.backward(d.dy.f32(), d.dx.f32(), o.aux_coef);
    write_dump(ctx, o, rank_dir, layer, d);
    ctx.comm.barrier();
    log::info("pipemoe layer: wrote inputs, weights, outputs and gradients of {} ranks to {}", ctx.world(), o.dump);
    return 0;
  }

  Trace trace;
  run_passes(ctx.comm, layer, d, o.warmup, 0, o.aux_coef);
  ctx.comm.barrier();  // every rank's trace starts from (nearly) the same moment
  double origin = now_s();
  if (!o.trace.empty()) layer.set_trace(&trace);
  PassTimes t = run_passes(ctx.comm, layer, d, 0, o.iters, o.aux_coef);
  layer.set_trace(nullptr);
  Summary sf = slowest_rank(ctx.comm, t.forward), sb = slowest_rank(ctx.comm, t.backward);
  Summary sc = slowest_rank(ctx.comm, t.comm_busy), se = slowest_rank(ctx.comm, t.expert);
  Summary scpu = slowest_rank(ctx.comm, t.comm_cpu);
  double gflops = -ctx.comm.allreduce_scalar(-summarize(t.expert_gflops).median, ReduceOp::max);
  std::optional<LanesAlone> alone;
  if (o.alone_iters > 0) alone = time_lanes_alone(ctx.comm, layer, d, o.alone_iters, o.aux_coef);
  double tokens_per_s = static_cast<double>(o.tokens) * ctx.world() / ((sf.median + sb.median) / 1e3);
  if (!o.trace.empty())
    trace.write_chrome_json(o.trace, origin, ctx.rank(), [&](const std::string& mine) { return ctx.comm.gather_strings(mine, 0); });
  if (ctx.rank() != 0) return 0;

  std::optional<double> pred_fwd, pred_bwd;
  if (profile) {
    pred_fwd = predict_layer(*profile, shape, choice.forward, true);
    pred_bwd = predict_layer(*profile, shape, choice.backward, false);
  }
  if (o.json) {
    nlohmann::json j = {{"world_size", ctx.world()},  {"tokens", o.tokens},   {"model_dim", o.model_dim},
                        {"hidden", o.hidden},         {"experts", o.experts}, {"top_k", o.top_k},
                        {"capacity_factor", o.capacity_factor}, {"capacity", layer.capacity()},
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
                        {"expert_ms", se.median},    {"expert_gflops", gflops},
                        {"tokens_per_s", tokens_per_s}, {"iters", o.iters},
                        {"gemm_isa", gemm_isa()}, {"threads", compute_threads()}};
    std::printf("%s\n", j.dump().c_str());
    return 0;
  }
  std::printf("pipemoe layer: %d ranks x %ld tokens, model %ld, hidden %ld, %d experts, top-%d, "
              "capacity factor %.2f (%ld slots), GEMM %s x%d threads\n",
              ctx.world(), static_cast<long>(o.tokens), static_cast<long>(o.model_dim),
              static_cast<long>(o.hidden), o.experts, o.top_k, o.capacity_factor,
              static_cast<long>(layer.capacity()), gemm_isa().c_str(), compute_threads());
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
  row("all-to-all (busy)", sc, {});
  row("  its thread's CPU", scpu, {});
  row("expert FFN", se, {});
  if (alone)
    std::printf("each lane alone: communication %.2f ms (forward %.2f), computation %.2f ms (forward %.2f); "
                "bound %.2f ms, per pass %.2f ms\n",
                alone->comm_ms(), alone->comm_fwd_ms, alone->compute_ms(), alone->compute_fwd_ms, alone->bound_ms(),
                alone->pass_bound_ms());
  std::printf("expert FFN arithmetic: %.1f GFLOP/s per rank (slowest rank, median)\n", gflops);
  std::printf("tokens/s (all ranks, forward+backward): %.0f\n", tokens_per_s);
  return 0;
}

}  // namespace

void add_layer_command(CLI::App& app, CommandFn& run) {
  auto o = std::make_shared<LayerOptions>();
  CLI::App* cmd = app.add_subcommand("layer", "run one expert-parallel MoE layer forward and backward");
  add_layer_shape_options(cmd, o->tokens, o->model_dim, o->hidden, o->experts, o->top_k, o->capacity_factor);
  cmd->add_option("--seed", o->seed, "random seed")->capture_default_str();
  cmd->add_option("--aux-coef", o->aux_coef, "weight of the aux loss in the backward")->capture_default_str();
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
  cmd->callback([o, &run] { run = [o](Context& ctx) { return run_layer(ctx, *o); }; });
}

}  // namespace pm::cli
