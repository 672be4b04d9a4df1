// The expert-parallel layer's schedules, defined once: the layer runs these tasks with its work
// bound to them, and the planner simulates the very same tasks with predicted durations.
//
// Forward, degree r (insertion order = priority on each lane; every task after `after`):
//   compute: gate -> pack -> pack_weights      comm: counts
//   comm:    dispatch[0..r)   (each after pack and counts; pack_weights overlaps them)
//   compute: expert[0..r)     (expert[c] after dispatch[c], pack_weights and expert[c-1])
//   comm:    combine[0..r)    (combine[c] after expert[c])
//   compute: unpack           (after every combine): the output
// Backward, degree r:
//   compute: pack_grad, pack_weights, gate_bwd (these fill the wait for the first chunk)
//   comm:    grad_dispatch[0..r)
//   compute: expert_dgrad[0..r)  then expert_wgrad once over all rows (bit-identical for every r)
//   comm:    grad_combine[0..r)
//   compute: unpack_grad      (after every grad_combine and gate_bwd): the output
#pragma once

#include <cstdint>
#include <functional>
#include <vector>

#include "moe/moe_shape.h"
#include "sched/task_graph.h"

namespace pm {

// How many rows each task of one pass moves and computes: from the real routing once the gate
// has run, or balanced estimates when planning.
struct PassRows {
  MoeShape shape;
  int degree = 1;
  int64_t sent_rows = 0;                 // rows this rank dispatches, all peers, all chunks
  std::vector<int64_t> chunk_send_rows;  // [degree] rows on this rank's link (the busier direction), not self
  std::vector<int64_t> chunk_recv_rows;  // [degree] rows this rank's experts compute
  // [degree] the forward dispatch's rows on the link when it is deduplicated (a token once per
  // rank: moe/unique_rows.h); empty: chunk_send_rows, as the other all-to-alls
  std::vector<int64_t> chunk_dispatch_rows;
  // [degree] the backward's dispatch's rows when it is deduplicated (float32 rows: the pass's
  // scale_grad_dispatch_on_experts); empty: chunk_send_rows
  std::vector<int64_t> chunk_grad_dispatch_rows;
  int64_t received_rows() const;
  // The dispatch carries `unique_share` of chunk_send_rows (chunk by chunk in proportion), or all of
  // them where deduplicating would save under a tenth (unique_rows.h sends those whole); the
  // backward's dispatch the same where it is deduplicated (scale_grad_dispatch_on_experts).
  void deduplicate_dispatch(double unique_share);
};

// Whether a pass's backward dispatch (gate * dy) is deduplicated too, its rows float32 dy scaled on
// the expert side (dispatcher.h scale_on_expert_side): with the forward's deduplication, where the
// shape says the float32 rows take fewer bytes (unique_rows.h scaled_dispatch_pays).
bool scale_grad_dispatch_on_experts(const MoeShape& shape);

// Every expert gets its fair share k T / E of rows, capped by the capacity. A deduplicated dispatch
// (shape.dedup_dispatch, top-k > 1) sends each peer the tokens with at least one of their k
// distinct choices among its experts, the choices drawn uniformly.
PassRows balanced_rows(const MoeShape& shape, int degree);

// The ids of a pass's tasks in a graph: what later builders depend on.
struct PassTasks {
  std::vector<int> ids;   // every task of the pass with a work of its own, in the order added
  int fetch = -1;         // the offloaded experts' fetch on the copy lane, if any
  int output = -1;        // after it the pass's output (y or dx) is complete
  std::vector<int> grads;  // after these the parameter gradients are complete (backward)
};

// What each task of a forward pass does; null (planning): nothing.
struct ForwardSteps {
  std::function<void()> gate, pack, counts, pack_weights;
  std::function<void(int chunk)> dispatch, expert, combine;
  std::function<void()> unpack;
  // Offloaded experts: load the ones this pass needs (known once the counts are in) on the copy
  // lane, while the rest goes on; the experts wait for it. Empty: no such task.
  std::function<void()> fetch;
};
struct BackwardSteps {
  std::function<void()> pack_grad, pack_weights, gate_backward;
  std::function<void(int chunk)> grad_dispatch, expert_dgrad, grad_combine;
  std::function<void()> expert_wgrad, unpack_grad;
};

// `between` (may be empty) is called once the tasks that send the rows out are added (gate, pack,
// counts, pack_weights, dispatch[c]; backward: pack_grad, pack_weights, gate_bwd,
// grad_dispatch[c]) and before the experts: what it adds to the graph comes before them in each
// lane's order, so that the all-to-all overlaps it (ScMoE puts the dense block there).
using Between = std::function<void(TaskGraph& graph)>;
PassTasks append_ep_forward(TaskGraph& graph, const std::vector<int>& after, const PassRows& rows,
                            const ForwardSteps* steps, const Between& between = {});
PassTasks append_ep_backward(TaskGraph& graph, const std::vector<int>& after, const PassRows& rows,
                             const BackwardSteps* steps, const Between& between = {});

// Puts the work of the real rows into a pass's tasks (the counts are known once the gate ran).
void set_ep_forward_work(TaskGraph& graph, const PassTasks& tasks, const PassRows& rows);
void set_ep_backward_work(TaskGraph& graph, const PassTasks& tasks, const PassRows& rows);

}  // namespace pm
