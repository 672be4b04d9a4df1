// backend_named: the backend a run asks for by name (kernels/backend.h).
#include "core/error.h"
#include "kernels/backend.h"
#include "kernels/cuda/cuda_backend.h"

namespace pm {

Backend& backend_named(const std::string& name) {
  if (name == "cpu") return cpu_backend();
  if (name == "cuda") return cuda_backend();
  throw Error(ErrorKind::usage, "unknown backend '" + name + "' (one of cpu|cuda)");
}

}  // namespace pm
