// The NCCL transport's cases, against the transport it stands on: ranks as threads, each
// collective on the NCCL communicator and on the in-process one with the same inputs, compared
// byte for byte (float sums of small whole numbers, exact in any order). Included by the GPU test
// (tests/unit/test_cuda_backend.cpp, suite NcclTransport: one GPU per rank, so as many ranks as
// the machine has GPUs; skipped without) and by the emulation (tests/cuda_emulation, suite
// NcclEmulated: the same code on the fake CUDA runtime and the fake NCCL, 1 to 4 ranks).
// Define PM_NCCL_TEST_SUITE, PM_NCCL_MAX_RANKS() and PM_NCCL_NO_MISUSE() (what else to expect
// after each case: the emulation counts the fakes' misuses) before including.
#pragma once

#include <gtest/gtest.h>

#include <cstring>
#include <string>
#include <vector>

#include "comm/inprocess_communicator.h"
#include "comm/nccl_communicator.h"
#include "core/rng.h"

namespace pm::nccl_cases {

// Small whole numbers as floats: sums come out exact whatever the order of the terms.
std::vector<float> whole_numbers(int64_t n, uint64_t stream) {
  Rng rng(11, stream);
  std::vector<float> v(n);
  for (float& x : v) x = static_cast<float>(static_cast<int>(rng.uniform() * 200) - 100);
  return v;
}

template <typename T>
bool same_bytes(const std::vector<T>& a, const std::vector<T>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0;
}

// Every collective of the interface on `nccl` and on `host` (the same ranks), alike.
void check_collectives(Communicator& host, Communicator& nccl, uint64_t seed) {
  const int P = host.size(), me = host.rank();
  ASSERT_EQ(nccl.size(), P);
  ASSERT_EQ(nccl.rank(), me);
  EXPECT_EQ(nccl.backend(), "nccl");
  EXPECT_EQ(nccl.host(), host.host());

  // all-to-all with uneven counts, zeros among them, and a gap between the blocks it receives
  auto count = [&](int from, int to) { return static_cast<int64_t>((from * 7 + to * 3 + seed) % 5) * 3; };
  std::vector<int64_t> sc(P), sd(P), rc(P), rd(P);
  int64_t s_total = 0, r_total = 0;
  for (int p = 0; p < P; ++p) {
    sc[p] = count(me, p), sd[p] = s_total, s_total += sc[p];
    rc[p] = count(p, me), rd[p] = r_total + 1, r_total += rc[p] + 1;  // one element left between blocks
  }
  const std::vector<float> send = whole_numbers(std::max<int64_t>(s_total, 1), seed * 16 + me);
  std::vector<float> via_host(r_total + 1, -7.0f), via_nccl(r_total + 1, -7.0f);
  host.alltoallv(send.data(), sc, sd, via_host.data(), rc, rd, DType::f32);
  nccl.alltoallv(send.data(), sc, sd, via_nccl.data(), rc, rd, DType::f32);
  EXPECT_TRUE(same_bytes(via_host, via_nccl)) << "all-to-all, rank " << me;

  // all-reduce: float sum (apart and in place), double max, int64 min
  const std::vector<float> x = whole_numbers(1000, seed * 16 + 8 + me);
  std::vector<float> sum_host(x.size()), sum_nccl(x.size()), in_place = x;
  host.allreduce(x.data(), sum_host.data(), 1000, DType::f32, ReduceOp::sum);
  nccl.allreduce(x.data(), sum_nccl.data(), 1000, DType::f32, ReduceOp::sum);
  nccl.allreduce(in_place.data(), in_place.data(), 1000, DType::f32, ReduceOp::sum);
  EXPECT_TRUE(same_bytes(sum_host, sum_nccl)) << "all-reduce sum, rank " << me;
  EXPECT_TRUE(same_bytes(sum_host, in_place)) << "all-reduce sum in place, rank " << me;
  std::vector<double> d = {1.5 * me, -2.0 * me, 3.25};
  std::vector<double> d_host = d;
  host.allreduce(d_host.data(), d_host.data(), 3, DType::f64, ReduceOp::max);
  nccl.allreduce(d.data(), d.data(), 3, DType::f64, ReduceOp::max);
  EXPECT_TRUE(same_bytes(d_host, d)) << "all-reduce max, rank " << me;
  std::vector<int64_t> i = {static_cast<int64_t>(me) - 5, 40 - me};
  std::vector<int64_t> i_host = i;
  host.allreduce(i_host.data(), i_host.data(), 2, DType::i64, ReduceOp::min);
  nccl.allreduce(i.data(), i.data(), 2, DType::i64, ReduceOp::min);
  EXPECT_TRUE(same_bytes(i_host, i)) << "all-reduce min, rank " << me;
  EXPECT_EQ(nccl.allreduce_scalar(me + 1.0, ReduceOp::sum), P * (P + 1) / 2.0);

  // all-gather, broadcast from the last rank, the string helpers built on them, a barrier
  const std::vector<float> mine = whole_numbers(33, seed * 16 + 12 + me);
  std::vector<float> all_host(33 * P), all_nccl(33 * P);
  host.allgather(mine.data(), all_host.data(), 33, DType::f32);
  nccl.allgather(mine.data(), all_nccl.data(), 33, DType::f32);
  EXPECT_TRUE(same_bytes(all_host, all_nccl)) << "all-gather, rank " << me;
  std::vector<float> b = me == P - 1 ? mine : std::vector<float>(33, 0.0f);
  nccl.broadcast(b.data(), 33, DType::f32, P - 1);
  EXPECT_TRUE(same_bytes(b, std::vector<float>(all_host.end() - 33, all_host.end()))) << "broadcast, rank " << me;
  EXPECT_EQ(nccl.broadcast_string(me == 0 ? "from rank 0" : "", 0), "from rank 0");
  nccl.barrier();
}

// Several operations in flight at once, finished in reverse order: each keeps its own staging.
void check_in_flight(Communicator& nccl) {
  const int P = nccl.size(), me = nccl.rank();
  std::vector<std::vector<float>> bufs;
  std::vector<RequestPtr> requests;
  for (int k = 0; k < 3; ++k) bufs.push_back(std::vector<float>(50 + k, static_cast<float>(me + k)));
  for (int k = 0; k < 3; ++k)
    requests.push_back(nccl.iallreduce(bufs[k].data(), bufs[k].data(), 50 + k, DType::f32, ReduceOp::sum));
  for (int k = 2; k >= 0; --k) nccl.waiter().wait(*requests[k]);
  for (int k = 0; k < 3; ++k)
    EXPECT_EQ(bufs[k], std::vector<float>(50 + k, static_cast<float>(P * (P - 1) / 2 + P * k))) << "request " << k;
}

// A sub-group (split) of the NCCL communicator: its own NCCL communicator, the host's ranks.
void check_split(Communicator& host, Communicator& nccl) {
  const int me = host.rank();
  std::unique_ptr<Communicator> half_host = host.split(me % 2, -me), half_nccl = nccl.split(me % 2, -me);
  EXPECT_EQ(half_nccl->backend(), "nccl");
  EXPECT_EQ(half_nccl->rank(), half_host->rank());
  EXPECT_EQ(half_nccl->size(), half_host->size());
  check_collectives(*half_host, *half_nccl, 3);
}

void check_transport(int ranks) {
  run_ranks_in_process(ranks, [](Communicator& host) {
    std::unique_ptr<Communicator> nccl = make_nccl_communicator(host);
    for (uint64_t seed = 0; seed < 3; ++seed) check_collectives(host, *nccl, seed);
    check_in_flight(*nccl);
    check_split(host, *nccl);
    // point-to-point goes through the host transport: a ring, every rank sending and receiving
    const int P = host.size(), me = host.rank();
    if (P == 1) return;  // (no peer)
    const float out = static_cast<float>(me);
    float in = -1;
    RequestPtr s = nccl->isend(&out, 1, DType::f32, (me + 1) % P), r = nccl->irecv(&in, 1, DType::f32, (me + P - 1) % P);
    nccl->waiter().wait(*s);
    nccl->waiter().wait(*r);
    EXPECT_EQ(in, static_cast<float>((me + P - 1) % P));
  });
}

#define PM_NCCL_CASE(ranks)                                                                 \
  TEST(PM_NCCL_TEST_SUITE, CollectivesMatchTheHostTransportOn##ranks##Ranks) {              \
    std::string why;                                                                        \
    if (!nccl_available(&why)) GTEST_SKIP() << "no NCCL transport here: " << why;           \
    if (ranks > PM_NCCL_MAX_RANKS()) GTEST_SKIP() << "needs " << ranks << " GPUs (one per rank)"; \
    check_transport(ranks);                                                                 \
    PM_NCCL_NO_MISUSE();                                                                    \
  }
PM_NCCL_CASE(1)
PM_NCCL_CASE(2)
PM_NCCL_CASE(3)
PM_NCCL_CASE(4)
#undef PM_NCCL_CASE

}  // namespace pm::nccl_cases
