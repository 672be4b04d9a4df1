// pipemoe layer: one expert-parallel MoE layer, forward and backward, on random data.
//
//   mpirun -q -np 2 build/pipemoe layer --tokens 2048 --model-dim 512 --hidden 1024 \
//       --experts 8 --top-k 2 --capacity-factor 1.25 --seed 1 [--iters 10] [--degree 4]
//   ... --dump DIR   writes every input, weight, output and gradient as .npy (see README)
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "apps/pipemoe/command.h"
#include "core/clock.h"
#include "core/log.h"
#include "core/npy.h"
#include "core/rng.h"
#include "core/stats.h"
#include "kernels/cpu/gemm.h"
#include "kernels/cpu/thread_pool.h"
#include "moe/moe_layer.h"
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
  int degree = 1;
  int degree_bwd = 0;  // 0: same as forward
  int iters = 10;
  int warmup = 2;
  std::string dump;
  std::string trace;
  bool json = false;
};

MoeLayerConfig layer_config(const LayerOptions& o) {
  return MoeLayerConfig{o.model_dim, o.hidden, o.experts, o.top_k, o.capacity_factor};
}

// The layer's inputs: x and dy per rank, from (seed, rank) streams.
struct LayerData {
  Tensor x, dy, y, dx;
};

LayerData make_data(const LayerOptions& o, int rank) {
  LayerData d;
  d.x = Tensor::empty({o.tokens, o.model_dim});
  d.dy = Tensor::empty({o.tokens, o.model_dim});
  d.y = Tensor::zeros({o.tokens, o.model_dim});
  d.dx = Tensor::zeros({o.tokens, o.model_dim});
  Rng(o.seed, stream_id(1, rank)).fill_normal(d.x.f32(), d.x.numel(), 0.0f, 1.0f);
  Rng(o.seed, stream_id(7, rank)).fill_normal(d.dy.f32(), d.dy.numel(), 0.0f, 1.0f);
  return d;
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

void write_dump(Context& ctx, const LayerOptions& o, const std::string& dir, const std::string& rank_dir,
                MoeLayer& layer, const LayerData& d) {
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
    std::ofstream out(dir + "/meta.json");
    out << meta.dump(2) << "\n";
    PM_IO_CHECK(out.good(), "cannot write {}/meta.json", dir);
  }
}

// Median over iterations on this rank, then the slowest rank.
Summary slowest_rank(Communicator& comm, const std::vector<double>& values) {
  Summary s = summarize(values);
  double v[3] = {s.min, s.median, s.max};
  comm.allreduce(v, v, 3, DType::f64, ReduceOp::max);
  return {v[0], v[1], v[2]};
}

