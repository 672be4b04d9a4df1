#include "moe/ep_graph.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <string>

#include "core/error.h"
#include "moe/pass_builder.h"
#include "moe/routing.h"
#include "moe/unique_rows.h"

namespace pm {

int64_t PassRows::received_rows() const {
  return std::accumulate(chunk_recv_rows.begin(), chunk_recv_rows.end(), int64_t{0});
}

bool scale_grad_dispatch_on_experts(const MoeShape& s) {
  return s.dedup_dispatch && s.top_k > 1 && s.ranks > 1 &&
         scaled_dispatch_pays(s);
}

void PassRows::deduplicate_dispatch(double unique_share) {
  chunk_dispatch_rows.clear();
  chunk_grad_dispatch_rows.clear();
  if ((1.0 - unique_share) * kDedupFewestRepeats < 1.0) return;  // unique_rows.h sends such chunks whole
  for (int64_t rows : chunk_send_rows) chunk_dispatch_rows.push_back(std::llround(static_cast<double>(rows) * unique_share));
  if (scale_grad_dispatch_on_experts(shape)) chunk_grad_dispatch_rows = chunk_dispatch_rows;
}

PassRows balanced_rows(const MoeShape& shape, int degree) {
  PassRows s;
  s.shape = shape;
  s.degree = degree;
  const int64_t capacity = shape.capacity();
  const int64_t per_expert = std::min(capacity, (shape.top_k * shape.tokens + shape.experts - 1) / shape.experts);
  const int local_experts = shape.local_experts(), peers = shape.ranks;
  s.sent_rows = per_expert * shape.experts;
  for (int c = 0; c < degree; ++c) {
    int64_t chunk = chunk_begin(per_expert, degree, c + 1) - chunk_begin(per_expert, degree, c);
    // every rank sends the same to every expert: (peers - 1) of the peers' blocks leave the rank
    s.chunk_send_rows.push_back(chunk * local_experts * (peers - 1));
    s.chunk_recv_rows.push_back(chunk * local_experts * peers);
  }
  const int64_t to_others = per_expert * local_experts * (peers - 1);
  if (shape.dedup_dispatch && shape.top_k > 1 && to_others > 0) {
    const double unique = chance_token_reaches_rank(shape) *
                          static_cast<double>(shape.tokens) * (peers - 1);
    s.deduplicate_dispatch(std::min(1.0, unique / static_cast<double>(to_others)));
  }
  return s;
}

namespace {

// The bytes an all-to-all moves to other ranks: the wire cost of a chunk (bf16 rows: half).
TaskWork a2a_work(int64_t rows, const MoeShape& s) {
  return TaskWork{1, 0, static_cast<double>(rows) * s.model_dim * s.wire_bytes()};
}
// The backward's dispatch of chunk c: scaled rows in the wire's type, or deduplicated float32 rows.
TaskWork grad_dispatch_work(const PassRows& r, int c) {
  if (r.chunk_grad_dispatch_rows.empty()) return a2a_work(r.chunk_send_rows[c], r.shape);
  return TaskWork{1, 0, static_cast<double>(r.chunk_grad_dispatch_rows[c]) * r.shape.model_dim * sizeof(float)};
}

// The work of every task of a pass, in the order the builders add them.
std::vector<TaskWork> forward_works(const PassRows& r) {
  const MoeShape& s = r.shape;
  const double T = static_cast<double>(s.tokens), M = static_cast<double>(s.model_dim);
  std::vector<TaskWork> w = {
      {3, 2 * T * M * s.experts, T * (M + 2.0 * s.experts) * 4},  // gate
      {1, 0, 2.0 * r.sent_rows * M * 4},                           // pack
      {1, 0, 8.0 * s.experts},                                     // counts
      {2.0 * s.local_experts(), 0, weight_pack_bytes(s)},          // pack_weights
  };
  const std::vector<int64_t>& dispatch = r.chunk_dispatch_rows.empty() ? r.chunk_send_rows : r.chunk_dispatch_rows;
  for (int c = 0; c < r.degree; ++c) w.push_back(a2a_work(dispatch[c], s));  // dispatch
  // copies: wire -> compute order in, compute -> wire order out
  for (int c = 0; c < r.degree; ++c) w.push_back(ffn_work(r.chunk_recv_rows[c], s, 2, 2));  // expert
  for (int c = 0; c < r.degree; ++c) w.push_back(a2a_work(r.chunk_send_rows[c], s));  // combine
  w.push_back({1, 2.0 * r.sent_rows * M, 2.0 * r.sent_rows * M * 4});  // unpack
  return w;
}

std::vector<TaskWork> backward_works(const PassRows& r) {
  const MoeShape& s = r.shape;
  const double T = static_cast<double>(s.tokens), M = static_cast<double>(s.model_dim);
  std::vector<TaskWork> w = {
      {1, r.sent_rows * M, 2.0 * r.sent_rows * M * 4},                                       // pack_grad
      {2.0 * s.local_experts(), 0, weight_pack_bytes(s)},                                     // pack_weights
      {3, 2.0 * r.sent_rows * M + 4 * T * M * s.experts, T * (2 * M + 4.0 * s.experts) * 4},  // gate_bwd
  };
  for (int c = 0; c < r.degree; ++c) w.push_back(grad_dispatch_work(r, c));  // grad_dispatch
  for (int c = 0; c < r.degree; ++c) w.push_back(dgrad_work(r.chunk_recv_rows[c], s, 2));  // expert_dgrad: grads in and out
  for (int c = 0; c < r.degree; ++c) w.push_back(a2a_work(r.chunk_send_rows[c], s));  // grad_combine
  w.push_back(ffn_work(r.received_rows(), s, 2, 1));              // expert_wgrad
  w.push_back({1, r.sent_rows * M, 2.0 * r.sent_rows * M * 4});  // unpack_grad
  return w;
}

void check_rows(const PassRows& r) {
  PM_CHECK(r.degree >= 1 && static_cast<int>(r.chunk_recv_rows.size()) == r.degree &&
               static_cast<int>(r.chunk_send_rows.size()) == r.degree &&
               (r.chunk_dispatch_rows.empty() || static_cast<int>(r.chunk_dispatch_rows.size()) == r.degree) &&
               (r.chunk_grad_dispatch_rows.empty() || static_cast<int>(r.chunk_grad_dispatch_rows.size()) == r.degree),
           "rows for degree {}", r.degree);
}

}  // namespace

PassTasks append_ep_forward(TaskGraph& g, const std::vector<int>& after, const PassRows& r,
                            const ForwardSteps* steps, const Between& between) {
  check_rows(r);
  const bool real = steps != nullptr;
  // the tasks own the steps (and whatever the steps keep alive) for as long as the graph lives
  auto w = real ? std::make_shared<const ForwardSteps>(*steps) : nullptr;
  PassBuilder add{g, forward_works(r), {}};
  PassTasks& out = add.tasks;
  int gate = add("gate", lanes::compute, "gate", -1, after, bind_step(real, [w] { w->gate(); }));
  int pack = add("pack", lanes::compute, "pack", -1, {gate}, bind_step(real, [w] { w->pack(); }));
  int counts = add("counts", lanes::comm, "counts", -1, {gate}, bind_step(real, [w] { w->counts(); }));
  int weights = add("pack_weights", lanes::compute, "pack_weights", -1, plus({pack}, after),
                    bind_step(real, [w] { w->pack_weights(); }));
  std::vector<int> dispatch, expert, combine;
  for (int c = 0; c < r.degree; ++c)
    dispatch.push_back(add(indexed("dispatch", c), lanes::comm, "all_to_all", c, {pack, counts},
                           bind_step(real, [w, c] { w->dispatch(c); })));
  if (real && w->fetch)
    out.fetch = g.add({"fetch_experts", lanes::copy, "expert_fetch", -1, {1, 0, 0}, {counts}, [w] { w->fetch(); }});
  if (between) between(g);
  for (int c = 0; c < r.degree; ++c) {
    std::vector<int> deps = {dispatch[c], weights};
    if (c > 0) deps.push_back(expert[c - 1]);
    if (out.fetch >= 0) deps.push_back(out.fetch);
    expert.push_back(add(indexed("expert", c), lanes::compute, "expert_fwd", c, deps, bind_step(real, [w, c] { w->expert(c); })));
  }
  for (int c = 0; c < r.degree; ++c)
    combine.push_back(add(indexed("combine", c), lanes::comm, "all_to_all", c, {expert[c]},
                          bind_step(real, [w, c] { w->combine(c); })));
  out.output = add("unpack", lanes::compute, "unpack", -1, combine, bind_step(real, [w] { w->unpack(); }));
  return add.tasks;
}

PassTasks append_ep_backward(TaskGraph& g, const std::vector<int>& after, const PassRows& r,
                             const BackwardSteps* steps, const Between& between) {
  check_rows(r);
  const bool real = steps != nullptr;
  auto w = real ? std::make_shared<const BackwardSteps>(*steps) : nullptr;
  PassBuilder add{g, backward_works(r), {}};
  PassTasks& out = add.tasks;
  int pack = add("pack_grad", lanes::compute, "pack", -1, after, bind_step(real, [w] { w->pack_grad(); }));
  int weights = add("pack_weights", lanes::compute, "pack_weights", -1, after, bind_step(real, [w] { w->pack_weights(); }));
  int gate = add("gate_bwd", lanes::compute, "gate_bwd", -1, after, bind_step(real, [w] { w->gate_backward(); }));
  std::vector<int> dispatch, dgrad, combine;
  for (int c = 0; c < r.degree; ++c)
    dispatch.push_back(add(indexed("grad_dispatch", c), lanes::comm, "all_to_all", c, {pack},
                           bind_step(real, [w, c] { w->grad_dispatch(c); })));
  if (between) between(g);
  for (int c = 0; c < r.degree; ++c) {
    std::vector<int> deps = {dispatch[c], weights};
    if (c > 0) deps.push_back(dgrad[c - 1]);
    dgrad.push_back(add(indexed("expert_dgrad", c), lanes::compute, "expert_dgrad", c, deps,
                        bind_step(real, [w, c] { w->expert_dgrad(c); })));
  }
  for (int c = 0; c < r.degree; ++c)
    combine.push_back(add(indexed("grad_combine", c), lanes::comm, "all_to_all", c, {dgrad[c]},
                          bind_step(real, [w, c] { w->grad_combine(c); })));
  int wgrad = add("expert_wgrad", lanes::compute, "expert_wgrad", -1, dgrad, bind_step(real, [w] { w->expert_wgrad(); }));
  out.output = add("unpack_grad", lanes::compute, "unpack_bwd", -1, plus(combine, {gate}),
                   bind_step(real, [w] { w->unpack_grad(); }));
  out.grads = {gate, wgrad};
  return add.tasks;
}

void set_ep_forward_work(TaskGraph& graph, const PassTasks& tasks, const PassRows& rows) {
  set_work(graph, tasks, forward_works(rows));
}

void set_ep_backward_work(TaskGraph& graph, const PassTasks& tasks, const PassRows& rows) {
  set_work(graph, tasks, backward_works(rows));
}

}  // namespace pm
