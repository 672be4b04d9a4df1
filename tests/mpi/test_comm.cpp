// The MPI communicator on real ranks (run under mpirun with 2, 3 and 4 ranks). Payloads encode
// sender, receiver and position, so a routing mistake shows directly.
#include <gtest/gtest.h>

#include <numeric>

#include "comm/mpi_communicator.h"

namespace pm {
namespace {

Communicator* g_comm = nullptr;

float tag_value(int from, int to, int64_t i) { return static_cast<float>(from * 1000000 + to * 10000 + i); }

TEST(Comm, AllToAllWithUnevenCountsDeliversEachBlockToItsPlace) {
  Communicator& c = *g_comm;
  const int P = c.size(), me = c.rank();
  auto count = [](int from, int to) { return static_cast<int64_t>((from * 3 + to * 5) % 7); };  // some zero
  std::vector<int64_t> sc(P), sd(P), rc(P), rd(P);
  for (int q = 0; q < P; ++q) sc[q] = count(me, q), rc[q] = count(q, me);
  std::exclusive_scan(sc.begin(), sc.end(), sd.begin(), int64_t{0});
  std::exclusive_scan(rc.begin(), rc.end(), rd.begin(), int64_t{0});
  std::vector<float> send(sd.back() + sc.back()), recv(rd.back() + rc.back(), -1);
  for (int q = 0; q < P; ++q)
    for (int64_t i = 0; i < sc[q]; ++i) send[sd[q] + i] = tag_value(me, q, i);
  c.alltoallv(send.data(), sc, sd, recv.data(), rc, rd, DType::f32);
  for (int q = 0; q < P; ++q)
    for (int64_t i = 0; i < rc[q]; ++i) EXPECT_EQ(recv[rd[q] + i], tag_value(q, me, i));
}

TEST(Comm, AllReduceSumMaxMinInPlaceAndNot) {
  Communicator& c = *g_comm;
  const int P = c.size(), me = c.rank();
  std::vector<double> v = {1.0 * me, 2.0, -1.0 * me};
  std::vector<double> out(3);
  c.allreduce(v.data(), out.data(), 3, DType::f64, ReduceOp::sum);
  EXPECT_EQ(out[0], P * (P - 1) / 2.0);
  EXPECT_EQ(out[1], 2.0 * P);
  int64_t x = me * 10;
  c.allreduce(&x, &x, 1, DType::i64, ReduceOp::max);
  EXPECT_EQ(x, (P - 1) * 10);
  EXPECT_EQ(c.allreduce_scalar(me + 1.5, ReduceOp::min), 1.5);
  std::vector<float> f(1000, 0.25f);
  c.allreduce(f.data(), f.data(), 1000, DType::f32, ReduceOp::sum);
  for (float y : f) EXPECT_EQ(y, 0.25f * P);
}

TEST(Comm, AllGatherSendRecvBarrierGatherStrings) {
  Communicator& c = *g_comm;
  const int P = c.size(), me = c.rank();
  int32_t mine[2] = {me, me * me};
  std::vector<int32_t> all(2 * P);
  c.allgather(mine, all.data(), 2, DType::i32);
  for (int r = 0; r < P; ++r) EXPECT_EQ(all[2 * r + 1], r * r);

  // a ring: send to the next rank, receive from the previous
  std::vector<float> out(50), in(50);
  for (int i = 0; i < 50; ++i) out[i] = tag_value(me, (me + 1) % P, i);
  auto r = c.irecv(in.data(), 50, DType::f32, (me + P - 1) % P, 5);
  auto s = c.isend(out.data(), 50, DType::f32, (me + 1) % P, 5);
  s->wait(c.wait_policy());
  r->wait(c.wait_policy());
  for (int i = 0; i < 50; ++i) EXPECT_EQ(in[i], tag_value((me + P - 1) % P, me, i));
  c.barrier();

  auto strings = c.gather_strings(std::string(me + 1, 'a' + me), 0);
  if (me == 0) {
    ASSERT_EQ(static_cast<int>(strings.size()), P);
    for (int q = 0; q < P; ++q) EXPECT_EQ(strings[q], std::string(q + 1, 'a' + q));
  } else {
    EXPECT_TRUE(strings.empty());
  }
}

TEST(Comm, AWaitForAMessageThatNeverComesTimesOutWithAClearError) {
  Communicator& c = *g_comm;
  if (c.size() < 2 || c.rank() != 0) return;
  WaitPolicy quick = c.wait_policy();
  quick.timeout_s = 0.2;
  float never = 0;
  auto r = c.irecv(&never, 1, DType::f32, 1, 999);
  try {
    r->wait(quick);
    FAIL() << "the wait should have timed out";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::comm);
    EXPECT_NE(std::string(e.what()).find("did not finish"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace pm

int main(int argc, char** argv) {
  pm::MpiRuntime mpi(&argc, &argv);
  auto comm = pm::make_mpi_world_communicator();
  comm->wait_policy().timeout_s = 60;
  pm::g_comm = comm.get();
  ::testing::InitGoogleTest(&argc, argv);
  if (comm->rank() != 0) {
    auto& listeners = ::testing::UnitTest::GetInstance()->listeners();
    delete listeners.Release(listeners.default_result_printer());
  }
  int failed = RUN_ALL_TESTS();
  // every rank exits with the worst result so that mpirun reports a failure anywhere
  int64_t worst = failed;
  comm->allreduce(&worst, &worst, 1, pm::DType::i64, pm::ReduceOp::max);
  return static_cast<int>(worst);
}
