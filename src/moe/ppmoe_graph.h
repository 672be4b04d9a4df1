// The PPMoE layer's schedules (Pipeline MoE, arXiv 2304.11414), defined once: the layer runs these
// tasks with its work bound to them, and the planner simulates the very same tasks.
//
// Every rank of a tensor-parallel group holds the same T tokens and runs the same gate; rank j owns
// experts j E/P .. (j+1) E/P - 1, selects their rows by index, computes them and writes its share
// of each token's output; one all-reduce over the group sums the shares. No all-to-all. With
// pipeline degree r the tokens are split into r ranges (chunk_begin) and the all-reduce of one
// range overlaps the experts of the next.
//
// Forward (insertion order = priority on each lane; every task after `after`):
//   compute: gate, pack_weights, expert[0..r)   (expert[c]: gather, FFN, this rank's share of y)
//   comm:    reduce[0..r)                       (reduce[c] after expert[c] and reduce[c-1]): the output
// Backward:
//   compute: dgate (this rank's choices), pack_weights
//   comm:    reduce_dgate                       (every rank then has every choice's d loss / d gate)
//   compute: gate_bwd (after reduce_dgate; expert_dgrad[0] runs while it waits), then per chunk
//            expert_dgrad[c], sum_dx[c] (this rank's share of dx: after gate_bwd and expert_dgrad[c])
//   comm:    reduce_dx[0..r)                    (after sum_dx[c] and reduce_dx[c-1]): the output
//   compute: expert_wgrad once over all rows (bit-identical for every r)
#pragma once

#include <cstdint>
#include <functional>
#include <vector>

#include "moe/ep_graph.h"
#include "moe/moe_shape.h"
#include "sched/task_graph.h"

namespace pm {

// How much each task of one PPMoE pass works on: this rank's expert rows and the tokens of each
// chunk. shape.tokens: the group's tokens (every rank holds them all).
struct PpmoeRows {
  MoeShape shape;
  int degree = 1;
  std::vector<int64_t> chunk_rows;    // [degree] rows this rank's experts compute
  std::vector<int64_t> chunk_tokens;  // [degree] tokens of the chunk (the all-reduced rows)
  int64_t rows() const;
};

// Every expert gets its fair share k T / E of rows, capped by the capacity.
PpmoeRows balanced_ppmoe_rows(const MoeShape& shape, int degree);
// The tokens of chunk c: [ppmoe_chunk_begin(T, r, c), ppmoe_chunk_begin(T, r, c + 1)).
int64_t ppmoe_chunk_begin(int64_t tokens, int degree, int chunk);

struct PpmoeForwardSteps {
  std::function<void()> gate, pack_weights;
  std::function<void(int chunk)> expert, reduce;
};
struct PpmoeBackwardSteps {
  std::function<void()> dgate, pack_weights, reduce_dgate, gate_backward, expert_wgrad;
  std::function<void(int chunk)> expert_dgrad, sum_dx, reduce_dx;
};

// `between` (may be empty) is called after the gate (backward: after dgate) and before the experts.
PassTasks append_ppmoe_forward(TaskGraph& graph, const std::vector<int>& after, const PpmoeRows& rows,
                               const PpmoeForwardSteps* steps, const Between& between = {});
PassTasks append_ppmoe_backward(TaskGraph& graph, const std::vector<int>& after, const PpmoeRows& rows,
                                const PpmoeBackwardSteps* steps, const Between& between = {});
void set_ppmoe_forward_work(TaskGraph& graph, const PassTasks& tasks, const PpmoeRows& rows);
void set_ppmoe_backward_work(TaskGraph& graph, const PassTasks& tasks, const PpmoeRows& rows);

}  // namespace pm
