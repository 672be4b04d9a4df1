// PPMoE (Pipeline MoE, arXiv 2304.11414): the experts of a layer split over the ranks of a
// tensor-parallel group that all hold the same tokens. Each rank runs the same gate, selects its
// experts' rows by index, computes them and writes its share of every token's output; one
// all-reduce over the group sums the shares (moe/ppmoe_graph.h). No all-to-all.
//
// Same semantics as the expert-parallel layer on one rank with these T tokens (top-k, capacity,
// drops, aux and z losses, router variants): the shape's T is the group's tokens, and its capacity
// ceil(k f T / E) is theirs. The layer's parameters are the expert-parallel layer's: the gate
// (replicated; its gradient is complete on every rank of the group) and this rank's experts.
//
// Bits: with k <= 2 every token's output and input gradient is bit for bit the one-rank
// expert-parallel layer's. A token's output is g1 o1 + g2 o2; its two terms come from at most two
// ranks and the all-reduce adds zeros to them, which is exact, in either order (the rank that owns
// the first kept choice adds the gate's share of dx first, as the one-rank layer does). With k > 2
// the all-reduce may add three or more shares in another order than the one-rank layer: equal to
// float32 rounding.
#pragma once

#include "moe/moe_layer.h"

namespace pm {

class PpmoeStrategy final : public MoeStrategy {
 public:
  std::string name() const override { return "ppmoe"; }
  PassTasks plan_forward(TaskGraph& graph, const std::vector<int>& after, const MoeShape& shape, int degree,
                         const Between& between = {}) const override;
  PassTasks plan_backward(TaskGraph& graph, const std::vector<int>& after, const MoeShape& shape, int degree,
                          const Between& between = {}) const override;
  std::unique_ptr<MoeLayer> make_layer(const MoeShape& shape, Communicator& group, Backend& backend) const override;
};

}  // namespace pm
