#include "moe/moe_layer.h"

#include <cmath>
#include <cstring>

#include "core/rng.h"
#include "kernels/cpu/dispatch.h"
#include "moe/expert_ffn.h"
#include "sched/trace.h"

namespace pm {

void MoeLayerConfig::validate(int world_size) const {
  PM_REQUIRE(model_dim > 0, "model dim must be positive, got {}", model_dim);
  PM_REQUIRE(hidden > 0, "hidden dim must be positive, got {}", hidden);
  PM_REQUIRE(experts > 0, "number of experts must be positive, got {}", experts);
  PM_REQUIRE(top_k >= 1 && top_k <= experts, "top-k must be between 1 and the number of experts ({}), got {}",
             experts, top_k);
  PM_REQUIRE(capacity_factor > 0 && std::isfinite(capacity_factor),
             "capacity factor must be positive, got {}", capacity_factor);
  PM_REQUIRE(experts % world_size == 0,
             "{} experts cannot be spread evenly over {} ranks: the number of experts must be a "
             "multiple of the number of ranks",
             experts, world_size);
}

MoeLayer::MoeLayer(const MoeLayerConfig& config, Communicator& comm, Executor& executor)
    : config_(config), comm_(comm), executor_(&executor) {
  config_.validate(comm_.size());
  local_experts_ = config_.experts / comm_.size();
  packed_.resize(local_experts_);
  const int64_t M = config_.model_dim, H = config_.hidden, El = local_experts_;
  wg = Tensor::zeros({M, config_.experts});
  w1 = Tensor::zeros({El, M, H});
  b1 = Tensor::zeros({El, H});
  w2 = Tensor::zeros({El, H, M});
  b2 = Tensor::zeros({El, M});
  dwg = Tensor::zeros(wg.shape());
  dw1 = Tensor::zeros(w1.shape());
  db1 = Tensor::zeros(b1.shape());
  dw2 = Tensor::zeros(w2.shape());
  db2 = Tensor::zeros(b2.shape());
}

void MoeLayer::init_parameters(uint64_t seed) {
  const int64_t M = config_.model_dim, H = config_.hidden;
  Rng(seed, stream_id(2)).fill_normal(wg.f32(), wg.numel(), 0.0f, 1.0f / std::sqrt(static_cast<float>(M)));
  for (int le = 0; le < local_experts_; ++le) {
    uint64_t e = static_cast<uint64_t>(first_expert() + le);
    Rng(seed, stream_id(3, e)).fill_normal(w1.f32() + le * M * H, M * H, 0.0f, 1.0f / std::sqrt(static_cast<float>(M)));
    Rng(seed, stream_id(4, e)).fill_normal(b1.f32() + le * H, H, 0.0f, 0.1f);
    Rng(seed, stream_id(5, e)).fill_normal(w2.f32() + le * H * M, H * M, 0.0f, 1.0f / std::sqrt(static_cast<float>(H)));
    Rng(seed, stream_id(6, e)).fill_normal(b2.f32() + le * M, M, 0.0f, 0.1f);
  }
}

void MoeLayer::zero_grads() {
  for (Tensor* t : {&dwg, &dw1, &db1, &dw2, &db2}) t->zero();
}

void MoeLayer::set_degrees(int forward_degree, int backward_degree) {
  PM_REQUIRE(forward_degree >= 1 && backward_degree >= 1,
             "pipeline degree must be at least 1, got {} (forward) and {} (backward)", forward_degree,
             backward_degree);
  degree_fwd_ = forward_degree;
  degree_bwd_ = backward_degree;
}

LayerRunStats MoeLayer::collect_stats(int degree) const {
  const ExecutorStats& s = executor_->last_stats();
  auto kind_ms = [&](const char* cost) { return s.cost_busy(cost) * 1e3; };
  LayerRunStats out;
  out.wall_ms = s.wall_s * 1e3;
  out.comm_ms = s.busy(lanes::comm) * 1e3;
  out.compute_ms = s.busy(lanes::compute) * 1e3;
  out.expert_ms = kind_ms("expert_fwd") + kind_ms("expert_dgrad") + kind_ms("expert_wgrad");
  out.degree = degree;
  return out;
}

LayerGraphSizes MoeLayer::last_sizes(bool forward) const {
  const BlockLayout& tokens = forward ? tokens_fwd_ : tokens_bwd_;
  const BlockLayout& experts = forward ? experts_wire_fwd_ : experts_wire_bwd_;
  LayerGraphSizes s;
  s.tokens = tokens_;
  s.model_dim = config_.model_dim;
  s.hidden = config_.hidden;
  s.experts = config_.experts;
  s.top_k = config_.top_k;
  s.peers = comm_.size();
  s.degree = tokens.degree;
  s.sent_rows = tokens.total_rows;
  for (int c = 0; c < s.degree; ++c) {
    int64_t sent = 0, received = 0;
    for (int q = 0; q < s.peers; ++q) {
      if (q == comm_.rank()) continue;
      sent += tokens.peer_chunk_rows(c, q);
      received += experts.peer_chunk_rows(c, q);
    }
    // the busier direction of this rank's link sets the chunk's wire time
    s.chunk_send_rows.push_back(std::max(sent, received));
    s.chunk_recv_rows.push_back(experts.chunk_rows(c));
  }
  return s;
}

std::vector<int64_t> MoeLayer::choice_positions(const BlockLayout& layout) const {
  const int k = config_.top_k;
  std::vector<int64_t> pos(tokens_ * k, -1);
  for (int64_t i = 0; i < tokens_ * k; ++i) {
    int32_t s = routing_.slot[i];
    if (s < 0) continue;
    int32_t e = routing_.expert[i];
    pos[i] = layout.position(e / local_experts_, e % local_experts_, s);
  }
  return pos;
}

void MoeLayer::all_to_all_rows(const float* send, const BlockLayout& from, float* recv,
                               const BlockLayout& to, int chunk) {
  const int P = comm_.size();
  const int64_t M = config_.model_dim;
  std::vector<int64_t> send_counts(P), send_displs(P), recv_counts(P), recv_displs(P);
  for (int q = 0; q < P; ++q) {
    send_counts[q] = from.peer_chunk_rows(chunk, q) * M;
    send_displs[q] = from.block_offset(chunk, q, 0) * M;
    recv_counts[q] = to.peer_chunk_rows(chunk, q) * M;
    recv_displs[q] = to.block_offset(chunk, q, 0) * M;
  }
  comm_.alltoallv(send, send_counts, send_displs, recv, recv_counts, recv_displs, DType::f32);
}

// ---------------------------------------------------------------------------------------------
// Forward

void MoeLayer::forward(const float* x, int64_t tokens, float* y) {
  PM_REQUIRE(tokens > 0, "number of tokens must be positive, got {}", tokens);
  x_ = x;
  y_ = y;
  tokens_ = tokens;
  routing_.capacity = expert_capacity(config_.top_k, config_.capacity_factor, tokens, config_.experts);
  int most = std::max(degree_fwd_, degree_bwd_);
  PM_REQUIRE(most <= routing_.capacity,
             "pipeline degree {} is more than the capacity of {} slots per expert: use a degree of "
             "at most {}",
             most, routing_.capacity, routing_.capacity);
  LayerGraphSizes sizes = balanced_sizes(tokens, config_.model_dim, config_.hidden, config_.experts,
                                         config_.top_k, config_.capacity_factor, comm_.size(), degree_fwd_);
  TaskGraph graph = build_forward_graph(sizes, this);
  if (trace_) trace_->set_category("forward");
  executor_->run(graph, trace_);
  fwd_stats_ = collect_stats(degree_fwd_);
  // two GEMMs of 2 * rows * M * H each
  fwd_stats_.expert_flops = 4.0 * experts_wire_fwd_.total_rows * config_.model_dim * config_.hidden;
}

void MoeLayer::pack_weights() {
  const int64_t M = config_.model_dim, H = config_.hidden;
  for (int le = 0; le < local_experts_; ++le) {
    packed_[le].pack_forward(w1.f32() + le * M * H, w2.f32() + le * H * M, M, H);
    packed_[le].b1 = b1.f32() + le * H;
    packed_[le].b2 = b2.f32() + le * M;
  }
}

void MoeLayer::pack_weights_backward() {
  const int64_t M = config_.model_dim, H = config_.hidden;
  for (int le = 0; le < local_experts_; ++le)
    packed_[le].pack_backward(w1.f32() + le * M * H, w2.f32() + le * H * M, M, H);
}

void MoeLayer::gate() {
  gate_forward(x_, wg.f32(), tokens_, config_.model_dim, config_.experts, config_.top_k, gate_, routing_);
  own_counts_ = routing_.count;  // expert e = q * El + le: already [P, El]
  tokens_fwd_ = make_block_layout(own_counts_, comm_.size(), local_experts_, degree_fwd_, BlockOrder::wire);
  positions_fwd_ = choice_positions(tokens_fwd_);
  send_x_.resize(tokens_fwd_.total_rows * config_.model_dim);
  recv_y_.resize(tokens_fwd_.total_rows * config_.model_dim);
}

void MoeLayer::pack() {
  dispatch_rows(x_, tokens_, config_.model_dim, config_.top_k, positions_fwd_.data(), send_x_.data());
}

void MoeLayer::exchange_counts() {
  const int P = comm_.size(), El = local_experts_;
  std::vector<int64_t> counts(P, El), displs(P);
  for (int q = 0; q < P; ++q) displs[q] = q * El;
  recv_counts_.assign(P * El, 0);
  comm_.alltoallv(own_counts_.data(), counts, displs, recv_counts_.data(), counts, displs, DType::i64);

  const int64_t M = config_.model_dim, H = config_.hidden;
  experts_wire_fwd_ = make_block_layout(recv_counts_, P, El, degree_fwd_, BlockOrder::wire);
  experts_compute_fwd_ = make_block_layout(recv_counts_, P, El, degree_fwd_, BlockOrder::compute);
  const int64_t rows = experts_wire_fwd_.total_rows;
  recv_x_.resize(rows * M);
  u_chunked_.resize(rows * M);
  hpre_chunked_.resize(rows * H);
  act_chunked_.resize(rows * H);
  y_chunked_.resize(rows * M);
}

void MoeLayer::dispatch(int chunk) {
  all_to_all_rows(send_x_.data(), tokens_fwd_, recv_x_.data(), experts_wire_fwd_, chunk);
}

void MoeLayer::expert(int chunk) {
  const int64_t M = config_.model_dim, H = config_.hidden;
  const BlockLayout& wire = experts_wire_fwd_;
  const BlockLayout& compute = experts_compute_fwd_;
  copy_rows(recv_x_.data(), u_chunked_.data(), M, chunk_segments(wire, compute, chunk));
  for (int le = 0; le < local_experts_; ++le) {
    int64_t first = compute.block_offset(chunk, 0, le), rows = 0;
    for (int q = 0; q < comm_.size(); ++q) rows += compute.block_rows(chunk, q, le);
    expert_forward(packed_[le], rows, M, H, &u_chunked_[first * M], &hpre_chunked_[first * H],
                   &act_chunked_[first * H], &y_chunked_[first * M]);
  }
  copy_rows(y_chunked_.data(), recv_x_.data(), M, chunk_segments(compute, wire, chunk));
  // u, hpre and act stay where this chunk put them: the backward reads them there, by row.
}

void MoeLayer::combine(int chunk) {
  all_to_all_rows(recv_x_.data(), experts_wire_fwd_, recv_y_.data(), tokens_fwd_, chunk);
}

void MoeLayer::unpack() {
  combine_rows(recv_y_.data(), gate_.gate.data(), tokens_, config_.model_dim, config_.top_k,
               positions_fwd_.data(), y_);
}

// ---------------------------------------------------------------------------------------------
// Backward

void MoeLayer::backward(const float* dy, float* dx, float aux_grad) {
  PM_CHECK(x_ != nullptr, "backward before forward");
  dy_ = dy;
  dx_ = dx;
  aux_grad_ = aux_grad;
  LayerGraphSizes sizes = balanced_sizes(tokens_, config_.model_dim, config_.hidden, config_.experts,
                                         config_.top_k, config_.capacity_factor, comm_.size(), degree_bwd_);
  TaskGraph graph = build_backward_graph(sizes, this);
  if (trace_) trace_->set_category("backward");
  executor_->run(graph, trace_);
  bwd_stats_ = collect_stats(degree_bwd_);
  // input gradients (two GEMMs) and weight gradients (two GEMMs)
  bwd_stats_.expert_flops = 8.0 * experts_wire_bwd_.total_rows * config_.model_dim * config_.hidden;
}

void MoeLayer::pack_grad() {
  const int P = comm_.size(), El = local_experts_;
  const int64_t M = config_.model_dim, H = config_.hidden;
  const int k = config_.top_k;
  tokens_bwd_ = make_block_layout(own_counts_, P, El, degree_bwd_, BlockOrder::wire);
  positions_bwd_ = choice_positions(tokens_bwd_);
  experts_wire_bwd_ = make_block_layout(recv_counts_, P, El, degree_bwd_, BlockOrder::wire);
  experts_compute_bwd_ = make_block_layout(recv_counts_, P, El, degree_bwd_, BlockOrder::compute);
  const int64_t rows = experts_wire_bwd_.total_rows;
  send_dy_.resize(tokens_bwd_.total_rows * M);
  recv_dx_.resize(tokens_bwd_.total_rows * M);
  recv_dy_.resize(rows * M);
  dy_chunked_.resize(rows * M);
  dhpre_chunked_.resize(rows * H);
  du_chunked_.resize(rows * M);
  combine_rows_backward_slots(dy_, gate_.gate.data(), tokens_, M, k, positions_bwd_.data(), send_dy_.data());
}

void MoeLayer::gate_backward() {
  const int64_t M = config_.model_dim;
  const int k = config_.top_k;
  // d loss / d gate value = <dy_t, FFN_e(x_t)> for kept choices.
  std::vector<float> dgate(tokens_ * k);
  combine_rows_backward_gate(dy_, recv_y_.data(), tokens_, M, k, positions_fwd_.data(), dgate.data());
  dx_gate_.resize(tokens_ * M);
  pm::gate_backward(x_, wg.f32(), tokens_, M, config_.experts, k, gate_, routing_, dgate.data(),
                    aux_grad_, dwg.f32(), dx_gate_.data());
}

void MoeLayer::grad_dispatch(int chunk) {
  all_to_all_rows(send_dy_.data(), tokens_bwd_, recv_dy_.data(), experts_wire_bwd_, chunk);
}

void MoeLayer::expert_dgrad(int chunk) {
  const int64_t M = config_.model_dim, H = config_.hidden;
  const BlockLayout& wire = experts_wire_bwd_;
  const BlockLayout& compute = experts_compute_bwd_;
  copy_rows(recv_dy_.data(), dy_chunked_.data(), M, chunk_segments(wire, compute, chunk));
  // the pre-activations of this chunk's rows, wherever the forward's chunks left them
  std::vector<const float*> hpre_rows =
      row_pointers(hpre_chunked_.data(), H, chunk_row_positions(compute, experts_compute_fwd_, chunk));
  const int64_t chunk_first = compute.chunk_offset(chunk);
  for (int le = 0; le < local_experts_; ++le) {
    int64_t first = compute.block_offset(chunk, 0, le), rows = 0;
    for (int q = 0; q < comm_.size(); ++q) rows += compute.block_rows(chunk, q, le);
    expert_backward_input(packed_[le], rows, M, H, &dy_chunked_[first * M], &hpre_rows[first - chunk_first],
                          &dhpre_chunked_[first * H], &du_chunked_[first * M]);
  }
  copy_rows(du_chunked_.data(), recv_dy_.data(), M, chunk_segments(compute, wire, chunk));
  // dy and dhpre stay where this chunk put them: the weight gradients read them there, by row.
}

void MoeLayer::grad_combine(int chunk) {
  all_to_all_rows(recv_dy_.data(), experts_wire_bwd_, recv_dx_.data(), tokens_bwd_, chunk);
}

void MoeLayer::expert_wgrad() {
  const int64_t M = config_.model_dim, H = config_.hidden;
  for (int le = 0; le < local_experts_; ++le) {
    // every row in canonical order, read where the forward and backward chunks left it
    std::vector<int64_t> fwd = canonical_row_positions(experts_compute_fwd_, le);
    std::vector<int64_t> bwd = canonical_row_positions(experts_compute_bwd_, le);
    ExpertRows rows{row_pointers(u_chunked_.data(), M, fwd), row_pointers(act_chunked_.data(), H, fwd),
                    row_pointers(dhpre_chunked_.data(), H, bwd), row_pointers(dy_chunked_.data(), M, bwd)};
    ExpertGrads g{dw1.f32() + le * M * H, db1.f32() + le * H, dw2.f32() + le * H * M, db2.f32() + le * M};
    expert_weight_grads(g, M, H, rows);
  }
}

void MoeLayer::unpack_grad() {
  std::memcpy(dx_, dx_gate_.data(), tokens_ * config_.model_dim * sizeof(float));
  dispatch_rows_backward(recv_dx_.data(), tokens_, config_.model_dim, config_.top_k,
                         positions_bwd_.data(), dx_);
}

}  // namespace pm
