#include "moe/layer_graph.h"

#include <algorithm>
#include <numeric>
#include <string>

#include "core/error.h"
#include "moe/routing.h"

namespace pm {

int64_t LayerGraphSizes::received_rows() const {
  return std::accumulate(chunk_recv_rows.begin(), chunk_recv_rows.end(), int64_t{0});
}

LayerGraphSizes balanced_sizes(int64_t tokens, int64_t model_dim, int64_t hidden, int experts,
                               int top_k, double capacity_factor, int peers, int degree) {
  LayerGraphSizes s;
  s.tokens = tokens;
  s.model_dim = model_dim;
  s.hidden = hidden;
  s.experts = experts;
  s.top_k = top_k;
  s.peers = peers;
  s.degree = degree;
  int64_t capacity = expert_capacity(top_k, capacity_factor, tokens, experts);
  int64_t per_expert = std::min(capacity, (top_k * tokens + experts - 1) / experts);
  int local_experts = experts / peers;
  s.sent_rows = per_expert * experts;
  for (int c = 0; c < degree; ++c) {
    int64_t chunk = chunk_begin(per_expert, degree, c + 1) - chunk_begin(per_expert, degree, c);
    // every rank sends the same to every expert: (peers - 1) of the peers' blocks leave the rank
    s.chunk_send_rows.push_back(chunk * local_experts * (peers - 1));
    s.chunk_recv_rows.push_back(chunk * local_experts * peers);
  }
  return s;
}

double weight_pack_bytes(const LayerGraphSizes& s) {
  return 2.0 * 2.0 * (s.experts / s.peers) * s.model_dim * s.hidden * 4;
}

namespace {

// The bytes an all-to-all moves to other ranks: the wire cost of a chunk.
TaskWork a2a_work(int64_t rows, int64_t width) {
  return TaskWork{1, 0, static_cast<double>(rows) * width * 4};
}

// Expert FFN work on rows: two GEMMs of 2*rows*M*H flops, plus the rows it copies.
TaskWork ffn_work(int64_t rows, const LayerGraphSizes& s, double gemms_per_expert, double copies) {
  double calls = gemms_per_expert * (s.experts / s.peers);
  double flops = 2.0 * gemms_per_expert * rows * s.model_dim * s.hidden;
  double bytes = copies * rows * (s.model_dim + s.hidden) * 4.0;
  return TaskWork{calls, flops, bytes};
}

std::string indexed(const char* name, int chunk) { return std::string(name) + "[" + std::to_string(chunk) + "]"; }

template <typename Fn>
std::function<void()> bind(bool real, Fn fn) {
  return real ? std::function<void()>(fn) : std::function<void()>([] {});
}

}  // namespace

TaskGraph build_forward_graph(const LayerGraphSizes& s, ForwardWork* w) {
  PM_CHECK(s.degree >= 1 && static_cast<int>(s.chunk_recv_rows.size()) == s.degree, "sizes for degree {}", s.degree);
  const bool real = w != nullptr;
  const double T = static_cast<double>(s.tokens), M = static_cast<double>(s.model_dim);
  TaskGraph g;
  int gate = g.add({"gate", lanes::compute, "gate", -1,
                    TaskWork{3, 2 * T * M * s.experts, T * (M + 2.0 * s.experts) * 4}, {},
                    bind(real, [w] { w->gate(); })});
  int pack = g.add({"pack", lanes::compute, "pack", -1,
                    TaskWork{1, 0, 2.0 * s.sent_rows * M * 4}, {gate}, bind(real, [w] { w->pack(); })});
  int counts = g.add({"counts", lanes::comm, "counts", -1,
                      TaskWork{1, 0, 8.0 * s.experts}, {gate},
                      bind(real, [w] { w->exchange_counts(); })});
  int weights = g.add({"pack_weights", lanes::compute, "pack_weights", -1,
                       TaskWork{2.0 * (s.experts / s.peers), 0, weight_pack_bytes(s)}, {pack},
                       bind(real, [w] { w->pack_weights(); })});
  std::vector<int> dispatch, expert;
  for (int c = 0; c < s.degree; ++c)
    dispatch.push_back(g.add({indexed("dispatch", c), lanes::comm, "all_to_all", c,
                              a2a_work(s.chunk_send_rows[c], s.model_dim), {pack, counts},
                              bind(real, [w, c] { w->dispatch(c); })}));
  for (int c = 0; c < s.degree; ++c) {
    std::vector<int> deps = {dispatch[c], weights};
    if (c > 0) deps.push_back(expert[c - 1]);
    const double copies = 2;  // wire -> compute order in, compute -> wire order out
    expert.push_back(g.add({indexed("expert", c), lanes::compute, "expert_fwd", c,
                            ffn_work(s.chunk_recv_rows[c], s, 2, copies), deps,
                            bind(real, [w, c] { w->expert(c); })}));
  }
  std::vector<int> combine;
  for (int c = 0; c < s.degree; ++c)
    combine.push_back(g.add({indexed("combine", c), lanes::comm, "all_to_all", c,
                             a2a_work(s.chunk_send_rows[c], s.model_dim), {expert[c]},
                             bind(real, [w, c] { w->combine(c); })}));
  g.add({"unpack", lanes::compute, "unpack", -1, TaskWork{1, 2.0 * s.sent_rows * M, 2.0 * s.sent_rows * M * 4},
         combine, bind(real, [w] { w->unpack(); })});
  return g;
}

TaskGraph build_backward_graph(const LayerGraphSizes& s, BackwardWork* w) {
  PM_CHECK(s.degree >= 1 && static_cast<int>(s.chunk_recv_rows.size()) == s.degree, "sizes for degree {}", s.degree);
  const bool real = w != nullptr;
  const double T = static_cast<double>(s.tokens), M = static_cast<double>(s.model_dim);
  TaskGraph g;
  int pack = g.add({"pack_grad", lanes::compute, "pack", -1,
                    TaskWork{1, s.sent_rows * M, 2.0 * s.sent_rows * M * 4}, {},
                    bind(real, [w] { w->pack_grad(); })});
  int weights = g.add({"pack_weights", lanes::compute, "pack_weights", -1,
                       TaskWork{2.0 * (s.experts / s.peers), 0, weight_pack_bytes(s)}, {},
                       bind(real, [w] { w->pack_weights_backward(); })});
  int gate = g.add({"gate_bwd", lanes::compute, "gate_bwd", -1,
                    TaskWork{3, 2.0 * s.sent_rows * M + 4 * T * M * s.experts, T * (2 * M + 4.0 * s.experts) * 4},
                    {}, bind(real, [w] { w->gate_backward(); })});
  std::vector<int> dispatch, dgrad, combine;
  for (int c = 0; c < s.degree; ++c)
    dispatch.push_back(g.add({indexed("grad_dispatch", c), lanes::comm, "all_to_all", c,
                              a2a_work(s.chunk_send_rows[c], s.model_dim), {pack},
                              bind(real, [w, c] { w->grad_dispatch(c); })}));
  for (int c = 0; c < s.degree; ++c) {
    std::vector<int> deps = {dispatch[c], weights};
    if (c > 0) deps.push_back(dgrad[c - 1]);
    const double copies = 2;  // gradients in and out
    dgrad.push_back(g.add({indexed("expert_dgrad", c), lanes::compute, "expert_dgrad", c,
                           ffn_work(s.chunk_recv_rows[c], s, 2, copies), deps,
                           bind(real, [w, c] { w->expert_dgrad(c); })}));
  }
  for (int c = 0; c < s.degree; ++c)
    combine.push_back(g.add({indexed("grad_combine", c), lanes::comm, "all_to_all", c,
                             a2a_work(s.chunk_send_rows[c], s.model_dim), {dgrad[c]},
                             bind(real, [w, c] { w->grad_combine(c); })}));
  g.add({"expert_wgrad", lanes::compute, "expert_wgrad", -1,
         ffn_work(s.received_rows(), s, 2, 1), dgrad, bind(real, [w] { w->expert_wgrad(); })});
  std::vector<int> deps = combine;
  deps.push_back(gate);
  g.add({"unpack_grad", lanes::compute, "unpack_bwd", -1,
         TaskWork{1, s.sent_rows * M, 2.0 * s.sent_rows * M * 4}, deps,
         bind(real, [w] { w->unpack_grad(); })});
  return g;
}

}  // namespace pm
