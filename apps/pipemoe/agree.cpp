#include <vector>

#include "apps/pipemoe/agree.h"
#include "core/error.h"

namespace pm::cli {

void agree_or_throw(Communicator& comm, const std::string& error) {
  double failed = comm.allreduce_scalar(error.empty() ? 0.0 : 1.0, ReduceOp::max);
  if (failed == 0.0) return;
  std::vector<std::string> errors = comm.gather_strings(error, 0);
  std::string first;
  for (const std::string& e : errors)
    if (first.empty() && !e.empty()) first = e;
  throw Error(ErrorKind::usage, comm.rank() == 0 ? first : "");
}

}  // namespace pm::cli
