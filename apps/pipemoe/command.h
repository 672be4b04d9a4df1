// What every subcommand of the pipemoe CLI gets, and how it registers itself.
#pragma once

#include <CLI/CLI.hpp>
#include <cstdint>
#include <functional>
#include <string>

#include "apps/pipemoe/agree.h"
#include "comm/communicator.h"
#include "kernels/backend.h"
#include "moe/moe_shape.h"

namespace pm::cli {

struct Context {
  Communicator& comm;  // the world
  Backend& backend;
  bool bf16_order_given = false;  // --bf16-order was on the command line (else a checkpoint's order applies)
  int rank() const { return comm.rank(); }
  int world() const { return comm.size(); }
};

// Set by the chosen subcommand's callback; returns the exit code.
using CommandFn = std::function<int(Context&)>;

void add_layer_command(CLI::App& app, CommandFn& run);
void add_bench_command(CLI::App& app, CommandFn& run);
void add_profile_command(CLI::App& app, CommandFn& run);
void add_plan_command(CLI::App& app, CommandFn& run);
void add_train_command(CLI::App& app, CommandFn& run);
void add_generate_command(CLI::App& app, CommandFn& run);
void add_serve_command(CLI::App& app, CommandFn& run);
void add_eval_command(CLI::App& app, CommandFn& run);
void add_model_check_command(CLI::App& app, CommandFn& run);
// `bench` subcommands
void add_bench_gemm_command(CLI::App& bench, CommandFn& run);
void add_bench_layer_command(CLI::App& bench, CommandFn& run);
void add_bench_floor_command(CLI::App& bench, CommandFn& run);

// The layer-shape flags that `layer` and `plan` share: --tokens (per rank), --model-dim,
// --hidden, --experts (over all ranks), --top-k, --capacity-factor.
// A training configuration's 'bf16_order' ("" leaves pipemoe's --bf16-order), for train and
// model-check, and a checkpoint's for the commands that load one (unless --bf16-order was given):
// before the model is built, every rank alike.
void apply_bf16_order(const Context& ctx, const std::string& order);

void add_layer_shape_options(CLI::App* cmd, MoeShape& shape);
// --dtype fp32|bf16 into `dtype`, and an activation flag (gelu|swiglu) named `flag` into `activation`.
void add_dtype_option(CLI::App* cmd, Precision& dtype, const std::string& help);
void add_activation_option(CLI::App* cmd, const std::string& flag, Activation& activation, const std::string& help);

}  // namespace pm::cli
