// pipemoe bench: benchmarks that print a table and can write CSV (see each subcommand).
#include "apps/pipemoe/command.h"

namespace pm::cli {

void add_bench_command(CLI::App& app, CommandFn& run) {
  CLI::App* bench = app.add_subcommand("bench", "benchmarks: gemm, layer, floor");
  bench->require_subcommand(1);
  add_bench_gemm_command(*bench, run);
  add_bench_layer_command(*bench, run);
  add_bench_floor_command(*bench, run);
}

}  // namespace pm::cli
