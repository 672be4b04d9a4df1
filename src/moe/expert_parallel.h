// Expert parallelism: E experts over the P ranks of a group (E/P each), tokens dispatched to the
// ranks of their experts by all-to-all and combined back, forward and backward pipelined in
// chunks on two lanes (PipeMoE).
//
// Per rank, T tokens x[T, M]: gate (gate.h), capacity and slots (routing.h), expert e on rank
// e / (E/P) as local expert e mod (E/P), y_t = sum over kept choices of gate * FFN_e(x_t).
// Results do not depend on the pipeline degree: every row is computed by the same kernels, and
// weight gradients are computed once over all rows in a canonical order.
#pragma once

#include "moe/moe_layer.h"

namespace pm {

class ExpertParallelStrategy final : public MoeStrategy {
 public:
  std::string name() const override { return "ep"; }
  PassTasks plan_forward(TaskGraph& graph, const std::vector<int>& after, const MoeShape& shape, int degree,
                         const Between& between = {}) const override;
  PassTasks plan_backward(TaskGraph& graph, const std::vector<int>& after, const MoeShape& shape, int degree,
                          const Between& between = {}) const override;
  std::unique_ptr<MoeLayer> make_layer(const MoeShape& shape, Communicator& group, Backend& backend) const override;
};

}  // namespace pm
