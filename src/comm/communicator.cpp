#include "comm/communicator.h"

#include <utility>

#include "core/error.h"

namespace pm {

Communicator::Communicator(std::shared_ptr<Waiter> waiter) : waiter_(std::move(waiter)) {
  PM_CHECK(waiter_ != nullptr, "a communicator needs a waiter");
}

void Communicator::alltoallv(const void* send, const std::vector<int64_t>& send_counts,
                             const std::vector<int64_t>& send_displs, void* recv,
                             const std::vector<int64_t>& recv_counts,
                             const std::vector<int64_t>& recv_displs, DType dtype) {
  waiter_->wait(*ialltoallv(send, send_counts, send_displs, recv, recv_counts, recv_displs, dtype));
}

void Communicator::allreduce(const void* send, void* recv, int64_t count, DType dtype, ReduceOp op) {
  waiter_->wait(*iallreduce(send, recv, count, dtype, op));
}

void Communicator::allgather(const void* send, void* recv, int64_t count, DType dtype) {
  waiter_->wait(*iallgather(send, recv, count, dtype));
}

void Communicator::broadcast(void* data, int64_t count, DType dtype, int root) {
  waiter_->wait(*ibroadcast(data, count, dtype, root));
}

void Communicator::barrier() { waiter_->wait(*ibarrier()); }

void Communicator::send(const void* data, int64_t count, DType dtype, int peer) {
  waiter_->wait(*isend(data, count, dtype, peer));
}

void Communicator::recv(void* data, int64_t count, DType dtype, int peer) {
  waiter_->wait(*irecv(data, count, dtype, peer));
}

std::string Communicator::broadcast_string(std::string value, int root) {
  int64_t length = static_cast<int64_t>(value.size());
  broadcast(&length, 1, DType::i64, root);
  std::string out = rank() == root ? std::move(value) : std::string(length, '\0');
  if (length > 0) broadcast(out.data(), length, DType::u8, root);
  return out;
}

double Communicator::allreduce_scalar(double value, ReduceOp op) {
  double out = 0;
  allreduce(&value, &out, 1, DType::f64, op);
  return out;
}

std::vector<std::string> Communicator::gather_strings(const std::string& mine, int root) {
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
        recv(all[r].data(), lengths[r], DType::u8, r);
    }
  } else if (my_len > 0) {
    send(mine.data(), my_len, DType::u8, root);
  }
  return all;
}

}  // namespace pm
