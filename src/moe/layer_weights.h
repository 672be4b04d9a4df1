// An MoE layer's weights and gradients, whatever strategy moves its tokens: the gate (replicated
// over the group) and this rank's experts, drawn from (seed, global expert id) streams so that the
// same seed gives the same global experts on any number of ranks and in any strategy.
#pragma once

#include <memory>
#include <vector>

#include "core/parameter.h"
#include "core/tensor.h"
#include "kernels/backend.h"
#include "moe/moe_shape.h"

namespace pm {

// This rank's experts packed for the GEMMs. Packed again only when the weights changed since
// (Tensor::version): once per optimizer step, not once per pass, and once for good in inference.
struct PackedExperts {
  std::vector<std::unique_ptr<PackedExpert>> experts;  // [El]
  VersionStamp forward, backward;  // the weights each direction's packing was made from
  int64_t packings = 0;            // of every expert, for one direction: what the passes cost

  PackedExpert& operator[](int le) const { return *experts[le]; }
  void clear() {
    experts.clear();
    forward.clear();
    backward.clear();
  }
};

struct LayerWeights {
  Tensor wg, w1, b1, w2, b2;  // [M, E], [El, M, H1], [El, H1], [El, H, M], [El, M]
  Tensor dwg, dw1, db1, dw2, db2;
  Tensor router_bias, drouter_bias;  // [E] with shape.balance_bias (no gradient moves it)
  bool has_router_bias = false;

  LayerWeights() = default;
  explicit LayerWeights(const MoeShape& shape);

  // "wg", "router_bias" (with balance_bias), then, unless the experts are offloaded, this rank's
  // experts "w1", "b1", "w2", "b2".
  std::vector<Parameter> parameters(bool with_experts);
  // The gate and this rank's experts first_expert .. first_expert + El - 1.
  void init(uint64_t seed, const MoeShape& shape, int first_expert, bool with_experts);
  // The experts are elsewhere now (an offload store): drop them and their gradients.
  void drop_experts();

  // Packs every local expert for the forward / the backward's input gradients, unless `packed`
  // already holds that packing of the current weights.
  void pack_forward(Backend& backend, const MoeShape& shape, PackedExperts& packed) const;
  void pack_backward(Backend& backend, const MoeShape& shape, PackedExperts& packed) const;
  // Inference, once the experts are packed for good: their fp32 W1 and W2 freed (the biases stay:
  // the packing reads them in place), and their gradients with them. Each expert then takes the
  // memory of its packed form alone: half with fp32 GEMMs, a third with bf16 pair words.
  void release_expert_masters();
  // Where local expert le's gradients go.
  ExpertGrads grads_of(const MoeShape& shape, int le);
};

}  // namespace pm
