// Least squares with non-negative coefficients (Lawson-Hanson), for the performance models:
// every term of a task's time (a fixed cost, a cost per call, per flop, per byte) is >= 0.
#pragma once

#include <vector>

namespace pm {

struct LinearFit {
  std::vector<double> coef;  // one per feature, all >= 0
  double r2 = 0;             // coefficient of determination on the samples
  double median_rel_err = 0; // median of |predicted - measured| / measured
};

// rows[i] are the features of sample i, y[i] its measurement.
LinearFit fit_nonnegative(const std::vector<std::vector<double>>& rows, const std::vector<double>& y);

}  // namespace pm
