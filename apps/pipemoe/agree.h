// Ranks agreeing on a local step's failure, so that every rank ends with the same usage error.
#pragma once

#include <string>

#include "comm/communicator.h"

namespace pm::cli {

// Every rank states whether its local step succeeded (error empty) and all agree: if any failed,
// every rank throws a usage error; rank 0's carries the first failing rank's message, the others
// are silent. For failures only some ranks see (a folder one rank cannot write).
void agree_or_throw(Communicator& comm, const std::string& error);

}  // namespace pm::cli
