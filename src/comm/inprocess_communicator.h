// Ranks as threads of one process: a second transport behind the Communicator interface, so that
// multi-rank tests of the layer, the executor and process groups run under plain ctest, without
// mpirun. Every operation copies through memory shared by the threads; collectives match by their
// order on each rank (the n-th collective of every rank of a group is one operation, and a rank
// that calls another kind there is an error), point-to-point messages by their order between two
// ranks, as NCCL matches them.
//
// A rank whose body throws marks the run failed: every operation the other ranks wait on then
// fails at once with a message naming it, so a test never hangs on a dead rank.
#pragma once

#include <functional>

#include "comm/communicator.h"

namespace pm {

// Runs body(world) on `ranks` threads, each with its own communicator (rank r of `ranks`) and its
// own waiter; returns when all are done. Rethrows the error of the rank that failed first.
void run_ranks_in_process(int ranks, const std::function<void(Communicator&)>& body, WaitPolicy policy = {});

}  // namespace pm
