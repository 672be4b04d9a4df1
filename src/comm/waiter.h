// Requests for operations in flight, and the Waiter that waits for them.
//
// A transport (Communicator) starts operations and answers test(); how a thread spends the time
// until one completes is a policy of its own: on a CPU rank every core is computing, so the
// waiting thread sleeps through most of a transfer (comm/wait_schedule.h), and gives up after a
// timeout so that a dead or stuck peer ends the run with a message instead of a hang. A GPU
// transport would wait on a stream event instead and could share nothing of this.
#pragma once

#include <memory>
#include <string>

#include "comm/wait_schedule.h"

namespace pm {

// Kinds of transfer whose durations are learned apart (see TransferModel).
enum class CommOp { all_to_all, all_reduce, other };
constexpr int kNumCommOps = 3;

class CommRequest {
 public:
  CommRequest();
  virtual ~CommRequest() = default;
  // Makes progress; true once the operation is complete (then buffers may be reused).
  virtual bool test() = 0;
  // What this request is, for the timeout message.
  virtual std::string what() const = 0;
  // Gives up on an operation that will never finish (its peer is gone): the request must not
  // block on it when destroyed. The job is about to be aborted.
  virtual void abandon() = 0;
  // Tests with the policy's sleeps until complete (expected_s: predicted duration from the start,
  // 0 if unknown); throws a comm error after the timeout. Returns seconds since the start.
  double wait(const WaitPolicy& policy, double expected_s = 0);

  CommOp op = CommOp::other;
  double wire_bytes = 0;  // the most bytes this rank sends to, or receives from, other ranks
  double start_s = 0;     // when the operation was started
};
using RequestPtr = std::unique_ptr<CommRequest>;

// Waits for requests with one policy, learning each kind's transfer time from the ones it waited
// for. One per rank, shared by every group split from the rank's world; used by one thread at a
// time (the lane that talks to the network).
class Waiter {
 public:
  explicit Waiter(WaitPolicy policy = {}) : policy_(policy) {}
  // Sleeps through most of the transfer time learned for the request's kind and size; then
  // learns from it.
  void wait(CommRequest& request);

  WaitPolicy& policy() { return policy_; }
  const WaitPolicy& policy() const { return policy_; }
  const TransferModel& transfer_model(CommOp op) const { return models_[static_cast<int>(op)]; }

 private:
  WaitPolicy policy_;
  TransferModel models_[kNumCommOps];
};

}  // namespace pm
