// MPI backend of the Communicator, and the process-wide MPI start/stop.
//
// This file pair and its .cpp are the only ones in the engine that include mpi.h.
#pragma once

#include <memory>

#include "comm/communicator.h"

namespace pm {

// Starts MPI (thread level SERIALIZED: the compute and communication lanes hand MPI over through
// the executor's lock, never calling it at the same time) and stops it on destruction.
class MpiRuntime {
 public:
  MpiRuntime(int* argc, char*** argv);
  ~MpiRuntime();
  MpiRuntime(const MpiRuntime&) = delete;
  MpiRuntime& operator=(const MpiRuntime&) = delete;

  // Ends every rank of the job now: for errors that one rank saw and the others cannot know.
  [[noreturn]] static void abort_job(int exit_code);
  static bool running();
};

// A communicator over MPI_COMM_WORLD; its sub-groups (split) share the waiter.
std::unique_ptr<Communicator> make_mpi_world_communicator(std::shared_ptr<Waiter> waiter = std::make_shared<Waiter>());

}  // namespace pm
