// Communicator: the only way the engine talks to other ranks. A transport, nothing more.
//
// A narrow interface in the spirit of gloo and NCCL: all-to-all with per-peer counts, all-reduce,
// all-gather, broadcast, barrier and point-to-point send/recv, each started without blocking and
// returning a request; and split(color, key) into sub-groups (data, expert, tensor, pipeline).
// Point-to-point messages carry no tag (NCCL has none): between two ranks of a group they arrive
// in the order they were sent. How a caller waits for a request (sleeping, spinning, the timeout
// that turns a dead peer into an error) is the Waiter's business (comm/waiter.h), not the
// transport's; the blocking forms below start an operation and hand it to the group's waiter.
//
// Backends: MPI (processes, any number of machines; comm/mpi_communicator.h) and ranks as threads
// of one process (comm/inprocess_communicator.h, for tests without mpirun); NCCL stands on either
// for its collectives on GPUs (comm/nccl_communicator.h).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "comm/waiter.h"
#include "core/tensor.h"

namespace pm {

enum class ReduceOp { sum, max, min };

class Communicator {
 public:
  explicit Communicator(std::shared_ptr<Waiter> waiter);
  virtual ~Communicator() = default;
  Communicator(const Communicator&) = delete;
  Communicator& operator=(const Communicator&) = delete;

  virtual int rank() const = 0;
  virtual int size() const = 0;
  virtual std::string backend() const = 0;
  // The machine this rank runs on (ranks with the same host share memory and cores).
  virtual std::string host() const = 0;

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
  virtual RequestPtr ibroadcast(void* data, int64_t count, DType dtype, int root) = 0;
  virtual RequestPtr ibarrier() = 0;
  virtual RequestPtr isend(const void* data, int64_t count, DType dtype, int peer) = 0;
  virtual RequestPtr irecv(void* data, int64_t count, DType dtype, int peer) = 0;

  // Collective: the ranks that pass the same color form a new group, ordered by key (ties by
  // rank in this group). The new group shares this one's waiter.
  virtual std::unique_ptr<Communicator> split(int color, int key) = 0;

  // Blocking forms: start, then wait with this group's waiter.
  void alltoallv(const void* send, const std::vector<int64_t>& send_counts,
                 const std::vector<int64_t>& send_displs, void* recv,
                 const std::vector<int64_t>& recv_counts, const std::vector<int64_t>& recv_displs,
                 DType dtype);
  void allreduce(const void* send, void* recv, int64_t count, DType dtype, ReduceOp op);
  void allgather(const void* send, void* recv, int64_t count, DType dtype);
  void broadcast(void* data, int64_t count, DType dtype, int root);
  void barrier();
  void send(const void* data, int64_t count, DType dtype, int peer);
  void recv(void* data, int64_t count, DType dtype, int peer);

  // Conveniences built on the primitives.
  double allreduce_scalar(double value, ReduceOp op);
  // Gathers every rank's bytes on root (other ranks get an empty vector).
  std::vector<std::string> gather_strings(const std::string& mine, int root);
  // Root's string on every rank.
  // (by value: a caller that moves a large string in, as checkpoint loading does, copies nothing)
  std::string broadcast_string(std::string value, int root);

  Waiter& waiter() { return *waiter_; }
  const std::shared_ptr<Waiter>& shared_waiter() const { return waiter_; }

 private:
  std::shared_ptr<Waiter> waiter_;
};

}  // namespace pm
