#include "apps/pipemoe/sampling.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "core/error.h"

namespace pm::cli {

void check_sampling(const Sampling& s, bool json_names, int64_t V) {
  const auto name = [&](const char* field, const char* flag) { return json_names ? field : flag; };
  PM_REQUIRE(s.temperature >= 0 && std::isfinite(s.temperature), "{} must be 0 (greedy) or positive, got {}",
             name("temperature", "--temperature"), s.temperature);
  PM_REQUIRE(s.top_k >= 1, "{} must be at least 1, got {}", name("top_k", "--top-k"), s.top_k);
  PM_REQUIRE(s.top_p > 0 && s.top_p <= 1, "{} must be in (0, 1], got {}", name("top_p", "--top-p"), s.top_p);
  PM_REQUIRE(s.min_p >= 0 && s.min_p <= 1, "{} must be in [0, 1], got {}", name("min_p", "--min-p"), s.min_p);
  PM_REQUIRE(std::abs(s.presence_penalty) <= 2, "{} must be in [-2, 2], got {}",
             name("presence_penalty", "--presence-penalty"), s.presence_penalty);
  PM_REQUIRE(std::abs(s.frequency_penalty) <= 2, "{} must be in [-2, 2], got {}",
             name("frequency_penalty", "--frequency-penalty"), s.frequency_penalty);
  PM_REQUIRE(s.logit_bias.size() <= 300, "logit_bias takes at most 300 tokens, got {}", s.logit_bias.size());
  for (const auto& [id, bias] : s.logit_bias) {
    PM_REQUIRE(id >= 0 && id < V, "logit_bias: token {} is outside the vocabulary (0 to {})", id, V - 1);
    PM_REQUIRE(std::abs(bias) <= 100, "logit_bias: token {}'s bias must be in [-100, 100], got {}", id, bias);
  }
}

namespace {
// The logits with the penalties and the bias applied (in double, rounded back to float).
std::vector<float> adjusted_logits(const float* logits, int64_t V, const Sampling& s, const std::vector<int32_t>& generated) {
  std::vector<double> shift(V, 0.0);
  std::vector<int64_t> count(V, 0);
  for (int32_t t : generated) ++count[t];
  for (int64_t j = 0; j < V; ++j)
    if (count[j] > 0) shift[j] -= count[j] * s.frequency_penalty + s.presence_penalty;
  for (const auto& [id, bias] : s.logit_bias) shift[id] += bias;
  std::vector<float> out(logits, logits + V);
  for (int64_t j = 0; j < V; ++j)
    if (shift[j] != 0) out[j] = static_cast<float>(out[j] + shift[j]);
  return out;
}
}  // namespace

int32_t sample_next(const float* given, int64_t V, const Sampling& s, Rng& rng, const std::vector<int32_t>& generated) {
  std::vector<float> adjusted;
  if (s.adjusts_logits()) adjusted = adjusted_logits(given, V, s, generated);
  const float* logits = adjusted.empty() ? given : adjusted.data();
  std::vector<int32_t> order(V);
  for (int32_t i = 0; i < V; ++i) order[i] = i;
  const int k = s.temperature == 0 ? 1 : std::min<int>(s.top_k, static_cast<int>(V));
  std::partial_sort(order.begin(), order.begin() + k, order.end(),
                    [&](int32_t a, int32_t b) { return logits[a] > logits[b] || (logits[a] == logits[b] && a < b); });
  if (k == 1) return order[0];
  std::vector<double> p(k);
  for (int i = 0; i < k; ++i) p[i] = std::exp((logits[order[i]] - logits[order[0]]) / s.temperature);
  int keep = k;
  while (keep > 1 && p[keep - 1] < s.min_p) --keep;  // min-p: p[0] (the most likely) is 1
  double sum = 0;
  for (int i = 0; i < keep; ++i) sum += p[i];
  double mass = 0;  // top-p: cut the tail once the kept mass reaches p
  for (int i = 0; i < keep && s.top_p < 1; ++i)
    if ((mass += p[i] / sum) >= s.top_p) {
      keep = i + 1;
      break;
    }
  double kept = 0;
  for (int i = 0; i < keep; ++i) kept += p[i];
  double u = rng.uniform() * kept;
  int pick = 0;
  while (pick + 1 < keep && (u -= p[pick]) > 0) ++pick;
  return order[pick];
}

Rng sequence_rng(uint64_t seed, int64_t row) { return Rng(seed, stream_id(50, row)); }

TokenLogprobs token_logprobs(const float* logits, int64_t V, int32_t token, int top) {
  PM_CHECK(token >= 0 && token < V, "token {} of a vocabulary of {}", token, V);
  const double most = *std::max_element(logits, logits + V);
  double sum = 0;
  for (int64_t i = 0; i < V; ++i) sum += std::exp(static_cast<double>(logits[i]) - most);
  const double log_z = most + std::log(sum);
  TokenLogprobs out;
  out.logprob = logits[token] - log_z;
  std::vector<int32_t> ids(V);
  for (int64_t i = 0; i < V; ++i) ids[i] = static_cast<int32_t>(i);
  const int64_t n = std::min<int64_t>(top, V);
  std::partial_sort(ids.begin(), ids.begin() + n, ids.end(),
                    [&](int32_t a, int32_t b) { return logits[a] > logits[b] || (logits[a] == logits[b] && a < b); });
  for (int64_t i = 0; i < n; ++i) out.top.push_back({ids[i], logits[ids[i]] - log_z});
  return out;
}

}  // namespace pm::cli
