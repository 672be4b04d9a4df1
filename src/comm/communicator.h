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

#include "comm/wait_schedule.h"
#include "core/tensor.h"

namespace pm {

enum class ReduceOp { sum, max, min };

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

  // Waits for a request with this communicator's policy, sleeping through most of the transfer
  // time learned for its kind and size; then learns from it.
  void wait(CommRequest& request);

  WaitPolicy& wait_policy() { return policy_; }
  const WaitPolicy& wait_policy() const { return policy_; }
  const TransferModel& transfer_model(CommOp op) const { return models_[static_cast<int>(op)]; }

 private:
  WaitPolicy policy_;
  TransferModel models_[kNumCommOps];
};

}  // namespace pm
