#include "apps/pipemoe/serve_metrics.h"

#include <fmt/format.h>

namespace pm::cli {

void LatencyHistogram::observe(double seconds) {
  for (std::size_t i = 0; i < kBounds.size(); ++i)
    if (seconds <= kBounds[i]) {
      ++buckets_[i];
      break;
    }
  ++count_;  // one beyond the last bound counts in +Inf only
  sum_ += seconds;
}

std::string LatencyHistogram::exposition(const std::string& name, const std::string& help) const {
  std::string out = fmt::format("# HELP {0} {1}\n# TYPE {0} histogram\n", name, help);
  int64_t cumulative = 0;
  for (std::size_t i = 0; i < kBounds.size(); ++i) {
    cumulative += buckets_[i];
    out += fmt::format("{}_bucket{{le=\"{}\"}} {}\n", name, kBounds[i], cumulative);
  }
  out += fmt::format("{0}_bucket{{le=\"+Inf\"}} {1}\n{0}_sum {2}\n{0}_count {1}\n", name, count_, sum_);
  return out;
}

std::string metrics_exposition(const std::vector<MetricValue>& values, const LatencyHistogram& first_token,
                               const LatencyHistogram& request) {
  std::string out;
  for (const MetricValue& v : values)
    out += fmt::format("# HELP {0} {1}\n# TYPE {0} {2}\n{0} {3}\n", v.name, v.help, v.type, v.value);
  out += first_token.exposition("pipemoe_time_to_first_token_seconds",
                                "From a request's arrival to its first generated token (any choice).");
  out += request.exposition("pipemoe_request_seconds", "From a request's arrival to its whole answer.");
  return out;
}

}  // namespace pm::cli
