// pipemoe train: train a GPT-style MoE language model across ranks (expert parallel for the
// experts, data parallel for the rest).
//
//   mpirun -q -np 2 build/pipemoe train --config configs/demo.json [--max-steps 300] [--seed 1]
//       [--data data/brown] [--save runs/demo] [--resume runs/demo] [--degree auto --profile p.json]
//       [--set key=value ...]
// Prints progress on stderr and, at the end, one JSON line on stdout (rank 0).
#include <nlohmann/json.hpp>

#include "apps/pipemoe/command.h"
#include "core/error.h"
#include "kernels/cpu/gemm.h"  // bf16_order_name
#include "model/trainer.h"

namespace pm::cli {
namespace {

struct TrainOptions {
  std::string config;
  std::vector<std::string> sets;
  nlohmann::json overrides = nlohmann::json::object();
};

int run_train(Context& ctx, TrainOptions& o) {
  TrainConfig config;
  if (!o.config.empty()) config = load_train_config(o.config);
  for (const std::string& kv : o.sets) apply_set_option(o.overrides, kv);
  config.apply(o.overrides, "command-line options");
  apply_bf16_order(ctx, config.bf16_order);
  config.bf16_order = bf16_order_name();  // the checkpoints say which order made them (eval, generate follow it)
  nlohmann::json result = train(ctx.comm, config, ctx.backend);
  result["bf16_order"] = bf16_order_name();  // which bits the bf16 GEMMs gave
  if (ctx.rank() == 0) std::printf("%s\n", result.dump().c_str());
  return 0;
}

}  // namespace

void add_train_command(CLI::App& app, CommandFn& run) {
  auto o = std::make_shared<TrainOptions>();
  CLI::App* cmd = app.add_subcommand("train", "train a GPT-style MoE language model across ranks");
  cmd->add_option("--config", o->config, "configuration file (JSON; see configs/demo.json)");
  cmd->add_option("--set", o->sets, "override a configuration key: --set key=value (repeatable)");
  // The common keys as flags of their own; they override the file.
  auto number = [&](const char* flag, const char* key, const char* help) {
    cmd->add_option_function<double>(flag, [o, key](double v) { o->overrides[key] = v; }, help);
  };
  auto text = [&](const char* flag, const char* key, const char* help) {
    cmd->add_option_function<std::string>(flag, [o, key](const std::string& v) { o->overrides[key] = v; }, help);
  };
  cmd->add_option_function<int64_t>("--max-steps", [o](int64_t v) { o->overrides["max_steps"] = v; }, "training steps");
  cmd->add_option_function<int64_t>("--stop-at", [o](int64_t v) { o->overrides["stop_at"] = v; },
                                    "stop after this step, as an interruption would");
  cmd->add_option_function<int64_t>("--seed", [o](int64_t v) { o->overrides["seed"] = v; }, "random seed");
  number("--lr", "lr", "peak learning rate");
  text("--data", "data", "Brown corpus folder or a plain-text file");
  text("--save", "save", "checkpoint folder");
  text("--resume", "resume", "checkpoint folder to continue from");
  text("--degree", "degree", "MoE pipeline degree: a number or 'auto'");
  text("--profile", "profile", "performance profile for --degree auto");
  text("--trace", "trace", "Chrome/Perfetto trace of the last step");
  cmd->add_option_function<int64_t>("--breakdown-steps", [o](int64_t v) { o->overrides["breakdown_steps"] = v; },
                                    "at the end, where a step goes: the last N steps' tasks summed per name");
  text("--log-csv", "log_csv", "per-step CSV log");
  // the parallel layout: tp x dp x pp = ranks
  cmd->add_option_function<int64_t>("--tp", [o](int64_t v) { o->overrides["tp"] = v; },
                                    "ranks per tensor-parallel group (with moe_strategy ppmoe)");
  cmd->add_option_function<int64_t>("--dp", [o](int64_t v) { o->overrides["dp"] = v; },
                                    "data-parallel groups (default: ranks / (tp x pp))");
  cmd->add_option_function<int64_t>("--pp", [o](int64_t v) { o->overrides["pp"] = v; },
                                    "pipeline stages: the blocks split over pp groups of tp x dp ranks");
  // a flag given twice (a script appending an override): the last one counts, as with --set
  for (CLI::Option* opt : cmd->get_options())
    if (opt->get_expected_min() == 1 && opt->get_name() != "--set") opt->multi_option_policy(CLI::MultiOptionPolicy::TakeLast);
  cmd->callback([o, &run] { run = [o](Context& ctx) { return run_train(ctx, *o); }; });
}

}  // namespace pm::cli
