// What every subcommand of the pipemoe CLI gets, and how it registers itself.
#pragma once

#include <CLI/CLI.hpp>
#include <functional>
#include <string>

#include "comm/communicator.h"

namespace pm::cli {

struct Context {
  Communicator& comm;
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
void add_model_check_command(CLI::App& app, CommandFn& run);
// `bench` subcommands
void add_bench_gemm_command(CLI::App& bench, CommandFn& run);
void add_bench_layer_command(CLI::App& bench, CommandFn& run);

// Every rank states whether its local step succeeded (error empty) and all agree: if any failed,
// every rank throws a usage error; rank 0's carries the first failing rank's message, the others
// are silent. For failures only some ranks see (a folder one rank cannot write).
void agree_or_throw(Communicator& comm, const std::string& error);

}  // namespace pm::cli
