// The gate: softmax(x Wg) in float32, top-k experts per token (ties to the lower index), gate
// values = the chosen probabilities, divided by their sum when k > 1; the GShard auxiliary
// load-balancing loss; and the backward of all of it.
#pragma once

#include <cstdint>
#include <vector>

#include "core/aligned.h"
#include "moe/routing.h"

namespace pm {

struct GateState {
  FloatBuffer probs;        // [T, E]
  std::vector<float> gate;  // [T, k] gate values
  std::vector<float> first_choice_fraction;  // [E] share of tokens whose first choice is e
  double aux_loss = 0;
};

// logits = x Wg, probs = softmax, routing.expert/gate = top-k; routing.capacity must be set.
// x[T, M], wg[M, E].
void gate_forward(const float* x, const float* wg, int64_t T, int64_t M, int E, int top_k,
                  GateState& state, Routing& routing);

// From dgate[T, k] (d loss / d gate value; 0 for dropped choices) and aux_grad (d loss / d aux):
// dwg[M, E] += x^T dlogits and dx[T, M] = dlogits Wg^T (overwritten).
void gate_backward(const float* x, const float* wg, int64_t T, int64_t M, int E, int top_k,
                   const GateState& state, const Routing& routing, const float* dgate,
                   float aux_grad, float* dwg, float* dx);

}  // namespace pm
