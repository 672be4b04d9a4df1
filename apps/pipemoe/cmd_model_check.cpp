// pipemoe model-check: the whole model on synthetic tokens, for an outside oracle.
//
//   mpirun -q -np 2 build/pipemoe model-check --config configs/check.json --dump DIR [--steps 3]
// Runs `steps` training steps (forward, backward, gradient all-reduce, clipping, AdamW) on random
// tokens and writes, per rank under DIR/rank<r>/: the initial parameters (param.<name>.npy, this
// rank's experts), the step-0 gradients after the all-reduce (grad.<name>.npy), the step-0 logits,
// and every step's inputs and targets; DIR/meta.json has the configuration and every step's loss.
// tests/reference/test_model.py recomputes all of it with PyTorch in float64.
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "apps/pipemoe/command.h"
#include "core/npy.h"
#include "core/rng.h"
#include "kernels/cpu/gemm.h"
#include "model/gpt.h"
#include "model/grad_sync.h"
#include "model/optimizer.h"
#include "sched/executor.h"

namespace pm::cli {
namespace {

struct ModelCheckOptions {
  std::string config, dump;
  std::vector<std::string> sets;
  int steps = 3;
  std::string degree = "1";
};

int run_model_check(Context& ctx, const ModelCheckOptions& o) {
  PM_REQUIRE(!o.dump.empty(), "model-check needs --dump DIR");
  PM_REQUIRE(o.steps >= 1, "--steps must be at least 1, got {}", o.steps);
  TrainConfig c;
  if (!o.config.empty()) c = load_train_config(o.config);
  nlohmann::json overrides = nlohmann::json::object();
  for (const std::string& kv : o.sets) apply_set_option(overrides, kv);
  c.apply(overrides, "command-line options");
  apply_bf16_order(ctx, c.bf16_order);
  c.validate(ctx.world());
  PM_REQUIRE(c.pp == 1,
             "model-check runs one pipeline stage: use pp 1 (pipeline stages are checked against the one-rank run: "
             "tests/cli/test_pipeline_train.py)");
  c.model.vocab_size = c.tokenizer_vocab;  // synthetic tokens: the vocabulary is just a size

  std::string rank_dir = o.dump + "/rank" + std::to_string(ctx.rank());
  std::error_code ec;
  std::filesystem::create_directories(rank_dir, ec);
  agree_or_throw(ctx.comm, ec ? "cannot create " + rank_dir + ": " + ec.message() : "");

  Executor executor;
  GptModel model(c.model, ctx.comm, executor, ctx.backend);
  // as training does: ppmoe's sharded gradients summed over the groups, times the ranks per group
  const int tp = c.model.ranks_per_batch();
  GradientSync grad_sync(model.parameters(), c.model.layers, ctx.comm, /*overlap=*/true, model.expert_replicas(),
                         static_cast<float>(tp), c.grad_wire());
  model.set_grads_ready([&](TaskGraph& g, int block, const std::vector<int>& ready) { grad_sync.grads_ready(g, block, ready); });
  model.init_parameters(c.seed);
  int degree = o.degree == "auto" ? 1 : std::stoi(o.degree);
  for (MoeLayer* l : model.moe_layers()) l->set_degrees(degree, degree);
  AdamW optimizer(model.parameters());
  for (const Parameter& p : model.parameters()) write_npy(rank_dir + "/param." + p.name + ".npy", *p.value);

  const int64_t B = c.batch_size, S = c.model.seq_len, V = c.model.vocab_size;
  std::vector<double> losses, auxes, lrs, norms;
  for (int step = 0; step < o.steps; ++step) {
    Tensor in = Tensor::empty({B, S}, DType::i32), tg = Tensor::empty({B, S}, DType::i32);
    Rng rng(c.seed, stream_id(60, step, ctx.rank() / tp));  // a tensor-parallel group's ranks: the same tokens
    for (int64_t i = 0; i < B * S; ++i) in.data<int32_t>()[i] = static_cast<int32_t>(rng.next_u64() % V);
    for (int64_t i = 0; i < B * S; ++i) tg.data<int32_t>()[i] = static_cast<int32_t>(rng.next_u64() % V);
    write_npy(rank_dir + "/inputs_" + std::to_string(step) + ".npy", in);
    write_npy(rank_dir + "/targets_" + std::to_string(step) + ".npy", tg);
    model.zero_grads();
    double loss = model.forward(in.data<int32_t>(), tg.data<int32_t>(), B, 1.0f / ctx.world());
    double aux = model.aux_loss();
    if (step == 0)  // vocabulary-parallel: this rank's columns
      write_npy(rank_dir + "/logits.npy",
                Tensor::view_of(const_cast<float*>(model.logits()), {B * S, model.vocab_parallel() ? V / tp : V}));
    model.backward();
    if (step == 0)
      for (const Parameter& p : model.parameters()) write_npy(rank_dir + "/grad." + p.name + ".npy", *p.grad);
    double norm = clip_by_global_norm(model.parameters(), ctx.comm, c.grad_clip, ctx.world() / c.model.expert_ranks(ctx.world()));
    double lr = learning_rate(c, step);
    optimizer.step(c, lr);
    model.update_balance_bias();  // as training does after every step
    double both[2] = {loss, aux};
    ctx.comm.allreduce(both, both, 2, DType::f64, ReduceOp::sum);
    losses.push_back(both[0] / ctx.world());
    auxes.push_back(both[1] / ctx.world());
    lrs.push_back(lr);
    norms.push_back(norm);
  }
  if (ctx.rank() == 0) {
    nlohmann::json meta = {{"config", c.to_json()}, {"vocab_size", V}, {"world_size", ctx.world()},
                           {"steps", o.steps},      {"loss", losses},  {"aux", auxes},
                           {"lr", lrs},             {"grad_norm", norms},
                           {"dense_tp", c.model.dense_tp()}, {"vocab_parallel", model.vocab_parallel()},
                           {"ranks_per_batch", tp}, {"expert_ranks", c.model.expert_ranks(ctx.world())},
                           {"bf16_order", bf16_order_name()}};  // the order the bf16 GEMMs ran in
    std::ofstream out(o.dump + "/meta.json");
    out << meta.dump(2) << "\n";
    PM_IO_CHECK(out.good(), "cannot write {}/meta.json", o.dump);
    std::printf("model-check: %d steps on %d ranks, losses", o.steps, ctx.world());
    for (double l : losses) std::printf(" %.6f", l);
    std::printf("\n");
  }
  return 0;
}

}  // namespace

void add_model_check_command(CLI::App& app, CommandFn& run) {
  auto o = std::make_shared<ModelCheckOptions>();
  CLI::App* cmd = app.add_subcommand("model-check", "run the model on synthetic tokens and dump everything for an oracle");
  cmd->add_option("--config", o->config, "configuration file");
  cmd->add_option("--set", o->sets, "override a configuration key: --set key=value");
  cmd->add_option("--dump", o->dump, "folder to write into");
  cmd->add_option("--steps", o->steps, "training steps")->capture_default_str();
  cmd->add_option("--degree", o->degree, "MoE pipeline degree")->capture_default_str();
  cmd->callback([o, &run] { run = [o](Context& ctx) { return run_model_check(ctx, *o); }; });
}

}  // namespace pm::cli
