// The MPI communicator on real ranks (run under mpirun with 2, 3 and 4 ranks): the cases every
// backend must pass (comm_cases.h).
#include "comm/mpi_communicator.h"
#include "comm_cases.h"

namespace pm {
namespace {

Communicator* g_comm = nullptr;

TEST(MpiComm, AllToAllWithUnevenCountsDeliversEachBlockToItsPlace) { comm_cases::all_to_all_with_uneven_counts(*g_comm); }
TEST(MpiComm, AllReduceSumMaxMinInPlaceAndNot) { comm_cases::all_reduce_sum_max_min(*g_comm); }
TEST(MpiComm, Bf16WireSumIsTheRankOrderSumOfRoundings) {
  comm_cases::bf16_wire_sum_is_the_rank_order_sum_of_roundings(*g_comm);
}
TEST(MpiComm, AllGatherBroadcastSendRecvBarrierGatherStrings) {
  comm_cases::all_gather_broadcast_send_recv_barrier(*g_comm);
}
TEST(MpiComm, SplitIntoGroupsThatCommunicateOnTheirOwn) { comm_cases::split_into_groups(*g_comm); }
TEST(MpiComm, AWaitForAMessageThatNeverComesTimesOutWithAClearError) {
  if (g_comm->size() < 2) GTEST_SKIP() << "needs a second rank that never sends";
  comm_cases::a_wait_for_a_message_that_never_comes_times_out(*g_comm);
}

}  // namespace
}  // namespace pm

int main(int argc, char** argv) {
  pm::MpiRuntime mpi(&argc, &argv);
  auto comm = pm::make_mpi_world_communicator();
  comm->waiter().policy().timeout_s = 60;
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
