#include "moe/gate.h"

#include <algorithm>
#include <cmath>

#include "core/error.h"
#include "core/transpose.h"

namespace pm {
namespace {

// lse[t] = log sum_e exp(logits[t, e]), in double from the largest logit; returns mean_t lse^2.
double log_sum_exp_rows(const float* logits, int64_t T, int E, std::vector<float>& lse) {
  lse.resize(T);
  double z = 0;
  for (int64_t t = 0; t < T; ++t) {
    const float* row = logits + t * E;
    const double top = *std::max_element(row, row + E);
    double sum = 0;
    for (int e = 0; e < E; ++e) sum += std::exp(static_cast<double>(row[e]) - top);
    const double l = top + std::log(sum);
    lse[t] = static_cast<float>(l);
    z += l * l;
  }
  return z / static_cast<double>(T);
}

// Group-limited routing (moe_shape.h route_groups): every selection score outside a token's
// route_top_groups best groups set to -inf, so that top-k chooses within those groups only. A
// group's score is the sum of its two best selection scores (DeepSeek-V3), or its one score.
void keep_best_groups(Backend& backend, float* scores, int64_t T, const MoeShape& shape) {
  const int G = shape.route_groups, keep = shape.route_top_groups, per = shape.experts / G;
  Buffer<float> group_score(T * G);
  for (int64_t t = 0; t < T; ++t)
    for (int g = 0; g < G; ++g) {
      const float* s = scores + t * shape.experts + g * per;
      float best = -INFINITY, second = -INFINITY;
      for (int e = 0; e < per; ++e) {
        if (s[e] > best) {
          second = best;
          best = s[e];
        } else if (s[e] > second) {
          second = s[e];
        }
      }
      group_score[t * G + g] = per == 1 ? best : best + second;
    }
  std::vector<int32_t> best_groups(T * keep);
  std::vector<float> unused(T * keep);
  backend.topk_rows(group_score.data(), T, G, keep, best_groups.data(), unused.data());
  std::vector<char> kept(G);
  for (int64_t t = 0; t < T; ++t) {
    std::fill(kept.begin(), kept.end(), 0);
    for (int j = 0; j < keep; ++j) kept[best_groups[t * keep + j]] = 1;
    for (int g = 0; g < G; ++g)
      if (!kept[g]) std::fill_n(scores + t * shape.experts + g * per, per, -INFINITY);
  }
}

}  // namespace

Gating gate_forward(Backend& backend, const float* x, const float* wg, int64_t T, const MoeShape& shape,
                    const float* bias, RouterLosses losses) {
  const int64_t M = shape.model_dim;
  const int E = shape.experts, top_k = shape.top_k;
  PM_CHECK((bias != nullptr) == shape.balance_bias, "a selection bias {} a layer that {} one",
           bias ? "given to" : "missing for", shape.balance_bias ? "has" : "has no");
  Gating g;
  g.probs.resize(T * E);
  backend.gemm(Trans::no, Trans::no, T, E, M, x, M, wg, E, 0.0f, g.probs.data(), E);
  const bool with_losses = losses == RouterLosses::compute;
  if (with_losses) {  // the z-loss reads them (Gating::z_loss)
    g.logits.resize(T * E);
    std::copy(g.probs.data(), g.probs.data() + T * E, g.logits.data());
  }
  const bool sigmoid = shape.router_score == RouterScore::sigmoid;
  if (sigmoid) {
    g.score_sum.assign(T, 0.0f);
    for (int64_t t = 0; t < T; ++t) {
      double sum = 0;
      for (int e = 0; e < E; ++e) {
        float& v = g.probs[t * E + e];
        v = static_cast<float>(1.0 / (1.0 + std::exp(-static_cast<double>(v))));
        sum += v;
      }
      g.score_sum[t] = static_cast<float>(sum);
    }
  } else {
    backend.softmax_rows(g.probs.data(), g.probs.data(), T, E);
  }

  Routing& routing = g.routing;
  routing.tokens = T;
  routing.experts = E;
  routing.top_k = top_k;
  routing.capacity = shape.with_tokens(T).capacity();
  routing.expert.resize(T * top_k);
  g.gate.resize(T * top_k);
  if (bias || shape.group_limited()) {
    // choose by probability + bias, within the best groups; the gate values are the probabilities
    Buffer<float> scores(T * E);
    for (int64_t t = 0; t < T; ++t)
      for (int e = 0; e < E; ++e) scores[t * E + e] = g.probs[t * E + e] + (bias ? bias[e] : 0.0f);
    if (shape.group_limited()) keep_best_groups(backend, scores.data(), T, shape);
    backend.topk_rows(scores.data(), T, E, top_k, routing.expert.data(), g.gate.data());
    for (int64_t i = 0; i < T * top_k; ++i) g.gate[i] = g.probs[(i / top_k) * E + routing.expert[i]];
  } else {
    backend.topk_rows(g.probs.data(), T, E, top_k, routing.expert.data(), g.gate.data());
  }
  if (top_k > 1 && shape.normalize_gates) {
    for (int64_t t = 0; t < T; ++t) {
      float sum = 0;
      for (int j = 0; j < top_k; ++j) sum += g.gate[t * top_k + j];
      for (int j = 0; j < top_k; ++j) g.gate[t * top_k + j] /= sum;
    }
  }
  if (shape.routed_scale != 1.0)
    for (float& v : g.gate) v *= static_cast<float>(shape.routed_scale);
  assign_slots(routing, shape.drop_policy, g.gate.data());
  if (!with_losses) {
    g.aux_loss = std::nan("");
    return g;
  }

  // The balance loss over runs of `run` tokens: E / runs * sum_runs sum_e mean_t(p[t, e]) * load[e],
  // load the share of the run's tokens whose first choice is e (GShard, one run of the whole pass),
  // or of its k x run choices that chose e (DeepSeek-V3's sequence-wise loss).
  const int64_t run = shape.aux_seq_len > 0 ? shape.aux_seq_len : T, runs = T / run;
  PM_REQUIRE(T % run == 0, "the sequence-wise balance loss needs whole sequences of {} tokens, got {} tokens", run, T);
  g.load_fraction.assign(runs * E, 0.0f);
  if (shape.aux_seq_len > 0) {
    for (int64_t i = 0; i < T * top_k; ++i) g.load_fraction[i / top_k / run * E + routing.expert[i]] += 1.0f;
    for (float& f : g.load_fraction) f /= static_cast<float>(top_k * run);
  } else {
    for (int64_t t = 0; t < T; ++t) g.load_fraction[routing.expert[t * top_k]] += 1.0f;
    for (float& f : g.load_fraction) f /= static_cast<float>(T);
  }
  double aux = 0;
  std::vector<double> mean_prob(E);
  for (int64_t b = 0; b < runs; ++b) {
    std::fill(mean_prob.begin(), mean_prob.end(), 0.0);
    for (int64_t t = b * run; t < (b + 1) * run; ++t)
      for (int e = 0; e < E; ++e)
        mean_prob[e] += sigmoid ? static_cast<double>(g.probs[t * E + e]) / g.score_sum[t] : g.probs[t * E + e];
    for (int e = 0; e < E; ++e) aux += mean_prob[e] / run * g.load_fraction[b * E + e];
  }
  g.aux_loss = aux * E / static_cast<double>(runs);
  return g;
}

ScratchBuffer<float> gate_backward_logits(Backend& backend, const float* x, const MoeShape& shape, const Gating& g,
                                          const float* dgate, RouterLossGrads loss_grads, float* dwg) {
  PM_CHECK(!g.load_fraction.empty(), "a backward of a gate pass that skipped the router's losses (inference)");
  const float aux_grad = loss_grads.aux;
  const int64_t T = g.routing.tokens, M = shape.model_dim;
  const int E = shape.experts, top_k = shape.top_k;
  const bool sigmoid = shape.router_score == RouterScore::sigmoid;
  ScratchBuffer<float> dprobs(T * E);  // (every value written below)
  // The aux loss sees the load fractions as constants: d aux / d p[t, e] = E f_e / T =: c_e, f the
  // fraction of t's run (E / runs * 1 / run: E / T either way).
  const int64_t run = T / static_cast<int64_t>(g.load_fraction.size() / E);
  std::vector<float> c_runs(g.load_fraction.size());
  for (std::size_t i = 0; i < c_runs.size(); ++i)
    c_runs[i] = aux_grad * static_cast<float>(E) * g.load_fraction[i] / static_cast<float>(T);
  for (int64_t t = 0; t < T; ++t) {
    const float* c = &c_runs[t / run * E];
    if (!sigmoid) {
      for (int e = 0; e < E; ++e) dprobs[t * E + e] = c[e];
      continue;
    }
    // p_e = s_e / S: d s_i = (c_i - sum_e c_e p_e) / S
    const float S = g.score_sum[t];
    float inner = 0;
    for (int e = 0; e < E; ++e) inner += c[e] * g.probs[t * E + e] / S;
    for (int e = 0; e < E; ++e) dprobs[t * E + e] = (c[e] - inner) / S;
  }
  // the gate values are routed_scale x n_j: the gradient reaching n_j is routed_scale x dgate
  const float routed_scale = static_cast<float>(shape.routed_scale);
  std::vector<float> dn(top_k);
  for (int64_t t = 0; t < T; ++t) {
    for (int j = 0; j < top_k; ++j) dn[j] = dgate[t * top_k + j] * routed_scale;
    const int32_t* chosen = &g.routing.expert[t * top_k];
    if (top_k == 1 || !shape.normalize_gates) {  // n_j are the probabilities
      for (int j = 0; j < top_k; ++j) dprobs[t * E + chosen[j]] += dn[j];
      continue;
    }
    // n_j = p_j / s with s the sum of the chosen p (the forward's sum and quotient, the same
    // bits): dp_i = (dn_i - sum_j dn_j n_j) / s.
    float s = 0, inner = 0;
    for (int j = 0; j < top_k; ++j) s += g.probs[t * E + chosen[j]];
    for (int j = 0; j < top_k; ++j) inner += dn[j] * (g.probs[t * E + chosen[j]] / s);
    for (int j = 0; j < top_k; ++j) dprobs[t * E + chosen[j]] += (dn[j] - inner) / s;
  }
  ScratchBuffer<float> dlogits(T * E);
  if (sigmoid) {  // d sigmoid(l) / d l = s (1 - s)
    for (int64_t i = 0; i < T * E; ++i) dlogits[i] = dprobs[i] * g.probs[i] * (1.0f - g.probs[i]);
  } else {
    backend.softmax_rows_backward(g.probs.data(), dprobs.data(), dlogits.data(), T, E);
  }
  if (loss_grads.z != 0) {  // d mean_t lse_t^2 / d logits[t, e] = 2 lse_t softmax(logits)[t, e] / T
    const std::vector<float>& lse = g.lse();
    for (int64_t t = 0; t < T; ++t) {
      const float scale = loss_grads.z * 2.0f * lse[t] / static_cast<float>(T);
      for (int e = 0; e < E; ++e) {
        const float softmax = sigmoid ? std::exp(g.logits[t * E + e] - lse[t]) : g.probs[t * E + e];
        dlogits[t * E + e] += scale * softmax;
      }
    }
  }
  // dwg [M, E] += x^T dlogits, computed as its transpose dwg^T [E, M] += dlogits^T x: E columns
  // (8 or 64) fill a fraction of the GEMM kernel's panel, M fills whole ones. The same bits:
  // each element is the same chain over t, dlogits[t, e] x[t, m] = x[t, m] dlogits[t, e].
  ScratchBuffer<float> dwg_t(E * M);
  transpose(dwg, M, E, dwg_t.data());
  backend.gemm(Trans::yes, Trans::no, E, M, T, dlogits.data(), E, x, M, 1.0f, dwg_t.data(), M);
  transpose(dwg_t.data(), E, M, dwg);
  return dlogits;
}

void gate_backward(Backend& backend, const float* x, const float* wg, const MoeShape& shape, const Gating& g,
                   const float* dgate, RouterLossGrads loss_grads, float* dwg, float* dx) {
  const ScratchBuffer<float> dlogits = gate_backward_logits(backend, x, shape, g, dgate, loss_grads, dwg);
  const int64_t T = g.routing.tokens, M = shape.model_dim;
  const int E = shape.experts;
  backend.gemm(Trans::no, Trans::yes, T, M, E, dlogits.data(), E, wg, E, 0.0f, dx, M);
}

void Gating::make_lse() const {
  if (lse_made_) return;
  z_loss_ = logits.empty() ? std::nan("") : log_sum_exp_rows(logits.data(), routing.tokens, routing.experts, lse_);
  lse_made_ = true;
}

double Gating::z_loss() const {
  make_lse();
  return z_loss_;
}

const std::vector<float>& Gating::lse() const {
  make_lse();
  PM_CHECK(!logits.empty(), "the z-loss of a gate pass that skipped the router's losses (inference)");
  return lse_;
}

void add_expert_load(const Routing& routing, double* load) {
  for (int32_t e : routing.expert) load[e] += 1.0;
}

void update_balance_bias(float* bias, const double* load, int experts, double rate) {
  double mean = 0;
  for (int e = 0; e < experts; ++e) mean += load[e];
  mean /= experts;
  for (int e = 0; e < experts; ++e) {
    const double sign = load[e] < mean ? 1.0 : load[e] > mean ? -1.0 : 0.0;
    bias[e] += static_cast<float>(rate * sign);
  }
}

}  // namespace pm
