#include "core/round_medians.h"

#include "core/error.h"
#include "core/stats.h"

namespace pm {

RoundMedians round_medians(const std::map<int, std::vector<double>>& per_key, RoundLevel how) {
  RoundMedians out;
  if (per_key.empty()) return out;
  const std::size_t rounds = per_key.begin()->second.size();
  std::vector<double> level(rounds);
  for (std::size_t r = 0; r < rounds; ++r) {
    std::vector<double> values;
    for (const auto& [key, v] : per_key) {
      PM_CHECK(v.size() == rounds, "key {} has {} values for {} rounds", key, v.size(), rounds);
      values.push_back(v[r]);
    }
    double mean = 0;
    for (double x : values) mean += x / static_cast<double>(values.size());
    level[r] = how == RoundLevel::median ? summarize(values).median : mean;
  }
  const double typical = summarize(level).median;
  for (const auto& [key, v] : per_key) {
    std::vector<double> ratios;
    for (std::size_t r = 0; r < rounds; ++r) ratios.push_back(level[r] > 0 ? v[r] / level[r] : 0);
    Summary s = summarize(ratios);
    out.median[key] = s.median * typical;
    out.spread[key] = s.median > 0 ? (s.max - s.min) / s.median : 0;
  }
  return out;
}

}  // namespace pm
