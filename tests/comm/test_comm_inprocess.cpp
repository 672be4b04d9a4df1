// The in-process communicator (ranks as threads): the cases every backend must pass
// (comm_cases.h) on 1, 2, 3, 4 and 7 ranks, and what only it promises: a rank that fails ends the
// others' waits at once.
#include <chrono>

#include "comm/inprocess_communicator.h"
#include "comm_cases.h"
#include "core/clock.h"

namespace pm {
namespace {

class InProcessComm : public ::testing::TestWithParam<int> {
 protected:
  void run(const std::function<void(Communicator&)>& body) {
    WaitPolicy policy;
    policy.timeout_s = 30;
    run_ranks_in_process(GetParam(), body, policy);
  }
};

TEST_P(InProcessComm, AllToAllWithUnevenCountsDeliversEachBlockToItsPlace) { run(comm_cases::all_to_all_with_uneven_counts); }
TEST_P(InProcessComm, AllReduceSumMaxMinInPlaceAndNot) { run(comm_cases::all_reduce_sum_max_min); }
TEST_P(InProcessComm, Bf16WireSumIsTheRankOrderSumOfRoundings) {
  run(comm_cases::bf16_wire_sum_is_the_rank_order_sum_of_roundings);
}
TEST_P(InProcessComm, AllGatherBroadcastSendRecvBarrierGatherStrings) {
  run(comm_cases::all_gather_broadcast_send_recv_barrier);
}
TEST_P(InProcessComm, SplitIntoGroupsThatCommunicateOnTheirOwn) { run(comm_cases::split_into_groups); }
TEST_P(InProcessComm, AWaitForAMessageThatNeverComesTimesOutWithAClearError) {
  if (GetParam() < 2) GTEST_SKIP() << "needs a second rank that never sends";
  run(comm_cases::a_wait_for_a_message_that_never_comes_times_out);
}

INSTANTIATE_TEST_SUITE_P(Ranks, InProcessComm, ::testing::Values(1, 2, 3, 4, 7),
                         [](const ::testing::TestParamInfo<int>& info) { return std::to_string(info.param) + "_ranks"; });

TEST(InProcessCommFailure, ARankThatThrowsEndsTheOthersWaitsAtOnceAndItsErrorComesBack) {
  const double start = now_s();
  try {
    run_ranks_in_process(3, [](Communicator& c) {
      if (c.rank() == 1) throw Error(ErrorKind::io, "rank one cannot read its file");
      c.barrier();  // ranks 0 and 2 would wait here for rank 1 forever
    });
    FAIL() << "the run should have failed";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::io);
    EXPECT_STREQ(e.what(), "rank one cannot read its file");
  }
  EXPECT_LT(now_s() - start, 60.0);  // long before the 600 s timeout
}

TEST(InProcessCommFailure, CollectivesCalledInADifferentOrderAreAnError) {
  EXPECT_THROW(run_ranks_in_process(2,
                                    [](Communicator& c) {
                                      if (c.rank() == 0) c.barrier();
                                      else c.allreduce_scalar(1.0, ReduceOp::sum);
                                    }),
               Error);
}

}  // namespace
}  // namespace pm
