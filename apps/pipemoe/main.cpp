// pipemoe: the command-line entry point. Run under mpirun for several ranks:
//   mpirun -q -np 2 build/pipemoe layer --tokens 2048 --model-dim 512 --hidden 1024 --experts 8
// or with its ranks as threads of one process (no MPI; for tests and quick tries):
//   build/pipemoe --ranks-in-process 3 layer --experts 6 ...
// Errors: one line "pipemoe: error: ..." and a non-zero exit on every rank. Errors every rank
// sees alike (bad flags, shapes) end each rank on its own; errors one rank sees end the whole job.
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "apps/pipemoe/command.h"
#include "comm/heartbeat.h"
#include "comm/inprocess_communicator.h"
#include "comm/mpi_communicator.h"
#include "comm/nccl_communicator.h"
#include "core/compute_idle.h"
#include "core/error.h"
#include "core/log.h"
#include "kernels/cpu/blas.h"
#include "kernels/cpu/gemm.h"
#include "kernels/cpu/thread_pool.h"
#include "kernels/cuda/cuda_backend.h"
#include "pipemoe_version.h"

namespace {

// in_process: ranks are threads; the compute threads were set once for all of them.
int run_cli(int argc, char** argv, pm::Communicator& comm, bool in_process) {
  CLI::App app{"pipemoe: Mixture-of-Experts training and inference with pipelined expert parallelism"};
  app.require_subcommand(1);
  int threads = 0;
  double comm_timeout_s = 600;
  app.add_option("--threads", threads,
                 "BLAS threads per rank (default: cores / ranks on this host, or $PIPEMOE_THREADS)");
  app.add_option("--comm-timeout", comm_timeout_s,
                 "seconds a collective may wait before the run fails (a peer is dead or stuck)");
  double heartbeat_timeout_s = 15;  // read before the command runs (main); here for --help and checks
  app.add_option("--heartbeat-timeout", heartbeat_timeout_s,
                 "seconds without a heartbeat after which a rank is taken for dead and the job ends (0: off; "
                 "default 15)");
  std::string backend_name = "cpu";
  app.add_option("--backend", backend_name,
                 "where the arithmetic runs: cpu, or cuda (GEMMs and experts on this machine's GPU, the same bits; "
                 "needs a build with CUDA and a GPU)");
  std::string transport = "host";
  app.add_option("--transport", transport,
                 "how ranks exchange data: host (MPI under mpirun, shared memory with --ranks-in-process) or nccl "
                 "(the collectives on the GPUs with NCCL; needs a CUDA build and a GPU per rank)");
  std::string bf16_order = "dot";
  app.add_option("--bf16-order", bf16_order,
                 "the order in which bf16 GEMMs sum, which fixes their bits on every CPU: dot (AVX512_BF16's "
                 "vdpbf16ps; the default), amx (Intel AMX's tile product: several times faster bf16 GEMMs where "
                 "the CPU has AMX, an exact but slower model of its order elsewhere) or auto (amx where every "
                 "rank has AMX, else dot: the fastest, with bits that depend on the machines)")
      ->check(CLI::IsMember({"dot", "amx", "auto"}));
  int ranks_in_process = 0;
  app.add_option("--ranks-in-process", ranks_in_process,
                 "run N ranks as threads of this process instead of under mpirun (no MPI: tests, quick tries)");
  pm::cli::CommandFn run;
  pm::cli::add_layer_command(app, run);
  pm::cli::add_bench_command(app, run);
  pm::cli::add_profile_command(app, run);
  pm::cli::add_plan_command(app, run);
  pm::cli::add_train_command(app, run);
  pm::cli::add_generate_command(app, run);
  pm::cli::add_serve_command(app, run);
  pm::cli::add_eval_command(app, run);
  pm::cli::add_model_check_command(app, run);

  // An unknown command would otherwise read "A subcommand is required": name it instead.
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    if (arg == "--threads" || arg == "--comm-timeout" || arg == "--ranks-in-process" || arg == "--heartbeat-timeout" ||
        arg == "--backend" || arg == "--transport" || arg == "--bf16-order") {
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
  PM_REQUIRE(heartbeat_timeout_s >= 0, "--heartbeat-timeout must be 0 (off) or positive, got {}", heartbeat_timeout_s);
  const int compute_threads = threads > 0 ? threads : pm::default_compute_threads();
  if (!in_process) {
    pm::set_compute_threads(compute_threads);
    pm::blas_set_threads(compute_threads);
  }
  PM_REQUIRE(bf16_order != "amx" || backend_name == "cpu",
             "--bf16-order amx runs on the CPU backend only (the CUDA kernels sum in the dot order)");
  comm.waiter().policy().timeout_s = comm_timeout_s;
  // While the compute lane idles, transfers are tested at least every 50 us, unless the rank's cores
  // are shared with other ranks (core/compute_idle.h): it sleeps through them by the schedule then.
  if (!in_process && pm::cores_allowed() <= compute_threads) comm.waiter().policy().idle_max_sleep_us = 50;
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
  PM_REQUIRE(transport == "host" || transport == "nccl", "--transport must be host or nccl, got '{}'", transport);
  std::unique_ptr<pm::Communicator> nccl;
  if (transport == "nccl") nccl = pm::make_nccl_communicator(comm);
  pm::cli::Context context{nccl ? *nccl : comm, pm::backend_named(backend_name),
                          app.get_option("--bf16-order")->count() > 0};
  pm::cli::apply_bf16_order(context, bf16_order);
  return run(context);
}

// The value of `--name VALUE` (or `--name=VALUE`) among the global options (before the command),
// or null. Every global option takes a value, which is stepped over: `--backend cpu
// --ranks-in-process 2` ran one rank when the scan took "cpu" for the command.
const char* global_option(int argc, char** argv, const char* name) {
  const std::size_t name_length = std::strlen(name);
  for (int i = 1; i < argc; ++i) {
    const char* arg = argv[i];
    if (arg[0] != '-') return nullptr;  // the command: its own options follow
    if (const char* eq = std::strchr(arg, '=')) {
      if (static_cast<std::size_t>(eq - arg) == name_length && std::strncmp(arg, name, name_length) == 0) return eq + 1;
      continue;
    }
    if (std::strcmp(arg, name) == 0) return i + 1 < argc ? argv[i + 1] : nullptr;
    ++i;  // its value
  }
  return nullptr;
}

int global_int_option(int argc, char** argv, const char* name) {
  const char* value = global_option(argc, argv, name);
  return value ? std::atoi(value) : 0;
}

// Ranks as threads: every thread runs the command on its own communicator; rank 0 speaks.
int main_in_process(int argc, char** argv, int ranks) {
  PM_REQUIRE(ranks >= 1 && ranks <= 64, "--ranks-in-process must be 1 to 64, got {}", ranks);
  int threads = global_int_option(argc, argv, "--threads");
  if (threads <= 0) threads = std::getenv("PIPEMOE_THREADS") ? pm::default_compute_threads()
                                                              : std::max(1, static_cast<int>(std::thread::hardware_concurrency()) / ranks);
  pm::set_compute_threads(threads);
  pm::blas_set_threads(threads);
  std::atomic<int> exit_code{0};
  try {
    pm::run_ranks_in_process(ranks, [&](pm::Communicator& comm) {
      try {
        int code = run_cli(argc, argv, comm, /*in_process=*/true);
        if (code != 0) exit_code = code;
      } catch (const pm::Error& e) {
        if (e.kind() != pm::ErrorKind::usage) throw;  // ends the other ranks' waits
        if (comm.rank() == 0 && e.what()[0] != '\0') std::fprintf(stderr, "pipemoe: error: %s\n", e.what());
        exit_code = 2;
      }
    });
  } catch (const std::exception& e) {
    std::fprintf(stderr, "pipemoe: error: %s\n", e.what());
    return 1;
  }
  return exit_code;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc >= 2 && (std::strcmp(argv[1], "--version") == 0 || std::strcmp(argv[1], "version") == 0)) {
    std::string why_no_gpu;
    const std::string cuda = pm::cuda_available(&why_no_gpu) ? "cuda: " + pm::cuda_backend().name() : "cuda: " + why_no_gpu;
    std::string why_no_nccl;
    const std::string nccl = pm::nccl_available(&why_no_nccl) ? "nccl: available" : "nccl: " + why_no_nccl;
    std::printf("pipemoe %s (%s build, kernels %s; %s; %s)\n", PIPEMOE_GIT_COMMIT, PIPEMOE_BUILD_TYPE,
                pm::gemm_isa().c_str(), cuda.c_str(), nccl.c_str());
    return 0;
  }
  // `pipemoe help [command]` is `pipemoe [command] --help`
  std::vector<char*> args(argv, argv + argc);
  static char help_flag[] = "--help";
  if (argc >= 2 && std::strcmp(argv[1], "help") == 0) {
    args.erase(args.begin() + 1);
    args.push_back(help_flag);
  }
  argc = static_cast<int>(args.size());
  args.push_back(nullptr);
  argv = args.data();
  pm::blas_fix_core_type_or_reexec(argv);
  // For tests on CPUs without AVX512_BF16: bf16 GEMMs take that instruction's path with a scalar
  // model of it (kernels/cpu/gemm.h); the run's bf16 path reads "avx512_bf16 (emulated)".
  if (const char* e = std::getenv("PIPEMOE_EMULATE_BF16_DOT"); e && std::strcmp(e, "1") == 0)
    pm::emulate_bf16_dot_for_testing(true);
  // Not started by a launcher (mpirun, srun): one rank, without MPI. MPI's singleton start spawns
  // a daemon (orted) that took ~0.4 s at start and ~8% of a 2-vCPU machine's time while decoding.
  // PIPEMOE_MPI_SINGLETON=1 starts MPI anyway.
  const bool launched = std::getenv("OMPI_COMM_WORLD_SIZE") || std::getenv("PMIX_RANK") || std::getenv("PMI_RANK") ||
                        std::getenv("PMI_SIZE") || std::getenv("SLURM_PROCID");
  const char* singleton = std::getenv("PIPEMOE_MPI_SINGLETON");
  if (!launched && !(singleton && std::strcmp(singleton, "1") == 0) && global_option(argc, argv, "--ranks-in-process") == nullptr) {
    try {
      return main_in_process(argc, argv, 1);
    } catch (const std::exception& e) {
      std::fprintf(stderr, "pipemoe: error: %s\n", e.what());
      return 2;
    }
  }
  if (int ranks = global_int_option(argc, argv, "--ranks-in-process"); ranks != 0) {
    try {
      return main_in_process(argc, argv, ranks);
    } catch (const std::exception& e) {
      std::fprintf(stderr, "pipemoe: error: %s\n", e.what());
      return 2;
    }
  }
  pm::MpiRuntime mpi(&argc, &argv);
  auto comm = pm::make_mpi_world_communicator();
  pm::log::set_rank(comm->rank());
  try {
    const char* heartbeat_flag = global_option(argc, argv, "--heartbeat-timeout");
    pm::Heartbeat heartbeat(*comm, heartbeat_flag ? std::atof(heartbeat_flag) : 15.0);
    return run_cli(argc, argv, *comm, /*in_process=*/false);
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
