// The gate: softmax(x Wg) in float32 (or, with RouterScore::sigmoid, each logit's sigmoid), top-k
// experts per token (ties to the lower index), gate values = the chosen scores, divided by their
// sum when k > 1 and the shape normalises, times the shape's routed_scale (DeepSeek-V3's
// routed_scaling_factor; 1 by default);
// capacity and slots (see routing.h); the GShard auxiliary load-balancing loss, the router z-loss
// (ST-MoE) and, optionally, a per-expert selection bias (DeepSeek-V3's auxiliary-loss-free
// balancing), within the token's best groups of experts under group-limited routing
// (DeepSeek-V3; moe_shape.h route_groups); and the backward of all of it. The choice is not
// differentiated: gradients reach the chosen scores, as with plain top-k.
//
// Precision: logits, probabilities and gate values are float32 (a sigmoid is computed in double
// and rounded); the z-loss's log-sum-exp and the aux loss's means are summed in double.
//
// With sigmoid scores the aux loss reads each token's scores normalised over all experts
// (DeepSeek-V3's s'), and the z-loss stays the log-sum-exp of the logits.
#pragma once

#include <cstdint>
#include <vector>

#include "kernels/backend.h"
#include "moe/moe_shape.h"
#include "moe/routing.h"

namespace pm {

// d loss / d (the layer's router losses) for the backward: the aux loss's and the z-loss's
// weights times the caller's loss scale. A bare number is the aux loss's (no z-loss).
struct RouterLossGrads {
  float aux = 0;
  float z = 0;
  RouterLossGrads(float aux_grad = 0, float z_grad = 0) : aux(aux_grad), z(z_grad) {}  // NOLINT: implicit on purpose
};

// What the gate decided for one pass.
struct Gating {
  Routing routing;             // chosen experts and their slots
  // (buffers the gate writes whole: left uninitialised when made)
  ScratchBuffer<float> probs;  // [T, E] the scores: softmax probabilities, or sigmoids
  ScratchBuffer<float> logits;  // [T, E] the router's logits, kept with the router's losses (the z-loss reads them)
  std::vector<float> score_sum;  // [T] sigmoid scores only: each token's sum over the experts
  std::vector<float> gate;     // [T, k] gate values
  // [runs, E] the balance loss's load: per run of tokens (one run of all T, or each sequence of
  // shape.aux_seq_len), the share of its tokens whose first choice is e (GShard), or of its k
  // choices per token that chose e (sequence-wise)
  std::vector<float> load_fraction;
  // E / runs * sum_runs sum_e mean_t(p[t, e]) * load_fraction[run, e], p the probabilities
  // (sigmoid: the scores over their sum): GShard's loss, or DeepSeek-V3's sequence-wise one
  double aux_loss = 0;

  // ST-MoE's z-loss, mean_t lse[t]^2, lse[t] the log-sum-exp of token t's logits (NaN without the
  // router's losses). Both are made from the logits on first use and kept: a double exp per token
  // and expert, 0.6-1 ms of a 2048-token pass at 64 experts, that a run which neither weights the
  // z-loss nor shows it never pays. The first use is the backward's (gate_backward_logits, with a
  // z-loss weight) or a caller's after the pass: one thread at a time.
  double z_loss() const;
  const std::vector<float>& lse() const;

 private:
  void make_lse() const;
  mutable std::vector<float> lse_;
  mutable double z_loss_ = 0;
  mutable bool lse_made_ = false;
};

// Whether a pass needs the router's losses: training does; inference reads only the routing and
// the gate values, and skips the aux loss's means and the copy of the logits that the z-loss
// reads (Gating::z_loss).
enum class RouterLosses { compute, skip };

// x[T, M], wg[M, E]; the capacity is the shape's for T tokens. bias[E] (only with
// shape.balance_bias; else null): added to the probabilities to choose, not to the gate values.
// RouterLosses::skip: the same routing, gate values and scores; aux_loss and z_loss() NaN,
// logits and load_fraction empty (a backward of such a pass is refused).
Gating gate_forward(Backend& backend, const float* x, const float* wg, int64_t T, const MoeShape& shape,
                    const float* bias = nullptr, RouterLosses losses = RouterLosses::compute);

// From dgate[T, k] (d loss / d gate value; 0 for dropped choices) and the router losses'
// gradients: dwg[M, E] += x^T dlogits and dx[T, M] = dlogits Wg^T (overwritten). The selection
// bias gets no gradient.
void gate_backward(Backend& backend, const float* x, const float* wg, const MoeShape& shape, const Gating& gating,
                   const float* dgate, RouterLossGrads loss_grads, float* dwg, float* dx);
// The same up to the logits: dwg += x^T dlogits, and dlogits [T, E] returned for the caller to
// add dx = dlogits Wg^T where it sums the rest of dx (the expert-parallel layer, token block by
// token block with the experts' share: no [T, M] product in memory between the two).
ScratchBuffer<float> gate_backward_logits(Backend& backend, const float* x, const MoeShape& shape,
                                          const Gating& gating, const float* dgate, RouterLossGrads loss_grads,
                                          float* dwg);

// Every choice of this pass counted by expert (dropped ones too: the load the router asked for),
// added to load[E].
void add_expert_load(const Routing& routing, double* load);
// DeepSeek-V3's update: bias[e] += rate * sign(mean load - load[e]) from the load of the whole
// group (summed over its ranks): an overloaded expert is chosen less, an idle one more.
void update_balance_bias(float* bias, const double* load, int experts, double rate);

}  // namespace pm
