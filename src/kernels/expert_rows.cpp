// ExpertRows::check (kernels/backend.h): the contract of expert_weight_grads, for every backend.
#include "core/error.h"
#include "kernels/backend.h"

namespace pm {

void ExpertRows::check(Precision precision) const {
  const size_t u_rows = u.size() + u_bf16.size(), act_rows = act.size() + act_bf16.size();
  PM_CHECK(u_rows == rows() && act_rows == rows() && dhpre.size() == rows() && (u.empty() || u_bf16.empty()) &&
               (act.empty() || act_bf16.empty()) && (dy.empty() || dy_bf16.empty()),
           "expert rows disagree: {} u, {} act, {} dhpre, {} dy", u_rows, act_rows, dhpre.size(), rows());
  PM_CHECK((u_bf16.empty() && act_bf16.empty() && dy_bf16.empty()) || precision == Precision::bf16,
           "bf16 rows of an expert's input, activation or output gradient need a bf16 expert");
}

}  // namespace pm
