// Communicator: the only way the engine talks to other ranks.
//
// A narrow interface in the spirit of gloo: all-to-all with per-peer counts, all-reduce,
// all-gather, send/recv and barrier, each with a non-blocking form that returns a request. Every
// wait is bounded by a timeout, so a dead or stuck peer ends the run with a message instead of a
// hang. Backends: MPI (CPU ranks, any number of machines); NCCL would sit beside it for GPUs.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "core/tensor.h"

namespace pm {

enum class ReduceOp { sum, max, min };

// How a waiting thread spends its time. MPI implementations busy-poll in their blocking calls; on
// a CPU rank that steals the core the compute lane needs. We test, then sleep for a fraction of
// the time already waited (between min_sleep_us and max_sleep_us), so polling costs at most a
// few percent of a core while adding at most ~1/fraction latency.
struct WaitPolicy {
  double spin_us = 30;       // test back-to-back this long first: short transfers finish here
  double min_sleep_us = 10;
  double max_sleep_us = 500;
  double sleep_fraction = 1.0 / 32;
  double timeout_s = 600;    // then fail: a peer is dead or stuck
};

class CommRequest {
 public:
  virtual ~CommRequest() = default;
  // Makes progress; true once the operation is complete (then buffers may be reused).
  virtual bool test() = 0;
  // What this request is, for the timeout message.
  virtual std::string what() const = 0;
  // Gives up on an operation that will never finish (its peer is gone): the request must not
  // block on it when destroyed. The job is about to be aborted.
  virtual void abandon() = 0;
  // Tests with the wait policy's sleeps until complete; throws a comm error after the timeout.
  void wait(const WaitPolicy& policy);
};
using RequestPtr = std::unique_ptr<CommRequest>;

class Communicator {
 public:
  virtual ~Communicator() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  virtual std::string backend() const = 0;

  // counts and displacements are in elements of dtype, one per peer.
  virtual RequestPtr ialltoallv(const void* send, const std::vector<int64_t>& send_counts,
                                const std::vector<int64_t>& send_displs, void* recv,
                                const std::vector<int64_t>& recv_counts,
                                const std::vector<int64_t>& recv_displs, DType dtype) = 0;
  // In place when send == recv.
  virtual RequestPtr iallreduce(const void* send, void* recv, int64_t count, DType dtype,
                                ReduceOp op) = 0;
  // recv holds size() * count elements, rank r's block at r * count.
  virtual RequestPtr iallgather(const void* send, void* recv, int64_t count, DType dtype) = 0;
  virtual RequestPtr isend(const void* data, int64_t count, DType dtype, int peer, int tag) = 0;
  virtual RequestPtr irecv(void* data, int64_t count, DType dtype, int peer, int tag) = 0;
  virtual RequestPtr ibarrier() = 0;
  virtual RequestPtr ibroadcast(void* data, int64_t count, DType dtype, int root) = 0;

  // Blocking forms: start, then wait with this communicator's policy.
  void alltoallv(const void* send, const std::vector<int64_t>& send_counts,
                 const std::vector<int64_t>& send_displs, void* recv,
                 const std::vector<int64_t>& recv_counts, const std::vector<int64_t>& recv_displs,
                 DType dtype);
  void allreduce(const void* send, void* recv, int64_t count, DType dtype, ReduceOp op);
  void allgather(const void* send, void* recv, int64_t count, DType dtype);
  void send(const void* data, int64_t count, DType dtype, int peer, int tag);
  void recv(void* data, int64_t count, DType dtype, int peer, int tag);
  void barrier();
  void broadcast(void* data, int64_t count, DType dtype, int root);

  // Conveniences built on the primitives.
  double allreduce_scalar(double value, ReduceOp op);
  // Gathers every rank's bytes on root (other ranks get an empty vector).
  std::vector<std::string> gather_strings(const std::string& mine, int root);
  // Root's string on every rank.
  std::string broadcast_string(const std::string& value, int root);

  WaitPolicy& wait_policy() { return policy_; }
  const WaitPolicy& wait_policy() const { return policy_; }

 private:
  WaitPolicy policy_;
};

}  // namespace pm
