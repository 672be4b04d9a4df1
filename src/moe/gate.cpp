#include "moe/gate.h"

#include "kernels/cpu/gemm.h"
#include "kernels/cpu/elementwise.h"

namespace pm {

void gate_forward(const float* x, const float* wg, int64_t T, int64_t M, int E, int top_k,
                  GateState& state, Routing& routing) {
  state.probs.resize(T * E);
  gemm(Trans::no, Trans::no, T, E, M, x, M, wg, E, 0.0f, state.probs.data(), E);
  softmax_rows(state.probs.data(), state.probs.data(), T, E);

  routing.tokens = T;
  routing.experts = E;
  routing.top_k = top_k;
  routing.expert.resize(T * top_k);
  state.gate.resize(T * top_k);
  topk_rows(state.probs.data(), T, E, top_k, routing.expert.data(), state.gate.data());
  if (top_k > 1) {
    for (int64_t t = 0; t < T; ++t) {
      float sum = 0;
      for (int j = 0; j < top_k; ++j) sum += state.gate[t * top_k + j];
      for (int j = 0; j < top_k; ++j) state.gate[t * top_k + j] /= sum;
    }
  }
  assign_slots(routing);

  // GShard aux loss: E * sum_e mean_t(probs[t, e]) * (share of tokens whose first choice is e).
  state.first_choice_fraction.assign(E, 0.0f);
  for (int64_t t = 0; t < T; ++t) state.first_choice_fraction[routing.expert[t * top_k]] += 1.0f;
  for (float& f : state.first_choice_fraction) f /= static_cast<float>(T);
  std::vector<double> mean_prob(E, 0.0);
  for (int64_t t = 0; t < T; ++t)
    for (int e = 0; e < E; ++e) mean_prob[e] += state.probs[t * E + e];
  double aux = 0;
  for (int e = 0; e < E; ++e) aux += mean_prob[e] / T * state.first_choice_fraction[e];
  state.aux_loss = aux * E;
}

void gate_backward(const float* x, const float* wg, int64_t T, int64_t M, int E, int top_k,
                   const GateState& state, const Routing& routing, const float* dgate,
                   float aux_grad, float* dwg, float* dx) {
  FloatBuffer dprobs(T * E, 0.0f);
  // The aux loss sees the first-choice fractions as constants: d aux / d probs[t, e] = E f_e / T.
  for (int e = 0; e < E; ++e) {
    float d = aux_grad * static_cast<float>(E) * state.first_choice_fraction[e] / static_cast<float>(T);
    for (int64_t t = 0; t < T; ++t) dprobs[t * E + e] = d;
  }
  for (int64_t t = 0; t < T; ++t) {
    const float* g = &state.gate[t * top_k];
    const float* dg = &dgate[t * top_k];
    const int32_t* chosen = &routing.expert[t * top_k];
    if (top_k == 1) {
      dprobs[t * E + chosen[0]] += dg[0];
      continue;
    }
    // g_j = p_j / s with s the sum of the chosen p: dp_i = (dg_i - sum_j dg_j g_j) / s.
    float s = 0, inner = 0;
    for (int j = 0; j < top_k; ++j) s += state.probs[t * E + chosen[j]];
    for (int j = 0; j < top_k; ++j) inner += dg[j] * g[j];
    for (int j = 0; j < top_k; ++j) dprobs[t * E + chosen[j]] += (dg[j] - inner) / s;
  }
  FloatBuffer dlogits(T * E);
  softmax_rows_backward(state.probs.data(), dprobs.data(), dlogits.data(), T, E);
  gemm(Trans::yes, Trans::no, M, E, T, x, M, dlogits.data(), E, 1.0f, dwg, E);
  gemm(Trans::no, Trans::yes, T, M, E, dlogits.data(), E, wg, E, 0.0f, dx, M);
}

}  // namespace pm
