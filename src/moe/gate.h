// The gate: softmax(x Wg) in float32, top-k experts per token (ties to the lower index), gate
// values = the chosen probabilities, divided by their sum when k > 1; capacity and slots (see
// routing.h); the GShard auxiliary load-balancing loss; and the backward of all of it.
#pragma once

#include <cstdint>
#include <vector>

#include "kernels/backend.h"
#include "moe/moe_shape.h"
#include "moe/routing.h"

namespace pm {

// What the gate decided for one pass.
struct Gating {
  Routing routing;             // chosen experts and their slots
  Buffer<float> probs;         // [T, E]
  std::vector<float> gate;     // [T, k] gate values
  std::vector<float> first_choice_fraction;  // [E] share of tokens whose first choice is e
  double aux_loss = 0;
};

// x[T, M], wg[M, E]; the capacity is the shape's for T tokens.
Gating gate_forward(Backend& backend, const float* x, const float* wg, int64_t T, const MoeShape& shape);

// From dgate[T, k] (d loss / d gate value; 0 for dropped choices) and aux_grad (d loss / d aux):
// dwg[M, E] += x^T dlogits and dx[T, M] = dlogits Wg^T (overwritten).
void gate_backward(Backend& backend, const float* x, const float* wg, const MoeShape& shape, const Gating& gating,
                   const float* dgate, float aux_grad, float* dwg, float* dx);

}  // namespace pm
