// A made-up performance profile for tests of what is planned from one: the all-to-all costs
// `link_s_per_mb`, the expert GEMMs run at `gflops`, and every task has a fixed cost.
#pragma once

#include <string>

#include "perf/perf_profile.h"

namespace pm {

inline PerfProfile synthetic_profile(double link_s_per_mb, double gflops, double fixed_s = 50e-6) {
  PerfProfile p;
  p.cluster = {2, 2, 1, "test cpu", "test network"};
  for (const char* cost : {"gate", "pack", "pack_weights", "counts", "all_to_all", "expert_fwd", "unpack", "gate_bwd",
                           "expert_dgrad", "expert_wgrad", "unpack_bwd"}) {
    CostModel& m = p.models[cost];
    m.fitted = true;
    m.coef = {fixed_s, 0, 0, 0};
    const std::string kind = cost;
    if (kind == "all_to_all") m.coef[3] = link_s_per_mb / 1e6;
    if (kind == "expert_fwd" || kind == "expert_dgrad" || kind == "expert_wgrad") m.coef[2] = 1.0 / (gflops * 1e9);
  }
  return p;
}

}  // namespace pm
