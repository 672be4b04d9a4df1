#include "perf/linear_fit.h"

#include <algorithm>
#include <cmath>

#include "core/error.h"

namespace pm {
namespace {

// Solves the normal equations restricted to the `active` features (unknowns elsewhere are 0).
// Features are scaled to unit norm first so that flops (1e9) and calls (1) are comparable.
std::vector<double> solve_active(const std::vector<std::vector<double>>& X, const std::vector<double>& y,
                                 const std::vector<char>& active) {
  const std::size_t n = active.size();
  std::vector<int> idx;
  for (std::size_t j = 0; j < n; ++j)
    if (active[j]) idx.push_back(static_cast<int>(j));
  const std::size_t m = idx.size();
  std::vector<double> A(m * m, 0.0), b(m, 0.0);
  for (std::size_t i = 0; i < X.size(); ++i)
    for (std::size_t a = 0; a < m; ++a) {
      b[a] += X[i][idx[a]] * y[i];
      for (std::size_t c = 0; c < m; ++c) A[a * m + c] += X[i][idx[a]] * X[i][idx[c]];
    }
  for (std::size_t a = 0; a < m; ++a) A[a * m + a] += 1e-12;  // keeps collinear columns solvable
  // Gaussian elimination with partial pivoting.
  for (std::size_t col = 0; col < m; ++col) {
    std::size_t pivot = col;
    for (std::size_t r = col + 1; r < m; ++r)
      if (std::abs(A[r * m + col]) > std::abs(A[pivot * m + col])) pivot = r;
    for (std::size_t c = 0; c < m; ++c) std::swap(A[col * m + c], A[pivot * m + c]);
    std::swap(b[col], b[pivot]);
    for (std::size_t r = col + 1; r < m; ++r) {
      double f = A[r * m + col] / A[col * m + col];
      for (std::size_t c = col; c < m; ++c) A[r * m + c] -= f * A[col * m + c];
      b[r] -= f * b[col];
    }
  }
  std::vector<double> sol(m);
  for (std::size_t a = m; a-- > 0;) {
    double s = b[a];
    for (std::size_t c = a + 1; c < m; ++c) s -= A[a * m + c] * sol[c];
    sol[a] = s / A[a * m + a];
  }
  std::vector<double> out(n, 0.0);
  for (std::size_t a = 0; a < m; ++a) out[idx[a]] = sol[a];
  return out;
}

}  // namespace

LinearFit fit_nonnegative(const std::vector<std::vector<double>>& rows, const std::vector<double>& y) {
  PM_CHECK(!rows.empty() && rows.size() == y.size(), "fit needs samples ({} rows, {} values)", rows.size(), y.size());
  const std::size_t n = rows[0].size();
  // Scale each feature to unit norm; a feature that is always zero stays out.
  std::vector<double> scale(n, 0.0);
  for (const auto& r : rows)
    for (std::size_t j = 0; j < n; ++j) scale[j] += r[j] * r[j];
  std::vector<std::vector<double>> X = rows;
  std::vector<char> usable(n, 0);
  for (std::size_t j = 0; j < n; ++j) {
    scale[j] = std::sqrt(scale[j]);
    usable[j] = scale[j] > 0;
    for (auto& r : X) r[j] = usable[j] ? r[j] / scale[j] : 0.0;
  }
  // Lawson-Hanson active set: add the feature with the largest positive gradient, solve, and
  // step back towards feasibility whenever a coefficient would turn negative.
  std::vector<char> active(n, 0);
  std::vector<double> x(n, 0.0);
  for (int outer = 0; outer < 3 * static_cast<int>(n) + 3; ++outer) {
    std::vector<double> grad(n, 0.0);
    for (std::size_t i = 0; i < X.size(); ++i) {
      double residual = y[i];
      for (std::size_t j = 0; j < n; ++j) residual -= X[i][j] * x[j];
      for (std::size_t j = 0; j < n; ++j) grad[j] += X[i][j] * residual;
    }
    int best = -1;
    for (std::size_t j = 0; j < n; ++j)
      if (usable[j] && !active[j] && grad[j] > 1e-12 && (best < 0 || grad[j] > grad[best])) best = static_cast<int>(j);
    if (best < 0) break;
    active[best] = 1;
    while (true) {
      std::vector<double> z = solve_active(X, y, active);
      bool feasible = true;
      for (std::size_t j = 0; j < n; ++j) feasible = feasible && (!active[j] || z[j] > 0);
      if (feasible) {
        x = z;
        break;
      }
      double alpha = 1.0;
      for (std::size_t j = 0; j < n; ++j)
        if (active[j] && z[j] <= 0) alpha = std::min(alpha, x[j] / (x[j] - z[j]));
      for (std::size_t j = 0; j < n; ++j) {
        x[j] += alpha * (z[j] - x[j]);
        if (active[j] && x[j] <= 1e-15) active[j] = 0, x[j] = 0;
      }
    }
  }
  LinearFit fit;
  fit.coef.resize(n);
  for (std::size_t j = 0; j < n; ++j) fit.coef[j] = usable[j] ? x[j] / scale[j] : 0.0;
  double mean = 0;
  for (double v : y) mean += v;
  mean /= static_cast<double>(y.size());
  double ss_res = 0, ss_tot = 0;
  std::vector<double> rel;
  for (std::size_t i = 0; i < rows.size(); ++i) {
    double p = 0;
    for (std::size_t j = 0; j < n; ++j) p += rows[i][j] * fit.coef[j];
    ss_res += (y[i] - p) * (y[i] - p);
    ss_tot += (y[i] - mean) * (y[i] - mean);
    if (y[i] > 0) rel.push_back(std::abs(p - y[i]) / y[i]);
  }
  fit.r2 = ss_tot > 0 ? 1 - ss_res / ss_tot : 1.0;
  if (!rel.empty()) {
    std::sort(rel.begin(), rel.end());
    fit.median_rel_err = rel[rel.size() / 2];
  }
  return fit;
}

}  // namespace pm
