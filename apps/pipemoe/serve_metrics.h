// `pipemoe serve`'s GET /metrics: what it has done, in Prometheus's text format (version 0.0.4),
// for the scrapers and dashboards a deployment already runs. Counters and gauges come from the
// frontend's own counts; two histograms, of the time to a request's first token and to its whole
// answer, are filled here as requests progress.
#pragma once

#include <array>
#include <cstdint>
#include <string>
#include <vector>

namespace pm::cli {

class LatencyHistogram {
 public:
  static constexpr std::array<double, 11> kBounds = {0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30};
  void observe(double seconds);
  // The histogram's lines (_bucket with le, cumulative; _sum; _count) under its HELP and TYPE.
  std::string exposition(const std::string& name, const std::string& help) const;

 private:
  std::array<int64_t, kBounds.size()> buckets_{};  // not cumulative: observations up to each bound
  int64_t count_ = 0;
  double sum_ = 0;
};

struct MetricValue {
  std::string name, help, type;  // type: counter or gauge
  double value;
};

// The whole /metrics text: the values (counters named ..._total), then the histograms.
std::string metrics_exposition(const std::vector<MetricValue>& values, const LatencyHistogram& first_token,
                               const LatencyHistogram& request);

}  // namespace pm::cli
