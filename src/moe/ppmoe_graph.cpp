#include "moe/ppmoe_graph.h"

#include <algorithm>
#include <numeric>

#include "moe/pass_builder.h"
#include "moe/routing.h"

namespace pm {

int64_t PpmoeRows::rows() const { return std::accumulate(chunk_rows.begin(), chunk_rows.end(), int64_t{0}); }

int64_t ppmoe_chunk_begin(int64_t tokens, int degree, int chunk) { return chunk_begin(tokens, degree, chunk); }

PpmoeRows balanced_ppmoe_rows(const MoeShape& shape, int degree) {
  PpmoeRows r;
  r.shape = shape;
  r.degree = degree;
  const int64_t T = shape.tokens;
  const int64_t per_expert = std::min(shape.capacity(), (shape.top_k * T + shape.experts - 1) / shape.experts);
  const int64_t rank_rows = per_expert * shape.local_experts();
  for (int c = 0; c < degree; ++c) {
    const int64_t t0 = ppmoe_chunk_begin(T, degree, c), t1 = ppmoe_chunk_begin(T, degree, c + 1);
    r.chunk_tokens.push_back(t1 - t0);
    r.chunk_rows.push_back(T == 0 ? 0 : rank_rows * t1 / T - rank_rows * t0 / T);
  }
  return r;
}

namespace {

// An all-reduce of `values` values of `bytes` each over the group: its bytes on the wire (a ring
// moves 2 (P-1)/P of the buffer each way), one message.
TaskWork reduce_work(int64_t values, int ranks, int64_t bytes = 4) {
  return TaskWork{1, 0, 2.0 * (ranks - 1) / ranks * static_cast<double>(values) * bytes};
}

std::vector<TaskWork> forward_works(const PpmoeRows& r) {
  const MoeShape& s = r.shape;
  const double T = static_cast<double>(s.tokens), M = static_cast<double>(s.model_dim);
  std::vector<TaskWork> w = {
      {3, 2 * T * M * s.experts, T * (M + 2.0 * s.experts) * 4},  // gate
      {2.0 * s.local_experts(), 0, weight_pack_bytes(s)},          // pack_weights
  };
  // gather in, FFN, this rank's share of the outputs
  for (int c = 0; c < r.degree; ++c) w.push_back(ffn_work(r.chunk_rows[c], s, 2, 3));  // expert
  // the outputs and input gradients cross as bf16 in a bf16 layer (comm/bf16_allreduce.h)
  for (int c = 0; c < r.degree; ++c) w.push_back(reduce_work(r.chunk_tokens[c] * s.model_dim, s.ranks, s.wire_bytes()));  // reduce
  return w;
}

std::vector<TaskWork> backward_works(const PpmoeRows& r) {
  const MoeShape& s = r.shape;
  const double T = static_cast<double>(s.tokens), M = static_cast<double>(s.model_dim);
  const double rows = static_cast<double>(r.rows());
  std::vector<TaskWork> w = {
      {1, 2 * rows * M, 2 * rows * M * 4},                 // dgate: a dot per choice of this rank
      {2.0 * s.local_experts(), 0, weight_pack_bytes(s)},  // pack_weights
      reduce_work(s.tokens * s.top_k, s.ranks),            // reduce_dgate
      {3, 4 * T * M * s.experts, T * (2 * M + 4.0 * s.experts) * 4},  // gate_bwd
  };
  for (int c = 0; c < r.degree; ++c) {
    w.push_back(dgrad_work(r.chunk_rows[c], s, 2));  // expert_dgrad: scaled grads in, input grads out
    w.push_back({1, static_cast<double>(r.chunk_rows[c]) * M, 2.0 * (r.chunk_tokens[c] + r.chunk_rows[c]) * M * 4});  // sum_dx
  }
  for (int c = 0; c < r.degree; ++c) w.push_back(reduce_work(r.chunk_tokens[c] * s.model_dim, s.ranks, s.wire_bytes()));  // reduce_dx
  w.push_back(ffn_work(r.rows(), s, 2, 1));  // expert_wgrad
  return w;
}

void check_rows(const PpmoeRows& r) {
  PM_CHECK(r.degree >= 1 && static_cast<int>(r.chunk_rows.size()) == r.degree &&
               static_cast<int>(r.chunk_tokens.size()) == r.degree,
           "PPMoE rows for degree {}", r.degree);
}

}  // namespace

PassTasks append_ppmoe_forward(TaskGraph& g, const std::vector<int>& after, const PpmoeRows& r,
                               const PpmoeForwardSteps* steps, const Between& between) {
  check_rows(r);
  const bool real = steps != nullptr;
  auto w = real ? std::make_shared<const PpmoeForwardSteps>(*steps) : nullptr;
  PassBuilder add{g, forward_works(r), {}};
  int gate = add("gate", lanes::compute, "gate", -1, after, bind_step(real, [w] { w->gate(); }));
  int weights = add("pack_weights", lanes::compute, "pack_weights", -1, after, bind_step(real, [w] { w->pack_weights(); }));
  if (between) between(g);
  std::vector<int> expert, reduce;
  for (int c = 0; c < r.degree; ++c) {
    std::vector<int> deps = {gate, weights};
    if (c > 0) deps.push_back(expert[c - 1]);
    expert.push_back(add(indexed("expert", c), lanes::compute, "expert_fwd", c, deps,
                         bind_step(real, [w, c] { w->expert(c); })));
  }
  for (int c = 0; c < r.degree; ++c) {
    std::vector<int> deps = {expert[c]};
    if (c > 0) deps.push_back(reduce[c - 1]);
    reduce.push_back(add(indexed("reduce", c), lanes::comm, "all_reduce", c, deps, bind_step(real, [w, c] { w->reduce(c); })));
  }
  add.tasks.output = reduce.back();
  return add.tasks;
}

PassTasks append_ppmoe_backward(TaskGraph& g, const std::vector<int>& after, const PpmoeRows& r,
                                const PpmoeBackwardSteps* steps, const Between& between) {
  check_rows(r);
  const bool real = steps != nullptr;
  auto w = real ? std::make_shared<const PpmoeBackwardSteps>(*steps) : nullptr;
  PassBuilder add{g, backward_works(r), {}};
  int dgate = add("dgate", lanes::compute, "pack", -1, after, bind_step(real, [w] { w->dgate(); }));
  int weights = add("pack_weights", lanes::compute, "pack_weights", -1, after, bind_step(real, [w] { w->pack_weights(); }));
  int reduce_dgate = add("reduce_dgate", lanes::comm, "all_reduce", -1, {dgate}, bind_step(real, [w] { w->reduce_dgate(); }));
  int gate = add("gate_bwd", lanes::compute, "gate_bwd", -1, {reduce_dgate}, bind_step(real, [w] { w->gate_backward(); }));
  if (between) between(g);
  std::vector<int> dgrad, sum;
  for (int c = 0; c < r.degree; ++c) {
    std::vector<int> deps = {weights};
    if (c > 0) deps.push_back(dgrad[c - 1]);
    dgrad.push_back(add(indexed("expert_dgrad", c), lanes::compute, "expert_dgrad", c, deps,
                        bind_step(real, [w, c] { w->expert_dgrad(c); })));
    sum.push_back(add(indexed("sum_dx", c), lanes::compute, "unpack_bwd", c, {gate, dgrad[c]},
                      bind_step(real, [w, c] { w->sum_dx(c); })));
  }
  std::vector<int> reduce;
  for (int c = 0; c < r.degree; ++c) {
    std::vector<int> deps = {sum[c]};
    if (c > 0) deps.push_back(reduce[c - 1]);
    reduce.push_back(add(indexed("reduce_dx", c), lanes::comm, "all_reduce", c, deps,
                         bind_step(real, [w, c] { w->reduce_dx(c); })));
  }
  int wgrad = add("expert_wgrad", lanes::compute, "expert_wgrad", -1, dgrad, bind_step(real, [w] { w->expert_wgrad(); }));
  add.tasks.output = reduce.back();
  add.tasks.grads = {gate, wgrad};
  return add.tasks;
}

void set_ppmoe_forward_work(TaskGraph& graph, const PassTasks& tasks, const PpmoeRows& rows) {
  set_work(graph, tasks, forward_works(rows));
}

void set_ppmoe_backward_work(TaskGraph& graph, const PassTasks& tasks, const PpmoeRows& rows) {
  set_work(graph, tasks, backward_works(rows));
}

}  // namespace pm
