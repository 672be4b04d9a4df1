#include "moe/gate.h"

namespace pm {

Gating gate_forward(Backend& backend, const float* x, const float* wg, int64_t T, const MoeShape& shape) {
  const int64_t M = shape.model_dim;
  const int E = shape.experts, top_k = shape.top_k;
  Gating g;
  g.probs.resize(T * E);
  backend.gemm(Trans::no, Trans::no, T, E, M, x, M, wg, E, 0.0f, g.probs.data(), E);
  backend.softmax_rows(g.probs.data(), g.probs.data(), T, E);

  Routing& routing = g.routing;
  routing.tokens = T;
  routing.experts = E;
  routing.top_k = top_k;
  routing.capacity = shape.with_tokens(T).capacity();
  routing.expert.resize(T * top_k);
  g.gate.resize(T * top_k);
  backend.topk_rows(g.probs.data(), T, E, top_k, routing.expert.data(), g.gate.data());
  if (top_k > 1) {
    for (int64_t t = 0; t < T; ++t) {
      float sum = 0;
      for (int j = 0; j < top_k; ++j) sum += g.gate[t * top_k + j];
      for (int j = 0; j < top_k; ++j) g.gate[t * top_k + j] /= sum;
    }
  }
  assign_slots(routing);

  // GShard aux loss: E * sum_e mean_t(probs[t, e]) * (share of tokens whose first choice is e).
  g.first_choice_fraction.assign(E, 0.0f);
  for (int64_t t = 0; t < T; ++t) g.first_choice_fraction[routing.expert[t * top_k]] += 1.0f;
  for (float& f : g.first_choice_fraction) f /= static_cast<float>(T);
  std::vector<double> mean_prob(E, 0.0);
  for (int64_t t = 0; t < T; ++t)
    for (int e = 0; e < E; ++e) mean_prob[e] += g.probs[t * E + e];
  double aux = 0;
  for (int e = 0; e < E; ++e) aux += mean_prob[e] / T * g.first_choice_fraction[e];
  g.aux_loss = aux * E;
  return g;
}

void gate_backward(Backend& backend, const float* x, const float* wg, const MoeShape& shape, const Gating& g,
                   const float* dgate, float aux_grad, float* dwg, float* dx) {
  const int64_t T = g.routing.tokens, M = shape.model_dim;
  const int E = shape.experts, top_k = shape.top_k;
  Buffer<float> dprobs(T * E, 0.0f);
  // The aux loss sees the first-choice fractions as constants: d aux / d probs[t, e] = E f_e / T.
  for (int e = 0; e < E; ++e) {
    float d = aux_grad * static_cast<float>(E) * g.first_choice_fraction[e] / static_cast<float>(T);
    for (int64_t t = 0; t < T; ++t) dprobs[t * E + e] = d;
  }
  for (int64_t t = 0; t < T; ++t) {
    const float* gv = &g.gate[t * top_k];
    const float* dg = &dgate[t * top_k];
    const int32_t* chosen = &g.routing.expert[t * top_k];
    if (top_k == 1) {
      dprobs[t * E + chosen[0]] += dg[0];
      continue;
    }
    // g_j = p_j / s with s the sum of the chosen p: dp_i = (dg_i - sum_j dg_j g_j) / s.
    float s = 0, inner = 0;
    for (int j = 0; j < top_k; ++j) s += g.probs[t * E + chosen[j]];
    for (int j = 0; j < top_k; ++j) inner += dg[j] * gv[j];
    for (int j = 0; j < top_k; ++j) dprobs[t * E + chosen[j]] += (dg[j] - inner) / s;
  }
  Buffer<float> dlogits(T * E);
  backend.softmax_rows_backward(g.probs.data(), dprobs.data(), dlogits.data(), T, E);
  backend.gemm(Trans::yes, Trans::no, M, E, T, x, M, dlogits.data(), E, 1.0f, dwg, E);
  backend.gemm(Trans::no, Trans::yes, T, M, E, dlogits.data(), E, wg, E, 0.0f, dx, M);
}

}  // namespace pm
