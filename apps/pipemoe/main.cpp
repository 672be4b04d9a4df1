// pipemoe: the command-line entry point. Run under mpirun for several ranks:
//   mpirun -q -np 2 build/pipemoe layer --tokens 2048 --model-dim 512 --hidden 1024 --experts 8
// Errors: one line "pipemoe: error: ..." and a non-zero exit on every rank. Errors every rank
// sees alike (bad flags, shapes) end each rank on its own; errors one rank sees end the whole job.
#include <cstdio>
#include <cstdlib>

#include "apps/pipemoe/command.h"
#include "comm/mpi_communicator.h"
#include "core/error.h"
#include "core/log.h"
#include "kernels/cpu/blas.h"
#include "kernels/cpu/thread_pool.h"

namespace {

int run_cli(int argc, char** argv, pm::Communicator& comm) {
  CLI::App app{"pipemoe: Mixture-of-Experts training and inference with pipelined expert parallelism"};
  app.require_subcommand(1);
  int threads = 0;
  double comm_timeout_s = 600;
  app.add_option("--threads", threads,
                 "BLAS threads per rank (default: cores / ranks on this host, or $PIPEMOE_THREADS)");
  app.add_option("--comm-timeout", comm_timeout_s,
                 "seconds a collective may wait before the run fails (a peer is dead or stuck)");
  pm::cli::CommandFn run;
  pm::cli::add_layer_command(app, run);
  pm::cli::add_bench_command(app, run);
  pm::cli::add_profile_command(app, run);
  pm::cli::add_plan_command(app, run);
  pm::cli::add_train_command(app, run);
  pm::cli::add_generate_command(app, run);
  pm::cli::add_model_check_command(app, run);

  // An unknown command would otherwise read "A subcommand is required": name it instead.
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    if (arg == "--threads" || arg == "--comm-timeout") {
      ++i;
      continue;
    }
    if (arg.rfind("-", 0) == 0) continue;
    bool known = false;
    for (const CLI::App* sub : app.get_subcommands({})) known |= sub->get_name() == arg;
    PM_REQUIRE(known, "unknown command '{}' (see pipemoe --help)", arg);
    break;
  }
  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    if (comm.rank() == 0) app.exit(e);
    return 0;
  } catch (const CLI::ParseError& e) {
    throw pm::Error(pm::ErrorKind::usage, e.what());
  }
  PM_REQUIRE(threads >= 0, "--threads must be positive, got {}", threads);
  PM_REQUIRE(comm_timeout_s > 0, "--comm-timeout must be positive, got {}", comm_timeout_s);
  int compute_threads = threads > 0 ? threads : pm::default_compute_threads();
  pm::set_compute_threads(compute_threads);
  pm::blas_set_threads(compute_threads);
  comm.waiter().policy().timeout_s = comm_timeout_s;
  if (const char* w = std::getenv("PIPEMOE_COMM_WAIT")) {
    // "spin_us,min_sleep_us,max_sleep_us,early_polls,approach_fraction": for experiments with the
    // waiting side (comm/wait_schedule.h)
    pm::WaitPolicy& p = comm.waiter().policy();
    PM_REQUIRE(std::sscanf(w, "%lf,%lf,%lf,%d,%lf", &p.spin_us, &p.min_sleep_us, &p.max_sleep_us, &p.early_polls,
                           &p.approach_fraction) == 5 &&
                   p.spin_us >= 0 && p.min_sleep_us > 0 && p.max_sleep_us >= p.min_sleep_us && p.early_polls >= 0 &&
                   p.approach_fraction > 0 && p.approach_fraction < 1,
               "PIPEMOE_COMM_WAIT must be spin_us,min_sleep_us,max_sleep_us,early_polls,approach_fraction, got '{}'", w);
  }
  pm::cli::Context context{comm, pm::cpu_backend()};
  return run(context);
}

}  // namespace

int main(int argc, char** argv) {
  pm::blas_fix_core_type_or_reexec(argv);
  pm::MpiRuntime mpi(&argc, &argv);
  auto comm = pm::make_mpi_world_communicator();
  pm::log::set_rank(comm->rank());
  try {
    return run_cli(argc, argv, *comm);
  } catch (const pm::Error& e) {
    if (e.kind() == pm::ErrorKind::usage) {
      // Every rank raised it: each ends on its own, rank 0 speaks.
      if (comm->rank() == 0 && e.what()[0] != '\0') std::fprintf(stderr, "pipemoe: error: %s\n", e.what());
      return 2;
    }
    std::fprintf(stderr, "pipemoe: error (rank %d): %s\n", comm->rank(), e.what());
    pm::MpiRuntime::abort_job(1);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "pipemoe: error (rank %d): %s\n", comm->rank(), e.what());
    pm::MpiRuntime::abort_job(1);
  }
}
