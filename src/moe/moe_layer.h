// The expert-parallel MoE layer: E experts over P ranks (E/P each), tokens dispatched by
// all-to-all and combined back, forward and backward pipelined in chunks on two lanes.
//
// Per rank, T tokens x[T, M]: gate (see gate.h), capacity and slots (see routing.h), expert e on
// rank e / (E/P) as local expert e mod (E/P), y_t = sum over kept choices of gate * FFN_e(x_t).
// Results do not depend on the pipeline degree: every row is computed by the same kernels, and
// weight gradients are computed once over all rows in a canonical order.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "comm/communicator.h"
#include "core/aligned.h"
#include "core/tensor.h"
#include "moe/expert_ffn.h"
#include "moe/gate.h"
#include "moe/layer_graph.h"
#include "moe/routing.h"
#include "sched/executor.h"

namespace pm {

class Trace;

struct MoeLayerConfig {
  int64_t model_dim = 0;  // M
  int64_t hidden = 0;     // H
  int experts = 0;        // E, over all ranks
  int top_k = 1;
  double capacity_factor = 1.0;
  // Throws a usage error naming the first impossible value.
  void validate(int world_size) const;
};

// How long the last forward or backward took, and where the time went (this rank).
struct LayerRunStats {
  double wall_ms = 0;
  double comm_ms = 0;     // all-to-all tasks (count exchange included)
  double expert_ms = 0;   // expert FFN tasks
  double compute_ms = 0;  // every compute-lane task
  double expert_flops = 0;  // arithmetic of the expert GEMMs on the rows this rank computed
  int degree = 1;
};

class MoeLayer : private ForwardWork, private BackwardWork {
 public:
  MoeLayer(const MoeLayerConfig& config, Communicator& comm, Executor& executor);

  const MoeLayerConfig& config() const { return config_; }
  int local_experts() const { return local_experts_; }
  int first_expert() const { return comm_.rank() * local_experts_; }

  // Parameters (gate replicated, experts local) and their gradients, which backward adds to.
  Tensor wg;   // [M, E]
  Tensor w1;   // [El, M, H]
  Tensor b1;   // [El, H]
  Tensor w2;   // [El, H, M]
  Tensor b2;   // [El, M]
  Tensor dwg, dw1, db1, dw2, db2;
  // Draws every weight from (seed, global expert id) streams: the same seed gives the same global
  // experts whatever the number of ranks.
  void init_parameters(uint64_t seed);
  void zero_grads();

  // y[T, M] = layer(x[T, M]). x must stay alive and unchanged until backward.
  void forward(const float* x, int64_t tokens, float* y);
  // dx[T, M] from dy[T, M]; adds to the parameter gradients. aux_grad = d loss / d aux_loss.
  void backward(const float* dy, float* dx, float aux_grad);
  double aux_loss() const { return gate_.aux_loss; }
  int64_t capacity() const { return routing_.capacity; }
  const Routing& routing() const { return routing_; }

  // Pipeline degrees (chunks) for forward and backward; each at least 1 and at most the capacity.
  void set_degrees(int forward_degree, int backward_degree);
  int forward_degree() const { return degree_fwd_; }
  int backward_degree() const { return degree_bwd_; }
  void set_trace(Trace* trace) { trace_ = trace; }

  const LayerRunStats& forward_stats() const { return fwd_stats_; }
  const LayerRunStats& backward_stats() const { return bwd_stats_; }
  // The sizes behind the last forward (or backward) graph's tasks, from the real routing: the
  // work each task actually did, for fitting performance models.
  LayerGraphSizes last_sizes(bool forward) const;
  // Runs the next passes on another executor (e.g. serial, to time each lane alone).
  void use_executor(Executor& executor) { executor_ = &executor; }
  Executor& executor() { return *executor_; }

 private:
  // ForwardWork
  void gate() override;
  void pack() override;
  void pack_weights() override;
  void exchange_counts() override;
  void dispatch(int chunk) override;
  void expert(int chunk) override;
  void combine(int chunk) override;
  void unpack() override;
  // BackwardWork
  void pack_grad() override;
  void pack_weights_backward() override;
  void gate_backward() override;
  void grad_dispatch(int chunk) override;
  void expert_dgrad(int chunk) override;
  void grad_combine(int chunk) override;
  void expert_wgrad() override;
  void unpack_grad() override;

  // All-to-all of chunk `chunk` from layout `from` in send to layout `to` in recv (rows of M).
  void all_to_all_rows(const float* send, const BlockLayout& from, float* recv,
                       const BlockLayout& to, int chunk);
  // Row position of every kept choice in a token-side layout; -1 for dropped choices.
  std::vector<int64_t> choice_positions(const BlockLayout& token_layout) const;
  LayerRunStats collect_stats(int degree) const;

  MoeLayerConfig config_;
  Communicator& comm_;
  Executor* executor_;
  Trace* trace_ = nullptr;
  int local_experts_;
  int degree_fwd_ = 1, degree_bwd_ = 1;
  LayerRunStats fwd_stats_, bwd_stats_;
  std::vector<ExpertWeights> packed_;  // [El] this pass's packed expert weights

  // Forward state, kept for backward.
  const float* x_ = nullptr;  // [T, M]
  float* y_ = nullptr;        // [T, M]
  int64_t tokens_ = 0;
  GateState gate_;
  Routing routing_;
  std::vector<int64_t> own_counts_;    // [P, El] rows this rank sends to each expert
  std::vector<int64_t> recv_counts_;   // [P, El] rows each source sends to this rank's experts
  BlockLayout tokens_fwd_;             // token side, wire order, forward degree
  BlockLayout experts_wire_fwd_, experts_compute_fwd_;
  std::vector<int64_t> positions_fwd_;  // [T, k] into tokens_fwd_
  FloatBuffer send_x_;        // [tokens_fwd_ rows, M]
  FloatBuffer recv_x_;        // [experts_wire rows, M]; then holds the expert outputs sent back
  // Kept for backward, in the forward's compute order; backward reads them by row.
  FloatBuffer u_chunked_;     // [rows, M] expert inputs
  FloatBuffer hpre_chunked_;  // [rows, H] pre-activations
  FloatBuffer act_chunked_;   // [rows, H] GeLU outputs
  FloatBuffer y_chunked_;     // [rows, M] expert outputs
  FloatBuffer recv_y_;        // [tokens_fwd_ rows, M] expert outputs for this rank's tokens

  // Backward state.
  const float* dy_ = nullptr;
  float* dx_ = nullptr;
  float aux_grad_ = 0;
  BlockLayout tokens_bwd_, experts_wire_bwd_, experts_compute_bwd_;
  std::vector<int64_t> positions_bwd_;
  FloatBuffer send_dy_;        // [tokens_bwd_ rows, M] gate * dy
  FloatBuffer recv_dy_;        // [experts_wire rows, M]; then holds input grads sent back
  // Backward's compute order; the weight gradients read them by row.
  FloatBuffer dy_chunked_;     // [rows, M]
  FloatBuffer dhpre_chunked_;  // [rows, H]
  FloatBuffer du_chunked_;     // [rows, M]
  FloatBuffer recv_dx_;        // [tokens_bwd_ rows, M]
  FloatBuffer dx_gate_;        // [T, M] gate's share of dx
};

}  // namespace pm
