#include "apps/pipemoe/sampling.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "core/error.h"

namespace pm::cli {

void check_sampling(const Sampling& s, bool json_names) {
  PM_REQUIRE(s.temperature >= 0 && std::isfinite(s.temperature), "{} must be 0 (greedy) or positive, got {}",
             json_names ? "temperature" : "--temperature", s.temperature);
  PM_REQUIRE(s.top_k >= 1, "{} must be at least 1, got {}", json_names ? "top_k" : "--top-k", s.top_k);
  PM_REQUIRE(s.top_p > 0 && s.top_p <= 1, "{} must be in (0, 1], got {}", json_names ? "top_p" : "--top-p", s.top_p);
}

int32_t sample_next(const float* logits, int64_t V, const Sampling& s, Rng& rng) {
  std::vector<int32_t> order(V);
  for (int32_t i = 0; i < V; ++i) order[i] = i;
  const int k = s.temperature == 0 ? 1 : std::min<int>(s.top_k, static_cast<int>(V));
  std::partial_sort(order.begin(), order.begin() + k, order.end(),
                    [&](int32_t a, int32_t b) { return logits[a] > logits[b] || (logits[a] == logits[b] && a < b); });
  if (k == 1) return order[0];
  std::vector<double> p(k);
  double sum = 0;
  for (int i = 0; i < k; ++i) sum += p[i] = std::exp((logits[order[i]] - logits[order[0]]) / s.temperature);
  int keep = k;  // top-p: cut the tail once the kept mass reaches p
  double mass = 0;
  for (int i = 0; i < k && s.top_p < 1; ++i)
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
