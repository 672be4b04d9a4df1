// pipemoe profile: measure this cluster and fit the performance models the planner uses.
//
//   scripts/emulate-cluster --hosts 2 --rate 1gbit -- mpirun -np 2 build/pipemoe profile --out profile.json
// Runs real MoE layers of several shapes at degrees 1, 2, 4, 8: every task timed with the lanes one
// after the other (its time alone), then overlapped runs for the interference factors. Prints each
// task kind's fitted model and writes the profile (JSON; atomically).
#include "apps/pipemoe/command.h"
#include "core/log.h"
#include "perf/profiler.h"

namespace pm::cli {
namespace {

struct ProfileCmdOptions {
  std::string out = "profile.json";
  int iters = 3;
  std::vector<int> degrees = {1, 2, 4, 8};
  bool quick = false;
  Precision dtype = Precision::fp32;
};

int run_profile(Context& ctx, const ProfileCmdOptions& o) {
  PM_REQUIRE(o.iters >= 1, "--iters must be at least 1, got {}", o.iters);
  for (int d : o.degrees) PM_REQUIRE(d >= 1, "--degrees must be positive, got {}", d);
  PM_REQUIRE(!o.degrees.empty(), "--degrees needs at least one degree");
  ProfileOptions po;
  po.shapes = default_profile_shapes(ctx.world());
  if (o.quick) po.shapes.resize(2);
  po.degrees = o.degrees;
  po.iters = o.iters;
  po.precision = o.dtype;
  po.progress = [](const std::string& what) { log::info("profile: {}", what); };
  PerfProfile profile = take_profile(ctx.comm, ctx.backend, po);
  if (ctx.rank() != 0) return 0;
  profile.save(o.out);
  std::printf("profile of %s, %s layers\n", profile.cluster.summary().c_str(), profile.dtype.c_str());
  std::printf("%-14s %8s %12s %12s %14s %14s %7s %9s\n", "cost class", "samples", "fixed us", "per call us",
              "per GFLOP ms", "per MB ms", "r2", "med.err");
  for (const auto& [cost, m] : profile.models) {
    if (!m.fitted) continue;
    std::printf("%-14s %8d %12.1f %12.1f %14.3f %14.3f %7.3f %8.1f%%\n", cost.c_str(),
                m.samples, m.coef[0] * 1e6, m.coef[1] * 1e6, m.coef[2] * 1e12, m.coef[3] * 1e9, m.r2,
                m.median_rel_err * 100);
  }
  std::printf("interference while both lanes run: compute x%.2f, communication x%.2f; hand-off %.0f us; "
              "%.2f ms per communication task\n",
              profile.interference.compute, profile.interference.comm, profile.interference.handoff_s * 1e6,
              profile.interference.comm_task_s * 1e3);
  std::printf("self-check: overlapped layer passes vs their simulation, the host's drift between rounds taken out: median error %.1f%%\n",
              profile.self_check_median_error * 100);
  std::printf("wrote %s\n", o.out.c_str());
  std::vector<std::string> problems = profile.trust_problems();
  if (problems.empty()) {
    std::printf("the fit is good: every cost class within %.0f%% of its samples (median), the self-check within %.0f%%\n",
                PerfProfile::kMaxFitError * 100, PerfProfile::kMaxSelfCheckError * 100);
  } else {
    std::printf("WARNING: this profile is not to be trusted:\n");
    for (const std::string& p : problems) std::printf("  - %s\n", p.c_str());
    std::printf("  Take it again on a quiet machine (nothing else running), with more passes (--iters 5) and all five\n"
                "  shapes (no --quick). `layer`, `plan` and `train` will warn while they use this one.\n");
  }
  return 0;
}

}  // namespace

void add_profile_command(CLI::App& app, CommandFn& run) {
  auto o = std::make_shared<ProfileCmdOptions>();
  CLI::App* cmd = app.add_subcommand("profile", "measure this cluster and fit the planner's performance models");
  cmd->add_option("--out", o->out, "profile file to write")->capture_default_str();
  cmd->add_option("--iters", o->iters, "timed passes per shape, degree and mode")->capture_default_str();
  cmd->add_option("--degrees", o->degrees, "degrees to run")->delimiter(',')->capture_default_str();
  cmd->add_flag("--quick", o->quick, "two shapes instead of five (for tests)");
  add_dtype_option(cmd, o->dtype, "the precision of the profiled layers: fp32, or bf16 (plans bf16 layers)");
  cmd->callback([o, &run] { run = [o](Context& ctx) { return run_profile(ctx, *o); }; });
}

}  // namespace pm::cli
