// Takes a performance profile on the ranks it runs on: runs real MoE layers of several shapes at
// several degrees, times every task with the lanes run one after the other (serial executor), fits
// each cost class's linear model, then fits the interference factors so that simulated overlapped
// runs match measured ones. Collective: every rank calls it and gets the same profile.
#pragma once

#include <functional>
#include <string>
#include <vector>

#include "perf/perf_profile.h"
#include "perf/planner.h"

namespace pm {

struct ProfileOptions {
  std::vector<MoeShape> shapes;
  const MoeStrategy* strategy = &moe_strategy("ep");
  std::vector<int> degrees = {1, 2, 4, 8};
  int iters = 3;
  uint64_t seed = 1;
  Precision precision = Precision::fp32;  // every shape's (the layers' GEMMs and all-to-all payloads)
  std::function<void(const std::string&)> progress;  // called on rank 0
};

// Shapes that span the range `bench layer` uses: small and large model and hidden dimensions,
// top-1 and top-2, one and several local experts.
std::vector<MoeShape> default_profile_shapes(int ranks);

PerfProfile take_profile(Communicator& comm, Backend& backend, const ProfileOptions& options);

}  // namespace pm
