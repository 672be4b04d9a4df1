#include "model/numerics_guard.h"

#include <cmath>
#include <cstdlib>
#include <limits>

#include <fmt/format.h>

#include "core/tensor.h"

namespace pm {

std::string non_finite_report(const std::vector<Parameter>& params, double loss) {
  std::string out = std::isfinite(loss) ? "" : fmt::format("loss {}", loss);
  for (const Parameter& p : params) {
    const float* g = p.grad->f32();
    const int64_t n = p.grad->numel();
    int64_t bad = 0, first = -1;
    for (int64_t i = 0; i < n; ++i)
      if (!std::isfinite(g[i])) bad += 1, first = first < 0 ? i : first;
    if (bad == 0) continue;
    out += fmt::format("{}gradient {} has {} non-finite of {} values (first at {})", out.empty() ? "" : "; ", p.name,
                       bad, n, first);
    break;
  }
  return out;
}

bool step_not_finite(Communicator& comm, double loss, double grad_norm) {
  double flag = std::isfinite(loss) && std::isfinite(grad_norm) ? 0.0 : 1.0;
  comm.allreduce(&flag, &flag, 1, DType::f64, ReduceOp::max);
  return flag > 0;
}

void inject_nan_if_asked(std::vector<Parameter>& params, int64_t step, int rank) {
  const char* spec = std::getenv("PIPEMOE_FAULT_NAN");
  if (!spec || params.empty()) return;
  char* end = nullptr;
  const long long at = std::strtoll(spec, &end, 10);
  const long long on = end && *end == ':' ? std::strtoll(end + 1, nullptr, 10) : 0;
  if (at != step || on != rank) return;
  Parameter* target = &params.front();
  for (Parameter& p : params)
    if (p.expert) {
      target = &p;
      break;
    }
  target->grad->f32()[0] = std::numeric_limits<float>::quiet_NaN();
}

}  // namespace pm
