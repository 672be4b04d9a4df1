#include "comm/bf16_allreduce.h"

#include <algorithm>
#include <vector>

#include "core/tensor.h"

namespace pm {

void allreduce_sum_bf16_wire(Communicator& comm, float* data, int64_t n) {
  const int P = comm.size();
  if (P == 1) return;  // nothing crosses a wire: the values stay as they are
  const int me = comm.rank();
  const int64_t slice = (n + P - 1) / P;  // rank r sums [r * slice, (r + 1) * slice) clipped to n
  auto count = [&](int r) { return std::clamp<int64_t>(n - r * slice, 0, slice); };
  std::vector<uint16_t> send(static_cast<std::size_t>(P * slice), 0), recv(static_cast<std::size_t>(P * slice), 0);
  floats_to_bf16(data, send.data(), n);
  std::vector<int64_t> send_counts(P), send_displs(P), recv_counts(P, count(me)), recv_displs(P);
  for (int r = 0; r < P; ++r) send_counts[r] = count(r), send_displs[r] = r * slice, recv_displs[r] = r * slice;
  comm.alltoallv(send.data(), send_counts, send_displs, recv.data(), recv_counts, recv_displs, DType::bf16);
  // this rank's slice, summed in rank order, into the first slice of `send` for the all-gather
  for (int64_t i = 0; i < count(me); ++i) {
    float sum = bf16_to_float(recv[i]);
    for (int r = 1; r < P; ++r) sum += bf16_to_float(recv[r * slice + i]);
    send[i] = float_to_bf16(sum);
  }
  comm.allgather(send.data(), recv.data(), slice, DType::bf16);
  for (int64_t i = 0; i < n; ++i) data[i] = bf16_to_float(recv[i]);
}

}  // namespace pm
