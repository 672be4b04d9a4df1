// NCCL behind the Communicator interface: the collectives run on this rank's GPU with NCCL
// (`pipemoe --transport nccl`), over NVLink, PCIe or InfiniBand as NCCL finds them.
//
// It stands on the launch's own transport (MPI, or ranks as threads), its bootstrap: that carries
// NCCL's unique id to every rank, the point-to-point messages (pipeline stages: NCCL pairs a send
// and a receive only within one group call, and the engine's stages post them from different
// tasks), the host name and the waiter. Every collective (all-to-all with per-peer counts,
// all-reduce, all-gather, broadcast, barrier) is NCCL's, issued on one stream per group in the
// order the engine starts them, which is the same on every rank (the communication lane runs its
// tasks in order), as NCCL requires.
//
// The engine's buffers are host memory today (the CUDA backend copies operands in and results
// out per call), so each operation copies its send data into pinned memory, then to the GPU, runs
// NCCL, and copies the result back the same way; test() answers from a CUDA event and the last
// copy into the caller's buffer happens there. No operation blocks the thread that starts it.
// Sums over 3 or more ranks add in NCCL's order (its ring or tree: the same on every rank and from
// run to run, not the MPI library's); over 2 ranks a + b is b + a, the bits of every transport.
//
// The library is loaded when a run asks for it (dlopen of libnccl.so.2, also looked for in
// /usr/local/cuda/lib64): the binary runs where NCCL is not installed.
#pragma once

#include <memory>
#include <string>

#include "comm/communicator.h"

namespace pm {

// Whether this build and machine can run NCCL (a CUDA build, a GPU, the library); if not, why.
bool nccl_available(std::string* why_not = nullptr);

// GPUs on this machine that NCCL can use (0 where nccl_available is false): one rank per GPU.
int nccl_devices();

// A communicator with the same ranks as `bootstrap`, its collectives on NCCL; `bootstrap` must
// outlive it. Collective over `bootstrap`. Throws a usage error (with nccl_available's reason)
// where NCCL cannot run.
std::unique_ptr<Communicator> make_nccl_communicator(Communicator& bootstrap);

}  // namespace pm
