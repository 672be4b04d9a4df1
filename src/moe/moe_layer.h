// An MoE layer as a strategy: E experts shared by the ranks of a group, and a way of moving each
// token to its experts and back. Every strategy appends a pass's tasks, with the work bound to
// them, to a task graph that the caller runs: alone (the `layer` command, the profiler), or inside
// a whole transformer block beside its dense work (the model). The planner simulates the same
// tasks with a balanced routing and no work bound.
//
// Strategies: expert parallelism with pipelined all-to-all (moe/expert_parallel.h), and PPMoE:
// the experts split over a tensor-parallel group that holds the same tokens, index selection and
// one all-reduce instead of the all-to-all (moe/ppmoe.h).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "comm/communicator.h"
#include "core/parameter.h"
#include "kernels/backend.h"
#include "moe/ep_graph.h"
#include "moe/expert_store.h"
#include "moe/gate.h"
#include "moe/moe_shape.h"
#include "moe/routing.h"
#include "sched/executor.h"
#include "sched/task_graph.h"

namespace pm {

class Trace;
class MoeLayer;

// What one forward pass computed that its backward needs (the layer's saved tensors). Keep it,
// and the pass's input, alive until the backward has run.
class MoePass {
 public:
  virtual ~MoePass() = default;
  virtual double aux_loss() const = 0;          // of this rank's tokens
  virtual double z_loss() const = 0;            // router z-loss of this rank's tokens (gate.h)
  virtual int64_t expert_rows() const = 0;      // rows this rank's experts computed
  // Rows this rank's forward dispatch sent to other ranks, and the choices they carried (equal
  // unless the dispatch is deduplicated: then a row carries all of a token's choices on a rank).
  // 0 and 0 for a layer without a dispatch (PPMoE).
  virtual int64_t dispatch_rows_sent() const { return 0; }
  virtual int64_t dispatch_choices_sent() const { return 0; }
  virtual const Routing& routing() const = 0;   // this rank's tokens' choices and slots
  // Bytes of backend memory the pass holds now: after its forward, what it keeps for its backward.
  virtual int64_t held_bytes() const = 0;
};

struct MoeForward {
  PassTasks tasks;  // tasks.output: y is complete
  std::shared_ptr<MoePass> pass;
};

// How a layer's tokens reach their experts: the tasks its passes append.
class MoeStrategy {
 public:
  virtual ~MoeStrategy() = default;
  virtual std::string name() const = 0;
  // A pass of a layer of this shape at this pipeline degree, with a balanced routing and no work
  // bound: what the planner simulates.
  virtual PassTasks plan_forward(TaskGraph& graph, const std::vector<int>& after, const MoeShape& shape,
                                 int degree, const Between& between = {}) const = 0;
  virtual PassTasks plan_backward(TaskGraph& graph, const std::vector<int>& after, const MoeShape& shape,
                                  int degree, const Between& between = {}) const = 0;
  // A layer of this strategy for the ranks of `group` (shape.ranks must be its size).
  virtual std::unique_ptr<MoeLayer> make_layer(const MoeShape& shape, Communicator& group, Backend& backend) const = 0;
};

// By name: "ep" (expert parallelism, all-to-all) or "ppmoe". Usage error for an unknown name.
const MoeStrategy& moe_strategy(const std::string& name);

class MoeLayer {
 public:
  virtual ~MoeLayer() = default;
  virtual const MoeStrategy& strategy() const = 0;
  virtual const MoeShape& shape() const = 0;
  // The global id of this rank's first expert (its experts are consecutive).
  virtual int first_expert() const = 0;

  // Parameters and their gradients (backward adds to them), named within the layer: the gate
  // "wg" [M, E] (replicated) and this rank's experts "w1" [El, M, H], "b1" [El, H], "w2" [El, H, M],
  // "b2" [El, M]; with shape().balance_bias also "router_bias" [E] (replicated; no gradient moves it).
  virtual std::vector<Parameter> parameters() = 0;
  // Draws every weight from (seed, global expert id) streams: the same seed gives the same global
  // experts whatever the number of ranks.
  virtual void init_parameters(uint64_t seed) = 0;
  void zero_grads();

  // The capacity factor of the next passes (0: dropless; inference uses it).
  virtual void set_capacity_factor(double capacity_factor) = 0;
  // Inference from now on: the passes keep nothing for a backward (GeLU experts skip the derivative
  // a backward would read), and a backward is an error. The expert-parallel layer frees its
  // experts' fp32 W1 and W2 once it has packed them (pack_for_inference, or its first pass): their
  // entries in parameters() hold no memory from then on.
  virtual void set_inference() = 0;
  // Inference: pack the experts' weights for the GEMMs now and free their fp32 W1 and W2, instead
  // of at the first pass. A checkpoint's load calls it as each layer's experts arrive, so that the
  // fp32 experts of one layer at a time are held beside the packed ones (apps/pipemoe/
  // inference_model.cpp). Nothing to do where the layer keeps no fp32 experts of its own.
  virtual void pack_for_inference() {}

