#include "moe/ep_graph.h"

#include <algorithm>
#include <numeric>
#include <string>

#include "core/error.h"
#include "moe/routing.h"

namespace pm {

int64_t PassRows::received_rows() const {
  return std::accumulate(chunk_recv_rows.begin(), chunk_recv_rows.end(), int64_t{0});
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
  return s;
}

namespace {

// The bytes a weight-packing pass moves: local experts' W1 and W2, read and written.
double weight_pack_bytes(const MoeShape& s) {
  return 2.0 * s.local_experts() * s.model_dim * static_cast<double>(s.fc1_width() + s.hidden) * 4;
}

// The bytes an all-to-all moves to other ranks: the wire cost of a chunk.
TaskWork a2a_work(int64_t rows, int64_t width) { return TaskWork{1, 0, static_cast<double>(rows) * width * 4}; }

// Expert FFN work on rows: a pair of GEMMs (the forward's two, or the backward's input or weight
// gradients) is the forward's flops per row, plus the rows it copies.
TaskWork ffn_work(int64_t rows, const MoeShape& s, double gemms_per_expert, double copies) {
  double calls = gemms_per_expert * s.local_experts();
  double flops = gemms_per_expert / 2 * static_cast<double>(rows) * s.expert_flops_per_row();
  double bytes = copies * rows * (s.model_dim + s.hidden) * 4.0;
  return TaskWork{calls, flops, bytes};
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
  for (int c = 0; c < r.degree; ++c) w.push_back(a2a_work(r.chunk_send_rows[c], s.model_dim));  // dispatch
  // copies: wire -> compute order in, compute -> wire order out
  for (int c = 0; c < r.degree; ++c) w.push_back(ffn_work(r.chunk_recv_rows[c], s, 2, 2));  // expert
  for (int c = 0; c < r.degree; ++c) w.push_back(a2a_work(r.chunk_send_rows[c], s.model_dim));  // combine
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
  for (int c = 0; c < r.degree; ++c) w.push_back(a2a_work(r.chunk_send_rows[c], s.model_dim));  // grad_dispatch
  for (int c = 0; c < r.degree; ++c) w.push_back(ffn_work(r.chunk_recv_rows[c], s, 2, 2));  // expert_dgrad: grads in and out
  for (int c = 0; c < r.degree; ++c) w.push_back(a2a_work(r.chunk_send_rows[c], s.model_dim));  // grad_combine
  w.push_back(ffn_work(r.received_rows(), s, 2, 1));              // expert_wgrad
  w.push_back({1, r.sent_rows * M, 2.0 * r.sent_rows * M * 4});  // unpack_grad
  return w;
}

std::string indexed(const char* name, int chunk) { return std::string(name) + "[" + std::to_string(chunk) + "]"; }

// Binds a step, or nothing when planning.
template <typename Fn>
std::function<void()> bind(bool real, Fn fn) {
  return real ? std::function<void()>(fn) : std::function<void()>([] {});
}

std::vector<int> plus(std::vector<int> a, const std::vector<int>& b) {
  a.insert(a.end(), b.begin(), b.end());
  return a;
}

void check_rows(const PassRows& r) {
  PM_CHECK(r.degree >= 1 && static_cast<int>(r.chunk_recv_rows.size()) == r.degree &&
               static_cast<int>(r.chunk_send_rows.size()) == r.degree,
           "rows for degree {}", r.degree);
}

void set_work(TaskGraph& graph, const PassTasks& tasks, const std::vector<TaskWork>& works) {
  PM_CHECK(works.size() == tasks.ids.size(), "{} task works for a pass of {} tasks", works.size(), tasks.ids.size());
  for (std::size_t i = 0; i < works.size(); ++i) graph.tasks()[tasks.ids[i]].work = works[i];
}

// Adds a pass's tasks to a graph, each with the next of the pass's works, and keeps their ids.
struct PassBuilder {
  TaskGraph& graph;
  std::vector<TaskWork> work;  // in the order the tasks are added
  PassTasks tasks;
  int operator()(std::string name, Lane lane, const char* cost, int chunk, std::vector<int> deps,
                 std::function<void()> run) {
    const std::size_t next = tasks.ids.size();
    PM_CHECK(next < work.size(), "more tasks than works for the pass");
    int id = graph.add({std::move(name), lane, cost, chunk, work[next], std::move(deps), std::move(run)});
    tasks.ids.push_back(id);
    return id;
  }
};

}  // namespace

PassTasks append_ep_forward(TaskGraph& g, const std::vector<int>& after, const PassRows& r,
                            const ForwardSteps* steps, const Between& between) {
  check_rows(r);
  const bool real = steps != nullptr;
  // the tasks own the steps (and whatever the steps keep alive) for as long as the graph lives
  auto w = real ? std::make_shared<const ForwardSteps>(*steps) : nullptr;
  PassBuilder add{g, forward_works(r)};
  PassTasks& out = add.tasks;
  int gate = add("gate", lanes::compute, "gate", -1, after, bind(real, [w] { w->gate(); }));
  int pack = add("pack", lanes::compute, "pack", -1, {gate}, bind(real, [w] { w->pack(); }));
  int counts = add("counts", lanes::comm, "counts", -1, {gate}, bind(real, [w] { w->counts(); }));
  int weights = add("pack_weights", lanes::compute, "pack_weights", -1, plus({pack}, after),
                    bind(real, [w] { w->pack_weights(); }));
  std::vector<int> dispatch, expert, combine;
  for (int c = 0; c < r.degree; ++c)
    dispatch.push_back(add(indexed("dispatch", c), lanes::comm, "all_to_all", c, {pack, counts},
                           bind(real, [w, c] { w->dispatch(c); })));
  if (real && w->fetch)
    out.fetch = g.add({"fetch_experts", lanes::copy, "expert_fetch", -1, {1, 0, 0}, {counts}, [w] { w->fetch(); }});
  if (between) between(g);
  for (int c = 0; c < r.degree; ++c) {
    std::vector<int> deps = {dispatch[c], weights};
    if (c > 0) deps.push_back(expert[c - 1]);
    if (out.fetch >= 0) deps.push_back(out.fetch);
    expert.push_back(add(indexed("expert", c), lanes::compute, "expert_fwd", c, deps, bind(real, [w, c] { w->expert(c); })));
  }
  for (int c = 0; c < r.degree; ++c)
    combine.push_back(add(indexed("combine", c), lanes::comm, "all_to_all", c, {expert[c]},
                          bind(real, [w, c] { w->combine(c); })));
  out.output = add("unpack", lanes::compute, "unpack", -1, combine, bind(real, [w] { w->unpack(); }));
  return add.tasks;
}

PassTasks append_ep_backward(TaskGraph& g, const std::vector<int>& after, const PassRows& r,
                             const BackwardSteps* steps, const Between& between) {
  check_rows(r);
  const bool real = steps != nullptr;
  auto w = real ? std::make_shared<const BackwardSteps>(*steps) : nullptr;
  PassBuilder add{g, backward_works(r)};
  PassTasks& out = add.tasks;
  int pack = add("pack_grad", lanes::compute, "pack", -1, after, bind(real, [w] { w->pack_grad(); }));
  int weights = add("pack_weights", lanes::compute, "pack_weights", -1, after, bind(real, [w] { w->pack_weights(); }));
  int gate = add("gate_bwd", lanes::compute, "gate_bwd", -1, after, bind(real, [w] { w->gate_backward(); }));
  std::vector<int> dispatch, dgrad, combine;
  for (int c = 0; c < r.degree; ++c)
    dispatch.push_back(add(indexed("grad_dispatch", c), lanes::comm, "all_to_all", c, {pack},
                           bind(real, [w, c] { w->grad_dispatch(c); })));
  if (between) between(g);
  for (int c = 0; c < r.degree; ++c) {
    std::vector<int> deps = {dispatch[c], weights};
    if (c > 0) deps.push_back(dgrad[c - 1]);
    dgrad.push_back(add(indexed("expert_dgrad", c), lanes::compute, "expert_dgrad", c, deps,
                        bind(real, [w, c] { w->expert_dgrad(c); })));
  }
  for (int c = 0; c < r.degree; ++c)
    combine.push_back(add(indexed("grad_combine", c), lanes::comm, "all_to_all", c, {dgrad[c]},
                          bind(real, [w, c] { w->grad_combine(c); })));
  int wgrad = add("expert_wgrad", lanes::compute, "expert_wgrad", -1, dgrad, bind(real, [w] { w->expert_wgrad(); }));
  out.output = add("unpack_grad", lanes::compute, "unpack_bwd", -1, plus(combine, {gate}),
                   bind(real, [w] { w->unpack_grad(); }));
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
