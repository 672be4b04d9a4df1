// Running an MoE layer for measurement: its random data, timed passes, and each lane timed alone.
// Shared by `pipemoe layer` and `pipemoe bench layer`.
#pragma once

#include <functional>
#include <vector>

#include "comm/communicator.h"
#include "core/stats.h"
#include "core/tensor.h"
#include "moe/moe_layer.h"
#include "moe/shared_expert.h"
#include "sched/executor.h"

namespace pm::cli {

// x and dy per rank from (seed, rank) streams; y and dx zeroed.
struct LayerData {
  Tensor x, dy, y, dx;
  // A shared expert beside the routed ones (`layer --shared-hidden`), or null: its output and
  // input gradient [T, M], added to y and dx once the layer's are complete.
  std::shared_ptr<SharedExpert> shared;
  Tensor shared_out, shared_dx;
  // Mark every weight changed before each pass, as an optimizer step would: the passes then pack
  // the experts' weights again each time (a training step's cost), not once for all of them.
  bool weights_change = false;
};
LayerData make_layer_data(int64_t tokens, int64_t model_dim, uint64_t seed, int rank);
// Puts a shared expert beside the layer for every pass run on `d`.
void add_shared_expert(LayerData& d, std::shared_ptr<SharedExpert> shared);

// Per-pass figures of this rank, milliseconds.
struct PassTimes {
  std::vector<double> forward, backward, comm_busy, comm_cpu, expert, expert_gflops;
  int64_t expert_rows = 0;  // rows this rank's experts computed in the last pass (the real counts)
  int64_t dispatch_rows_sent = 0, dispatch_choices_sent = 0;  // the last pass's (MoePass)
  int64_t grad_dispatch_rows_sent = 0, grad_dispatch_choices_sent = 0;  // the last backward's (MoeLayer)
  int64_t held_bytes = 0;   // what the last forward pass kept for its backward (MoePass::held_bytes)
  int64_t weight_packings = 0;  // the layer's packings of its experts' weights in the timed passes
};

// Called with each timed pass's forward and backward runs (graphs with the real rows, task records).
using PassObserver = std::function<void(const LayerPassRun& forward, const LayerPassRun& backward)>;

// warmup + iters passes (forward then backward, a barrier before each) on `executor`; keeps the
// last iters. With a trace, the timed passes are recorded in it.
PassTimes run_passes(Communicator& comm, MoeLayer& layer, Executor& executor, LayerData& data, int warmup, int iters,
                     RouterLossGrads loss_grads, Trace* trace = nullptr, const PassObserver& observe = {});

// One forward and backward pass, for a dump.
std::shared_ptr<MoePass> run_pass(MoeLayer& layer, Executor& executor, LayerData& data, RouterLossGrads loss_grads);

// Median over this rank's passes, then the slowest rank (min, median and max each the largest).
Summary slowest_rank(Communicator& comm, const std::vector<double>& values);

// The layer's communication and computation each run alone (serial executor), ms per direction:
// communication on the rank that waited least (the transfer itself), computation on the slowest
// rank.
struct LanesAlone {
  double comm_fwd_ms = 0, comm_bwd_ms = 0, compute_fwd_ms = 0, compute_bwd_ms = 0;
  double comm_ms() const { return comm_fwd_ms + comm_bwd_ms; }
  double compute_ms() const { return compute_fwd_ms + compute_bwd_ms; }
  // max(all communication, all computation): no schedule of the layer is faster
  double bound_ms() const;
  // the same per pass: the backward cannot start before the forward ends, so this tighter bound
  // holds too, and it is what a forward that is mostly communication and a backward that is mostly
  // computation can reach
  double pass_bound_ms() const;
};
// Medians of `iters` serial passes after `warmup` untimed ones.
LanesAlone time_lanes_alone(Communicator& comm, MoeLayer& layer, LayerData& data, int iters, RouterLossGrads loss_grads,
                            int warmup = 1);
// Field-wise median of several measurements.
LanesAlone median_lanes(const std::vector<LanesAlone>& samples);

}  // namespace pm::cli