  // Inference with offloaded experts: the routed experts live in `store` (host memory, a mapped
  // file) and at most `cache_slots` of this rank's are resident (moe/expert_store.h); the layer no
  // longer holds them, and parameters() lists only the gate. No backward after this.
  virtual void offload_experts(std::shared_ptr<const ExpertStore> store, int cache_slots, OffloadMode mode) = 0;
  virtual const ExpertCache* expert_cache() const = 0;  // null unless offloaded
  // How many times the layer packed its experts' weights for the GEMMs (each direction counts):
  // once per change of the weights, not once per pass (moe/layer_weights.h, PackedExperts).
  virtual int64_t weight_packings() const = 0;

  // The tasks of a pass at `degree` with the rows `pass` really routed (its forward, or its
  // backward), no work bound: what the planner simulates to choose this layer's degree from its
  // own routing instead of a balanced one. `pass` must be one of this layer's.
  virtual PassTasks plan_pass(TaskGraph& graph, const MoePass& pass, int degree, bool forward) const = 0;

  // Rows the last backward's dispatch (of gate * dy) sent other ranks, and the choices they carried
  // (fewer rows when it was deduplicated: moe/ep_graph.h scale_grad_dispatch_on_experts). 0 and 0
  // before a backward, and for a layer without a dispatch (PPMoE).
  virtual int64_t grad_dispatch_rows_sent() const { return 0; }
  virtual int64_t grad_dispatch_choices_sent() const { return 0; }

  // Pipeline degrees (chunks) of the next passes, each at least 1 and at most the capacity.
  virtual void set_degrees(int forward_degree, int backward_degree) = 0;
  virtual int forward_degree() const = 0;
  virtual int backward_degree() const = 0;

  // y[T, M] = layer(x[T, M]), appended after the tasks `after` (those that write x and last read
  // y). x must stay unchanged until the backward has run. `between` (optional) adds the caller's
  // own tasks once the rows are on their way out and before the experts (ep_graph.h): the seam
  // where ScMoE lays the dense block beside the all-to-all.
  virtual MoeForward append_forward(TaskGraph& graph, const std::vector<int>& after, const float* x, int64_t tokens,
                                    float* y, const Between& between = {}) = 0;
  // dx[T, M] from dy[T, M] for that pass; adds to the parameter gradients. loss_grads: d loss / d
  // aux loss (a bare number) and d loss / d z-loss.
  // tasks.output: dx is complete; tasks.grads: the gradients are.
  virtual PassTasks append_backward(TaskGraph& graph, const std::vector<int>& after, const MoePass& pass,
                                    const float* dy, float* dx, RouterLossGrads loss_grads,
                                    const Between& between = {}) = 0;
};

// What every strategy's layer keeps the same way: its pipeline degrees (checked), and a pass
// object to fill: the previous one once nobody holds it any more, so that its buffers (tens of MB
// at large shapes) are reused warm instead of allocated and faulted in again.
struct PipelineDegrees {
  int forward = 1, backward = 1;
  void set(int forward_degree, int backward_degree);  // usage error below 1
};
template <typename Pass>
std::shared_ptr<Pass> reuse_pass(std::shared_ptr<Pass>& last) {
  if (!last || last.use_count() > 1) last = std::make_shared<Pass>();
  return last;
}
// Gives a pass's buffer's memory back once the pass's last reader of it has run: a model keeps
// every layer's forward pass until its backward, so what only the forward itself needs (the
// all-to-all's buffers) must not stay with it. The next resize allocates again.
template <typename Vector>
void release(Vector& buffer) {
  Vector(buffer.get_allocator()).swap(buffer);
}

// ---- the layer alone: one graph per pass ---------------------------------------------------------

// How long a pass of the layer alone took, and where the time went (this rank).
struct LayerRunStats {
  double wall_ms = 0;
  double comm_ms = 0;       // communication lane busy
  double expert_ms = 0;     // expert FFN tasks
  double compute_ms = 0;    // compute lane busy
  double expert_flops = 0;  // arithmetic of the expert GEMMs on the rows this rank computed
  double comm_cpu_ms = 0;   // CPU time of the communication lane's thread
};

// A pass run alone on `executor`: its graph (the real rows in its tasks' work) and its figures.
struct LayerPassRun {
  TaskGraph graph;
  LayerRunStats stats;
  std::vector<TaskRecord> records;  // when each task ran (executor clock), for model checks
};

// Tasks a caller lays beside a layer run alone (e.g. a shared expert): `between` at the layer's
// seam (while its rows are on their way out, before its experts), `finish` once the layer's
// output is complete (it gets the layer's tasks to depend on).
struct BesideLayer {
  Between between;
  std::function<void(TaskGraph& graph, const PassTasks& layer_tasks)> finish;
};

std::shared_ptr<MoePass> forward_alone(MoeLayer& layer, Executor& executor, const float* x, int64_t tokens, float* y,
                                       Trace* trace = nullptr, LayerPassRun* run = nullptr,
                                       const BesideLayer& beside = {});
void backward_alone(MoeLayer& layer, Executor& executor, const MoePass& pass, const float* dy, float* dx,
                    RouterLossGrads loss_grads, Trace* trace = nullptr, LayerPassRun* run = nullptr,
                    const BesideLayer& beside = {});

}  // namespace pm
