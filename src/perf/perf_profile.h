// A performance profile: where it was taken, and fitted models of every cost class's duration.
//
// Each cost class's time alone is linear in its work: t = c0 + c_calls * calls + c_flops * flops +
// c_bytes * bytes, all coefficients >= 0 (fitted by `pipemoe profile` from real runs). While
// both lanes are busy, each runs slower by its interference factor. A profile is valid only on
// the cluster it was taken on: loading it elsewhere is an error that says what differs.
#pragma once

#include <array>
#include <map>
#include <string>
#include <vector>

#include "sched/simulator.h"
#include "sched/task_graph.h"

namespace pm {

class Backend;
class Communicator;

struct ClusterInfo {
  int world_size = 1;
  int hosts = 1;         // distinct host names among the ranks
  int threads = 1;       // compute threads per rank
  std::string cpu_model;
  std::string network;   // $PIPEMOE_NETWORK (set by scripts/emulate-cluster), else "shared memory"/"unknown"
  // What differs from `here`, in words; empty when a profile taken on *this can be used there.
  std::string mismatch(const ClusterInfo& here) const;
  std::string summary() const;
};

// Collective: every rank gets the same description.
ClusterInfo describe_cluster(Communicator& comm, const Backend& backend);

constexpr int kNumFeatures = 4;  // 1, calls, flops, bytes
std::array<double, kNumFeatures> task_features(const TaskWork& work);

struct CostModel {
  bool fitted = false;
  std::array<double, kNumFeatures> coef = {};
  int samples = 0;
  double r2 = 0;
  double median_rel_err = 0;
  double predict(const TaskWork& work) const;
};

struct PerfProfile {
  ClusterInfo cluster;
  std::string created;  // UTC time, ISO 8601
  // The precision the profiled layers ran ("fp32" or "bf16"): their expert GEMMs' costs are in
  // the models; a layer of the other precision is planned with them, with a warning.
  std::string dtype = "fp32";
  // bf16: how its GEMMs ran (Backend::bf16_path: "avx512_bf16", "amx", ...; "" in older profiles).
  // AMX's run several times faster than the others: a plan must not mix them.
  std::string bf16_path;
  std::map<std::string, CostModel> models;  // by cost class
  Interference interference;           // what the planner simulates with (refit on overlapped passes)
  Interference interference_measured;  // the direct measurement before the refit (for comparison)
  // overlapped layer passes vs their simulation at profiling, each against its round's level (the
  // host's drift between rounds taken out: perf/interference_fit.h)
  double self_check_median_error = 0;
  // Those passes one by one: which shape (index into the profiled shapes), degree and direction,
  // the measured and the simulated seconds. Where the models miss, per degree.
  struct CheckedPass {
    int shape = 0, degree = 1;
    bool forward = true;
    double measured_s = 0, predicted_s = 0;
  };
  std::vector<CheckedPass> self_check;

  // What makes this profile unfit to plan with, in words (empty: nothing): a cost class whose
  // linear model misses its own samples by more than kMaxFitError (median), or overlapped passes
  // that the simulation misses by more than kMaxSelfCheckError. Both come from a machine busy
  // with other work while profiling, or too few passes.
  static constexpr double kMaxFitError = 0.35, kMaxSelfCheckError = 0.25;
  std::vector<std::string> trust_problems() const;

  // Seconds the task takes alone; throws if its cost class was never profiled.
  double predict(const Task& task) const;
  std::string to_json() const;
  // Parses and validates; `source` names the file in error messages.
  static PerfProfile from_json(const std::string& text, const std::string& source);
  // Written to a temporary file and renamed: a crash never leaves half a profile.
  void save(const std::string& path) const;
  static PerfProfile load(const std::string& path);
};

// Collective: rank 0 reads the file and sends it to every rank, which parse it and check that it
// was taken on a cluster like this one; any problem is the same usage error on every rank. A
// profile with trust problems is used, with a warning that names them.
PerfProfile load_profile_for(Communicator& comm, const std::string& path, const ClusterInfo& here);

// Prints (rank 0) what makes the profile unfit to plan with, and what to do; nothing if all is well.
void warn_if_untrusted(const PerfProfile& profile, const std::string& path);
// Prints a warning if the profile's layers ran another precision than `dtype` ("fp32", "bf16"), or
// bf16 GEMMs on another path than `bf16_path` (this run's Backend::bf16_path).
void warn_if_other_dtype(const PerfProfile& profile, const std::string& path, const std::string& dtype,
                         const std::string& bf16_path);

}  // namespace pm
