// The MoE layer's schedules, defined once: the executor runs these graphs with real work bound
// to each task, and the planner simulates the very same graphs with predicted durations.
//
// Forward, degree r (insertion order = priority on each lane):
//   compute: gate -> pack -> pack_weights      comm: counts
//   comm:    dispatch[0..r)   (each after pack and counts; pack_weights overlaps them)
//   compute: expert[0..r)     (expert[c] after dispatch[c], pack_weights and expert[c-1])
//   comm:    combine[0..r)    (combine[c] after expert[c])
//   compute: unpack           (after every combine)
// Backward, degree r:
//   compute: pack_grad, pack_weights, gate_bwd (these fill the wait for the first chunk)
//   comm:    grad_dispatch[0..r)
//   compute: expert_dgrad[0..r)  then expert_wgrad once over all rows (bit-identical for every r)
//   comm:    grad_combine[0..r)
//   compute: unpack_grad      (after every grad_combine and gate_bwd)
#pragma once

#include <cstdint>
#include <vector>

#include "sched/task_graph.h"

namespace pm {

// Sizes behind each task's work: measured counts when known, balanced estimates when planning.
struct LayerGraphSizes {
  int64_t tokens = 0;  // this rank's T
  int64_t model_dim = 0;
  int64_t hidden = 0;
  int experts = 0;
  int top_k = 1;
  int peers = 1;
  int degree = 1;
  int64_t sent_rows = 0;                // rows this rank dispatches, all peers, all chunks
  std::vector<int64_t> chunk_send_rows;  // [degree] rows sent to other ranks (not self)
  std::vector<int64_t> chunk_recv_rows;  // [degree] rows this rank's experts compute
  int64_t received_rows() const;
};

// Sizes when every expert gets its fair share k T / E of rows, capped by capacity.
// The bytes a weight-packing pass moves: local experts' W1 and W2, read and written.
double weight_pack_bytes(const LayerGraphSizes& sizes);

LayerGraphSizes balanced_sizes(int64_t tokens, int64_t model_dim, int64_t hidden, int experts,
                               int top_k, double capacity_factor, int peers, int degree);

// What the forward graph's tasks do; the layer implements it. Null when only simulating.
class ForwardWork {
 public:
  virtual ~ForwardWork() = default;
  virtual void gate() = 0;
  virtual void pack() = 0;
  virtual void pack_weights() = 0;
  virtual void exchange_counts() = 0;
  virtual void dispatch(int chunk) = 0;
  virtual void expert(int chunk) = 0;
  virtual void combine(int chunk) = 0;
  virtual void unpack() = 0;
};

class BackwardWork {
 public:
  virtual ~BackwardWork() = default;
  virtual void pack_grad() = 0;
  virtual void pack_weights_backward() = 0;
  virtual void gate_backward() = 0;
  virtual void grad_dispatch(int chunk) = 0;
  virtual void expert_dgrad(int chunk) = 0;
  virtual void grad_combine(int chunk) = 0;
  virtual void expert_wgrad() = 0;
  virtual void unpack_grad() = 0;
};

TaskGraph build_forward_graph(const LayerGraphSizes& sizes, ForwardWork* work);
TaskGraph build_backward_graph(const LayerGraphSizes& sizes, BackwardWork* work);

}  // namespace pm