int run_layer(Context& ctx, const LayerOptions& o) {
  PM_REQUIRE(o.tokens > 0, "--tokens must be positive, got {}", o.tokens);
  PM_REQUIRE(o.iters >= 1, "--iters must be at least 1, got {}", o.iters);
  PM_REQUIRE(o.warmup >= 0, "--warmup must not be negative, got {}", o.warmup);
  MoeLayerConfig config = layer_config(o);
  config.validate(ctx.world());

  Executor executor;
  MoeLayer layer(config, ctx.comm, executor);
  layer.set_degrees(o.degree, o.degree_bwd > 0 ? o.degree_bwd : o.degree);
  layer.init_parameters(o.seed);
  LayerData d = make_data(o, ctx.rank());
  Trace trace;
  if (!o.trace.empty()) layer.set_trace(&trace);

  if (!o.dump.empty()) {
    std::string rank_dir = prepare_dump_dir(ctx, o.dump);
    layer.forward(d.x.f32(), o.tokens, d.y.f32());
    layer.backward(d.dy.f32(), d.dx.f32(), o.aux_coef);
    write_dump(ctx, o, o.dump, rank_dir, layer, d);
    ctx.comm.barrier();
    log::info("pipemoe layer: wrote inputs, weights, outputs and gradients of {} ranks to {}", ctx.world(), o.dump);
    return 0;
  }

  std::vector<double> fwd, bwd, comm_ms, expert_ms, expert_gflops;
  double origin = 0;
  for (int it = 0; it < o.warmup + o.iters; ++it) {
    ctx.comm.barrier();
    if (it == o.warmup) {
      trace.clear();
      origin = now_s();
    }
    layer.zero_grads();
    layer.forward(d.x.f32(), o.tokens, d.y.f32());
    layer.backward(d.dy.f32(), d.dx.f32(), o.aux_coef);
    if (it < o.warmup) continue;
    const LayerRunStats& f = layer.forward_stats();
    const LayerRunStats& b = layer.backward_stats();
    fwd.push_back(f.wall_ms);
    bwd.push_back(b.wall_ms);
    comm_ms.push_back(f.comm_ms + b.comm_ms);
    expert_ms.push_back(f.expert_ms + b.expert_ms);
    expert_gflops.push_back((f.expert_flops + b.expert_flops) / (f.expert_ms + b.expert_ms) / 1e6);
  }
  Summary sf = slowest_rank(ctx.comm, fwd), sb = slowest_rank(ctx.comm, bwd);
  Summary sc = slowest_rank(ctx.comm, comm_ms), se = slowest_rank(ctx.comm, expert_ms);
  Summary sg = summarize(expert_gflops);  // this rank; the slowest rank's median below
  double gflops = -ctx.comm.allreduce_scalar(-sg.median, ReduceOp::max);
  double tokens_per_s = static_cast<double>(o.tokens) * ctx.world() / ((sf.median + sb.median) / 1e3);
  if (!o.trace.empty()) trace.write_chrome_json(o.trace, ctx.comm, origin);
  if (ctx.rank() != 0) return 0;

  if (o.json) {
    nlohmann::json j = {{"world_size", ctx.world()},  {"tokens", o.tokens},   {"model_dim", o.model_dim},
                        {"hidden", o.hidden},         {"experts", o.experts}, {"top_k", o.top_k},
                        {"capacity_factor", o.capacity_factor}, {"capacity", layer.capacity()},
                        {"degree_fwd", layer.forward_degree()}, {"degree_bwd", layer.backward_degree()},
                        {"forward_ms", sf.median},   {"backward_ms", sb.median},
                        {"a2a_busy_ms", sc.median},  {"expert_ms", se.median},
                        {"tokens_per_s", tokens_per_s}, {"iters", o.iters},
                        {"expert_gflops", gflops},
                        {"gemm_isa", gemm_isa()}, {"threads", compute_threads()}};
    std::printf("%s\n", j.dump().c_str());
    return 0;
  }
  std::printf("pipemoe layer: %d ranks x %ld tokens, model %ld, hidden %ld, %d experts, top-%d, "
              "capacity factor %.2f (%ld slots), degree %d/%d, GEMM %s x%d threads\n",
              ctx.world(), static_cast<long>(o.tokens), static_cast<long>(o.model_dim),
              static_cast<long>(o.hidden), o.experts, o.top_k, o.capacity_factor,
              static_cast<long>(layer.capacity()), layer.forward_degree(), layer.backward_degree(),
              gemm_isa().c_str(), compute_threads());
  std::printf("%-22s %10s %10s %10s\n", "ms per iteration", "median", "min", "max");
  auto row = [](const char* name, const Summary& s) {
    std::printf("%-22s %10.2f %10.2f %10.2f\n", name, s.median, s.min, s.max);
  };
  row("forward", sf);
  row("backward", sb);
  row("all-to-all (busy)", sc);
  row("expert FFN", se);
  std::printf("expert FFN arithmetic: %.1f GFLOP/s per rank (slowest rank, median)\n", gflops);
  std::printf("tokens/s (all ranks, forward+backward): %.0f\n", tokens_per_s);
  return 0;
}

}  // namespace

void add_layer_command(CLI::App& app, CommandFn& run) {
  auto o = std::make_shared<LayerOptions>();
  CLI::App* cmd = app.add_subcommand("layer", "run one expert-parallel MoE layer forward and backward");
  cmd->add_option("--tokens", o->tokens, "tokens per rank (T)")->capture_default_str();
  cmd->add_option("--model-dim", o->model_dim, "model dimension (M)")->capture_default_str();
  cmd->add_option("--hidden", o->hidden, "expert hidden dimension (H)")->capture_default_str();
  cmd->add_option("--experts", o->experts, "experts over all ranks (E)")->capture_default_str();
  cmd->add_option("--top-k", o->top_k, "experts per token (k)")->capture_default_str();
  cmd->add_option("--capacity-factor", o->capacity_factor, "capacity factor (f)")->capture_default_str();
  cmd->add_option("--seed", o->seed, "random seed")->capture_default_str();
  cmd->add_option("--aux-coef", o->aux_coef, "weight of the aux loss in the backward")->capture_default_str();
  cmd->add_option("--degree", o->degree, "pipeline degree (chunks), forward and backward")->capture_default_str();
  cmd->add_option("--degree-bwd", o->degree_bwd, "pipeline degree of the backward (default: --degree)");
  cmd->add_option("--iters", o->iters, "timed iterations")->capture_default_str();
  cmd->add_option("--warmup", o->warmup, "untimed iterations first")->capture_default_str();
  cmd->add_option("--dump", o->dump, "write every tensor of every rank as .npy under DIR/rank<r>/");
  cmd->add_option("--trace", o->trace, "write a Chrome/Perfetto trace of the timed iterations");
  cmd->add_flag("--json", o->json, "print one JSON object (rank 0) instead of the table");
  cmd->callback([o, &run] { run = [o](Context& ctx) { return run_layer(ctx, *o); }; });
}

}  // namespace pm::cli
