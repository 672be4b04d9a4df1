// A watchdog beside the collectives: finds a dead or stopped rank in seconds, however long a
// healthy all-to-all takes.
//
// A collective cannot tell a slow peer from a dead one, so its timeout (--comm-timeout) must be
// long. The heartbeat is a second channel that knows nothing of the run's traffic: the ranks form
// a ring of TCP connections (rank r to rank r+1), and a thread of each rank sends a byte every
// second (a fifth of the timeout if that is shorter) to its successor and listens to its predecessor. A predecessor whose connection closes
// without a goodbye (killed), or that sends nothing for `timeout_s` (stopped, its host gone) is
// named on stderr, and this rank exits at once, which makes mpirun end the whole job. A rank that
// ends normally says goodbye first, so ranks that finish at different times are not mistaken for
// dead ones. The thread makes no MPI call.
#pragma once

#include <atomic>
#include <memory>
#include <string>
#include <thread>

#include "comm/communicator.h"

namespace pm {

class Heartbeat {
 public:
  // Collective over `world` (exchanges the listening addresses). timeout_s <= 0 or a single rank:
  // no heartbeat. If the ring cannot be formed (no route between ranks), says so once and runs
  // without it.
  Heartbeat(Communicator& world, double timeout_s);
  ~Heartbeat();  // says goodbye to the successor and stops
  Heartbeat(const Heartbeat&) = delete;
  Heartbeat& operator=(const Heartbeat&) = delete;
  bool active() const { return thread_.joinable(); }

 private:
  void run();
  [[noreturn]] void fail(const std::string& what);

  int rank_ = 0, predecessor_ = 0;
  double timeout_s_ = 0;
  int to_successor_ = -1, from_predecessor_ = -1;
  int wake_ = -1;  // an eventfd: the destructor's word to the thread to stop now
  std::atomic<bool> stop_{false};
  std::thread thread_;
};

}  // namespace pm
