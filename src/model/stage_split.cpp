#include "model/stage_split.h"

#include <algorithm>
#include <cstdlib>
#include <limits>

#include "core/error.h"

namespace pm {

double block_cost(const ModelConfig& m, int l) {
  const double D = m.d_model, S = m.seq_len;
  const double Dkv = D * m.kv_heads_or_all() / m.heads;  // keys' and values' width (grouped-query: less)
  const double attention = 4 * D * D + 4 * D * Dkv + 4 * S * D;  // q, k, v and the projection; scores and values
  if (!m.is_moe(l)) return attention + (m.mlp_activation == "swiglu" ? 3 : 2) * 2 * D * m.mlp_hidden;
  const double matrices = m.expert_activation == "swiglu" ? 3 : 2;
  const double slots = m.top_k * (m.capacity_factor > 0 ? m.capacity_factor : 1.0);  // rows per token
  const double shared = (m.shared_expert_activation == "swiglu" ? 3 : 2) * 2 * D * m.shared_expert_hidden;
  return attention + 2 * D * m.experts + slots * matrices * 2 * D * m.expert_hidden + shared;
}

double head_cost(const ModelConfig& m, int vocab) { return 2.0 * m.d_model * vocab; }

std::vector<int> stage_starts(const ModelConfig& m, int vocab, int pp, const std::string& split) {
  const int L = m.layers;
  PM_REQUIRE(pp >= 1 && pp <= L, "configuration: 'pp' {}: more pipeline stages than the model's {} blocks", pp, L);
  std::vector<int> starts(pp + 1, L);
  if (split == "even") {
    for (int s = 0; s < pp; ++s) starts[s] = static_cast<int>(static_cast<long>(s) * L / pp);
    return starts;
  }
  if (split == "cost") {
    // best[s][b]: the least cost of the most expensive of stages s.. holding blocks b..; each
    // stage at least one block, the last one the head too
    std::vector<double> cost(L);
    for (int l = 0; l < L; ++l) cost[l] = block_cost(m, l);
    const double inf = std::numeric_limits<double>::infinity();
    std::vector<std::vector<double>> best(pp + 1, std::vector<double>(L + 1, inf));
    std::vector<std::vector<int>> cut(pp + 1, std::vector<int>(L + 1, L));
    best[pp][L] = 0;
    for (int s = pp - 1; s >= 0; --s)
      for (int b = s; b <= L - (pp - s); ++b) {
        double here = 0;
        for (int e = b + 1; e <= L - (pp - s - 1); ++e) {
          here += cost[e - 1];
          const double mine = here + (s == pp - 1 ? head_cost(m, vocab) : 0.0);
          if (s == pp - 1 && e != L) continue;
          const double worst = std::max(mine, best[s + 1][e]);
          if (worst < best[s][b]) best[s][b] = worst, cut[s][b] = e;
        }
      }
    for (int s = 0, b = 0; s < pp; b = cut[s][b], ++s) starts[s] = b;
    return starts;
  }
  // "3,1": blocks per stage
  std::vector<int> counts;
  for (const char* p = split.c_str(); *p;) {
    char* end = nullptr;
    const long n = std::strtol(p, &end, 10);
    PM_REQUIRE(end != p && n >= 1 && n <= L && (*end == ',' || *end == '\0'),
               "configuration: 'pipeline_split' must be \"even\", \"cost\" or the blocks of each stage like \"3,1\", "
               "got \"{}\"",
               split);
    counts.push_back(static_cast<int>(n));
    p = *end == ',' ? end + 1 : end;
  }
  int total = 0;
  for (int n : counts) total += n;
  PM_REQUIRE(static_cast<int>(counts.size()) == pp && total == L,
             "configuration: 'pipeline_split' \"{}\" gives {} stages and {} blocks; the model has pp {} stages and {} "
             "blocks",
             split, counts.size(), total, pp, L);
  for (int s = 0, at = 0; s < pp; at += counts[s], ++s) starts[s] = at;
  return starts;
}

}  // namespace pm
