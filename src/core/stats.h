// Summaries of repeated measurements.
#pragma once

#include <algorithm>
#include <vector>

namespace pm {

struct Summary {
  double min = 0, median = 0, max = 0;
};

inline Summary summarize(std::vector<double> values) {
  if (values.empty()) return {};
  std::sort(values.begin(), values.end());
  std::size_t n = values.size();
  double median = n % 2 ? values[n / 2] : 0.5 * (values[n / 2 - 1] + values[n / 2]);
  return {values.front(), median, values.back()};
}

}  // namespace pm
