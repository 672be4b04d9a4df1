// Which of a machine's GPUs a rank takes: its rank among the ranks on its machine, as the
// launcher says (Open MPI, MPICH, Slurm), modulo the GPUs there. Shared by the CUDA backend and
// the NCCL transport, so that a rank's GEMMs and its collectives run on the same GPU.
#pragma once

namespace pm {

// The launcher's local rank, or `fallback` where no launcher says (ranks as threads of one
// process pass their rank).
int launcher_local_rank(int fallback);

// The GPU for a rank: launcher_local_rank(fallback) modulo `devices` (devices > 0).
int gpu_for_rank(int devices, int fallback);

}  // namespace pm
