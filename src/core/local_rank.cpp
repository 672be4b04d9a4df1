#include "core/local_rank.h"

#include <cstdlib>
#include <initializer_list>

namespace pm {

int launcher_local_rank(int fallback) {
  for (const char* name : {"OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "SLURM_LOCALID"})
    if (const char* v = std::getenv(name)) return std::atoi(v);
  return fallback;
}

int gpu_for_rank(int devices, int fallback) {
  const int local = launcher_local_rank(fallback);
  return devices > 0 && local >= 0 ? local % devices : 0;
}

}  // namespace pm
