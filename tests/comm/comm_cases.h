// What every Communicator backend must do, as functions of one rank's communicator: run by
// tests/comm/test_comm_mpi.cpp on real MPI ranks (2, 3, 4 under mpirun) and by
// tests/comm/test_comm_inprocess.cpp on ranks as threads (1, 2, 3, 4, 7). Payloads encode sender,
// receiver and position, so a routing mistake shows directly. gtest's EXPECT is thread-safe.
#pragma once

#include <gtest/gtest.h>

#include <cmath>
#include <numeric>
#include <string>
#include <vector>

#include "comm/bf16_allreduce.h"
#include "comm/communicator.h"
#include "core/error.h"

namespace pm::comm_cases {

inline float tag_value(int from, int to, int64_t i) { return static_cast<float>(from * 1000000 + to * 10000 + i); }

inline void all_to_all_with_uneven_counts(Communicator& c) {
  const int P = c.size(), me = c.rank();
  auto count = [](int from, int to) { return static_cast<int64_t>((from * 3 + to * 5) % 7); };  // some zero
  std::vector<int64_t> sc(P), sd(P), rc(P), rd(P);
  for (int q = 0; q < P; ++q) sc[q] = count(me, q), rc[q] = count(q, me);
  std::exclusive_scan(sc.begin(), sc.end(), sd.begin(), int64_t{0});
  std::exclusive_scan(rc.begin(), rc.end(), rd.begin(), int64_t{0});
  std::vector<float> send(sd.back() + sc.back() + 1), recv(rd.back() + rc.back() + 1, -1);
  for (int q = 0; q < P; ++q)
    for (int64_t i = 0; i < sc[q]; ++i) send[sd[q] + i] = tag_value(me, q, i);
  c.alltoallv(send.data(), sc, sd, recv.data(), rc, rd, DType::f32);
  for (int q = 0; q < P; ++q)
    for (int64_t i = 0; i < rc[q]; ++i) EXPECT_EQ(recv[rd[q] + i], tag_value(q, me, i));
}

inline void all_reduce_sum_max_min(Communicator& c) {
  const int P = c.size(), me = c.rank();
  std::vector<double> v = {1.0 * me, 2.0, -1.0 * me};
  std::vector<double> out(3);
  c.allreduce(v.data(), out.data(), 3, DType::f64, ReduceOp::sum);
  EXPECT_EQ(out[0], P * (P - 1) / 2.0);
  EXPECT_EQ(out[1], 2.0 * P);
  EXPECT_EQ(out[2], -P * (P - 1) / 2.0);
  int64_t x = me * 10;
  c.allreduce(&x, &x, 1, DType::i64, ReduceOp::max);
  EXPECT_EQ(x, (P - 1) * 10);
  EXPECT_EQ(c.allreduce_scalar(me + 1.5, ReduceOp::min), 1.5);
  std::vector<float> f(1000, 0.25f);
  c.allreduce(f.data(), f.data(), 1000, DType::f32, ReduceOp::sum);
  for (float y : f) EXPECT_EQ(y, 0.25f * P);
}

// The bf16-wire sum (comm/bf16_allreduce.h): every element is bf16 of the float32 sum, in rank
// order, of every rank's value rounded to bf16; the same bits on every rank; lengths that do not
// divide by the ranks (and shorter than the ranks) work. Every rank can draw every rank's input.
inline void bf16_wire_sum_is_the_rank_order_sum_of_roundings(Communicator& c) {
  const int P = c.size(), me = c.rank();
  auto value = [](int rank, int64_t i) {  // values whose bf16 roundings and sums round visibly
    return static_cast<float>(std::sin(0.37 * i + 1.3 * rank) * (1 + rank) + 1e-3 * i);
  };
  for (int64_t n : {int64_t{1}, int64_t{P + 1}, int64_t{1000}, int64_t{1001}}) {
    std::vector<float> data(n);
    for (int64_t i = 0; i < n; ++i) data[i] = value(me, i);
    allreduce_sum_bf16_wire(c, data.data(), n);
    int64_t differ = 0;
    for (int64_t i = 0; i < n; ++i) {
      float want = value(0, i);
      if (P > 1) {
        want = round_to_bf16(want);
        for (int r = 1; r < P; ++r) want += round_to_bf16(value(r, i));
        want = round_to_bf16(want);
      }
      differ += data[i] != want;
    }
    EXPECT_EQ(differ, 0) << "n " << n << " rank " << me;
  }
}

inline void all_gather_broadcast_send_recv_barrier(Communicator& c) {
  const int P = c.size(), me = c.rank();
  int32_t mine[2] = {me, me * me};
  std::vector<int32_t> all(2 * P);
  c.allgather(mine, all.data(), 2, DType::i32);
  for (int r = 0; r < P; ++r) EXPECT_EQ(all[2 * r + 1], r * r);

  for (int root = 0; root < P; ++root) {
    std::vector<float> data(33, -1.0f);
    if (me == root)
      for (int i = 0; i < 33; ++i) data[i] = tag_value(root, 0, i);
    c.broadcast(data.data(), 33, DType::f32, root);
    for (int i = 0; i < 33; ++i) EXPECT_EQ(data[i], tag_value(root, 0, i)) << "root " << root;
  }
  EXPECT_EQ(c.broadcast_string(me == P - 1 ? "from the last rank" : "", P - 1), "from the last rank");

  if (P > 1) {
    // a ring, two messages each way: they arrive in the order sent (there are no tags)
    std::vector<float> out1(50), out2(20), in1(50), in2(20);
    for (int i = 0; i < 50; ++i) out1[i] = tag_value(me, (me + 1) % P, i);
    for (int i = 0; i < 20; ++i) out2[i] = tag_value(me, (me + 1) % P, 100 + i);
    auto r1 = c.irecv(in1.data(), 50, DType::f32, (me + P - 1) % P);
    auto r2 = c.irecv(in2.data(), 20, DType::f32, (me + P - 1) % P);
    auto s1 = c.isend(out1.data(), 50, DType::f32, (me + 1) % P);
    auto s2 = c.isend(out2.data(), 20, DType::f32, (me + 1) % P);
    c.waiter().wait(*s1);
    c.waiter().wait(*s2);
    c.waiter().wait(*r2);  // waited for out of order: still the second message
    c.waiter().wait(*r1);
    for (int i = 0; i < 50; ++i) EXPECT_EQ(in1[i], tag_value((me + P - 1) % P, me, i));
    for (int i = 0; i < 20; ++i) EXPECT_EQ(in2[i], tag_value((me + P - 1) % P, me, 100 + i));
  }
  c.barrier();

  auto strings = c.gather_strings(std::string(me + 1, 'a' + me), 0);
  if (me == 0) {
    ASSERT_EQ(static_cast<int>(strings.size()), P);
    for (int q = 0; q < P; ++q) EXPECT_EQ(strings[q], std::string(q + 1, 'a' + q));
  } else {
    EXPECT_TRUE(strings.empty());
  }
}

// Groups as a layout would make them: pairs of neighbours (tensor groups), and ranks with the same
// position in their pair (data groups), the latter ordered backwards by key.
inline void split_into_groups(Communicator& c) {
  const int P = c.size(), me = c.rank();
  auto pair = c.split(me / 2, me);
  const int pair_size = std::min(2, P - me / 2 * 2);
  EXPECT_EQ(pair->size(), pair_size);
  EXPECT_EQ(pair->rank(), me % 2);
  // the all-reduce sums over the pair only
  EXPECT_EQ(pair->allreduce_scalar(me, ReduceOp::sum), pair_size == 2 ? (me / 2 * 2) * 2 + 1 : me);

  auto column = c.split(me % 2, -me);  // key -me: the highest rank first
  const int column_size = (P - me % 2 + 1) / 2;
  EXPECT_EQ(column->size(), column_size);
  std::vector<int32_t> members(column_size);
  int32_t world_rank = me;
  column->allgather(&world_rank, members.data(), 1, DType::i32);
  for (int i = 0; i + 1 < column_size; ++i) EXPECT_GT(members[i], members[i + 1]);
  EXPECT_EQ(members[column->rank()], me);

  // an all-to-all and point-to-point inside the group, the world untouched
  all_to_all_with_uneven_counts(*column);
  all_gather_broadcast_send_recv_barrier(*pair);
  // a group of a group
  auto alone = column->split(column->rank(), 0);
  EXPECT_EQ(alone->size(), 1);
  EXPECT_EQ(alone->allreduce_scalar(7.0, ReduceOp::sum), 7.0);
  c.barrier();
}

// Needs two ranks or more (callers skip it on one); rank 0 waits for rank 1, which sends nothing.
inline void a_wait_for_a_message_that_never_comes_times_out(Communicator& c) {
  if (c.rank() != 0) return;
  WaitPolicy quick = c.waiter().policy();
  quick.timeout_s = 0.2;
  float never = 0;
  auto r = c.irecv(&never, 1, DType::f32, 1);
  try {
    r->wait(quick);
    FAIL() << "the wait should have timed out";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::comm);
    EXPECT_NE(std::string(e.what()).find("did not finish"), std::string::npos) << e.what();
  }
}

}  // namespace pm::comm_cases
