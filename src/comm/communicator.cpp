#include "comm/communicator.h"

#include <algorithm>
#include <chrono>
#include <thread>

#include "core/clock.h"
#include "core/error.h"

namespace pm {

void CommRequest::wait(const WaitPolicy& policy) {
  const double start = now_s();
  while (!test()) {
    double waited = now_s() - start;
    if (waited > policy.timeout_s) {
      abandon();
      throw Error(ErrorKind::comm,
                  fmt::format("{} did not finish in {:.0f} s: a peer rank is dead or stuck", what(),
                              policy.timeout_s));
    }
    if (waited * 1e6 < policy.spin_us) continue;
    double sleep_us = std::clamp(waited * 1e6 * policy.sleep_fraction, policy.min_sleep_us,
                                 policy.max_sleep_us);
    std::this_thread::sleep_for(std::chrono::duration<double, std::micro>(sleep_us));
  }
}

void Communicator::alltoallv(const void* send, const std::vector<int64_t>& send_counts,
                             const std::vector<int64_t>& send_displs, void* recv,
                             const std::vector<int64_t>& recv_counts,
                             const std::vector<int64_t>& recv_displs, DType dtype) {
  ialltoallv(send, send_counts, send_displs, recv, recv_counts, recv_displs, dtype)->wait(policy_);
}

void Communicator::allreduce(const void* send, void* recv, int64_t count, DType dtype, ReduceOp op) {
  iallreduce(send, recv, count, dtype, op)->wait(policy_);
}

void Communicator::allgather(const void* send, void* recv, int64_t count, DType dtype) {
  iallgather(send, recv, count, dtype)->wait(policy_);
}

void Communicator::send(const void* data, int64_t count, DType dtype, int peer, int tag) {
  isend(data, count, dtype, peer, tag)->wait(policy_);
}

void Communicator::recv(void* data, int64_t count, DType dtype, int peer, int tag) {
  irecv(data, count, dtype, peer, tag)->wait(policy_);
}

void Communicator::barrier() { ibarrier()->wait(policy_); }

void Communicator::broadcast(void* data, int64_t count, DType dtype, int root) {
  ibroadcast(data, count, dtype, root)->wait(policy_);
}

std::string Communicator::broadcast_string(const std::string& value, int root) {
  int64_t length = static_cast<int64_t>(value.size());
  broadcast(&length, 1, DType::i64, root);
  std::string out = rank() == root ? value : std::string(length, '\0');
  if (length > 0) broadcast(out.data(), length, DType::u8, root);
  return out;
}

double Communicator::allreduce_scalar(double value, ReduceOp op) {
  double out = 0;
  allreduce(&value, &out, 1, DType::f64, op);
  return out;
}

std::vector<std::string> Communicator::gather_strings(const std::string& mine, int root) {
  const int tag = 7001;
  int64_t my_len = static_cast<int64_t>(mine.size());
  std::vector<int64_t> lengths(size());
  allgather(&my_len, lengths.data(), 1, DType::i64);
  std::vector<std::string> all;
  if (rank() == root) {
    all.resize(size());
    for (int r = 0; r < size(); ++r) {
      all[r].resize(lengths[r]);
      if (r == root)
        all[r] = mine;
      else if (lengths[r] > 0)
        recv(all[r].data(), lengths[r], DType::u8, r, tag);
    }
  } else if (my_len > 0) {
    send(mine.data(), my_len, DType::u8, root, tag);
  }
  return all;
}

}  // namespace pm
