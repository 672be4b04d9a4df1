#include "comm/communicator.h"

#include <algorithm>
#include <chrono>
#include <thread>

#include "core/clock.h"
#include "core/error.h"

namespace pm {

CommRequest::CommRequest() : start_s(now_s()) {}

double CommRequest::wait(const WaitPolicy& policy, double expected_s) {
  int polls = 0;
  while (!test()) {
    double waited = now_s() - start_s;
    if (waited > policy.timeout_s) {
      abandon();
      throw Error(ErrorKind::comm,
                  fmt::format("{} did not finish in {:.0f} s: a peer rank is dead or stuck", what(),
                              policy.timeout_s));
    }
    double sleep_us = next_sleep_us(policy, waited, expected_s, polls);
    if (sleep_us <= 0) continue;
    ++polls;
    std::this_thread::sleep_for(std::chrono::duration<double, std::micro>(
        std::min(sleep_us, (policy.timeout_s - waited) * 1e6 + 1)));
  }
  return now_s() - start_s;
}

void Communicator::wait(CommRequest& request) {
  TransferModel& model = models_[static_cast<int>(request.op)];
  double seconds = request.wait(policy_, model.predict_s(request.wire_bytes));
  model.record(request.wire_bytes, seconds);
}

void Communicator::alltoallv(const void* send, const std::vector<int64_t>& send_counts,
                             const std::vector<int64_t>& send_displs, void* recv,
                             const std::vector<int64_t>& recv_counts,
                             const std::vector<int64_t>& recv_displs, DType dtype) {
  wait(*ialltoallv(send, send_counts, send_displs, recv, recv_counts, recv_displs, dtype));
}

void Communicator::allreduce(const void* send, void* recv, int64_t count, DType dtype, ReduceOp op) {
  wait(*iallreduce(send, recv, count, dtype, op));
}

void Communicator::allgather(const void* send, void* recv, int64_t count, DType dtype) {
  wait(*iallgather(send, recv, count, dtype));
}

void Communicator::send(const void* data, int64_t count, DType dtype, int peer, int tag) {
  wait(*isend(data, count, dtype, peer, tag));
}

void Communicator::recv(void* data, int64_t count, DType dtype, int peer, int tag) {
  wait(*irecv(data, count, dtype, peer, tag));
}

void Communicator::barrier() { wait(*ibarrier()); }

void Communicator::broadcast(void* data, int64_t count, DType dtype, int root) {
  wait(*ibroadcast(data, count, dtype, root));
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
