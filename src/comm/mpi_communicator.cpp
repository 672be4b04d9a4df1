#include "comm/mpi_communicator.h"

#include <mpi.h>

#include <algorithm>
#include <climits>
#include <cstdlib>

#include "core/error.h"

namespace pm {
namespace {

#define MPI_CHECK(call)                                                                    \
  do {                                                                                     \
    int mpi_status_ = (call);                                                              \
    if (mpi_status_ != MPI_SUCCESS) {                                                      \
      char mpi_text_[MPI_MAX_ERROR_STRING];                                                \
      int mpi_len_ = 0;                                                                    \
      MPI_Error_string(mpi_status_, mpi_text_, &mpi_len_);                                 \
      throw Error(ErrorKind::comm, fmt::format("{}:{}: {} failed: {}", __FILE__, __LINE__, \
                                               #call, std::string(mpi_text_, mpi_len_)));  \
    }                                                                                      \
  } while (0)

MPI_Datatype mpi_type(DType dtype) {
  switch (dtype) {
    case DType::f32: return MPI_FLOAT;
    case DType::f64: return MPI_DOUBLE;
    case DType::bf16: return MPI_UINT16_T;
    case DType::i32: return MPI_INT32_T;
    case DType::i64: return MPI_INT64_T;
    case DType::u8: return MPI_UINT8_T;
  }
  return MPI_DATATYPE_NULL;
}

MPI_Op mpi_op(ReduceOp op) {
  switch (op) {
    case ReduceOp::sum: return MPI_SUM;
    case ReduceOp::max: return MPI_MAX;
    case ReduceOp::min: return MPI_MIN;
  }
  return MPI_OP_NULL;
}

int as_int(int64_t value, const char* what) {
  PM_CHECK(value >= 0 && value <= INT_MAX, "{} = {} does not fit MPI's int counts", what, value);
  return static_cast<int>(value);
}

std::vector<int> as_ints(const std::vector<int64_t>& values, const char* what) {
  std::vector<int> out(values.size());
  for (std::size_t i = 0; i < values.size(); ++i) out[i] = as_int(values[i], what);
  return out;
}

// One MPI request; keeps the int count arrays alive as long as MPI may read them.
class MpiRequest : public CommRequest {
 public:
  explicit MpiRequest(std::string what) : what_(std::move(what)) {}
  ~MpiRequest() override {
    // A request dropped unfinished would leave MPI writing into freed memory: finish it.
    if (request_ != MPI_REQUEST_NULL && !abandoned_) MPI_Wait(&request_, MPI_STATUS_IGNORE);
  }
  void abandon() override {
    // Cancel what can be cancelled (receives) and let MPI free the request when it is done.
    if (request_ != MPI_REQUEST_NULL) {
      MPI_Cancel(&request_);
      MPI_Request_free(&request_);
    }
    abandoned_ = true;
  }
  bool test() override {
    if (request_ == MPI_REQUEST_NULL) return true;
    int done = 0;
    MPI_CHECK(MPI_Test(&request_, &done, MPI_STATUS_IGNORE));
    return done != 0;
  }
  std::string what() const override { return what_; }

  MPI_Request request_ = MPI_REQUEST_NULL;
  std::vector<int> counts_[4];

 private:
  std::string what_;
  bool abandoned_ = false;
};

// Point-to-point messages of the engine all use this tag: the transport has no tags (NCCL has
// none); MPI keeps messages between two ranks of a communicator in order.
constexpr int kTag = 0;

class MpiCommunicator : public Communicator {
 public:
  // Owns `comm` (frees it on destruction) unless it is MPI_COMM_WORLD.
  MpiCommunicator(MPI_Comm comm, std::shared_ptr<Waiter> waiter) : Communicator(std::move(waiter)), comm_(comm) {
    MPI_CHECK(MPI_Comm_rank(comm_, &rank_));
    MPI_CHECK(MPI_Comm_size(comm_, &size_));
    MPI_Comm_set_errhandler(comm_, MPI_ERRORS_RETURN);
  }
  ~MpiCommunicator() override {
    if (comm_ != MPI_COMM_WORLD && MpiRuntime::running()) MPI_Comm_free(&comm_);
  }
  int rank() const override { return rank_; }
  int size() const override { return size_; }
  std::string backend() const override { return "mpi"; }
  std::string host() const override {
    char name[MPI_MAX_PROCESSOR_NAME];
    int len = 0;
    MPI_Get_processor_name(name, &len);
    return std::string(name, len);
  }

  std::unique_ptr<Communicator> split(int color, int key) override {
    PM_CHECK(color >= 0, "split color must not be negative, got {}", color);
    MPI_Comm part = MPI_COMM_NULL;
    MPI_CHECK(MPI_Comm_split(comm_, color, key, &part));
    return std::make_unique<MpiCommunicator>(part, shared_waiter());
  }

  RequestPtr ialltoallv(const void* send, const std::vector<int64_t>& send_counts,
                        const std::vector<int64_t>& send_displs, void* recv,
                        const std::vector<int64_t>& recv_counts,
                        const std::vector<int64_t>& recv_displs, DType dtype) override {
    PM_CHECK(static_cast<int>(send_counts.size()) == size_ && static_cast<int>(recv_counts.size()) == size_ &&
                 send_displs.size() == send_counts.size() && recv_displs.size() == recv_counts.size(),
             "all-to-all needs one count and displacement per rank ({})", size_);
    auto req = std::make_unique<MpiRequest>("all-to-all");
    req->op = CommOp::all_to_all;
    req->wire_bytes = static_cast<double>(std::max(others_total(send_counts), others_total(recv_counts))) * dtype_size(dtype);
    req->counts_[0] = as_ints(send_counts, "send count");
    req->counts_[1] = as_ints(send_displs, "send displacement");
    req->counts_[2] = as_ints(recv_counts, "recv count");
    req->counts_[3] = as_ints(recv_displs, "recv displacement");
    MPI_CHECK(MPI_Ialltoallv(send, req->counts_[0].data(), req->counts_[1].data(), mpi_type(dtype),
                             recv, req->counts_[2].data(), req->counts_[3].data(), mpi_type(dtype),
                             comm_, &req->request_));
    return req;
  }

  RequestPtr iallreduce(const void* send, void* recv, int64_t count, DType dtype,
                        ReduceOp op) override {
    auto req = std::make_unique<MpiRequest>("all-reduce");
    req->op = CommOp::all_reduce;
    // a ring sends and receives 2 (P-1)/P of the buffer
    req->wire_bytes = 2.0 * (size_ - 1) / size_ * count * dtype_size(dtype);
    MPI_CHECK(MPI_Iallreduce(send == recv ? MPI_IN_PLACE : send, recv, as_int(count, "count"),
                             mpi_type(dtype), mpi_op(op), comm_, &req->request_));
    return req;
  }

  RequestPtr iallgather(const void* send, void* recv, int64_t count, DType dtype) override {
    auto req = std::make_unique<MpiRequest>("all-gather");
    req->wire_bytes = static_cast<double>(size_ - 1) * count * dtype_size(dtype);
    int n = as_int(count, "count");
    MPI_CHECK(MPI_Iallgather(send, n, mpi_type(dtype), recv, n, mpi_type(dtype), comm_,
                             &req->request_));
    return req;
  }

  RequestPtr isend(const void* data, int64_t count, DType dtype, int peer) override {
    auto req = std::make_unique<MpiRequest>(fmt::format("send to rank {}", peer));
    req->wire_bytes = static_cast<double>(count) * dtype_size(dtype);
    MPI_CHECK(MPI_Isend(data, as_int(count, "count"), mpi_type(dtype), peer, kTag, comm_,
                        &req->request_));
    return req;
  }

  RequestPtr irecv(void* data, int64_t count, DType dtype, int peer) override {
    auto req = std::make_unique<MpiRequest>(fmt::format("receive from rank {}", peer));
    req->wire_bytes = static_cast<double>(count) * dtype_size(dtype);
    MPI_CHECK(MPI_Irecv(data, as_int(count, "count"), mpi_type(dtype), peer, kTag, comm_,
                        &req->request_));
    return req;
  }

  RequestPtr ibroadcast(void* data, int64_t count, DType dtype, int root) override {
    auto req = std::make_unique<MpiRequest>("broadcast");
    req->wire_bytes = static_cast<double>(count) * dtype_size(dtype);
    MPI_CHECK(MPI_Ibcast(data, as_int(count, "count"), mpi_type(dtype), root, comm_, &req->request_));
    return req;
  }

  RequestPtr ibarrier() override {
    auto req = std::make_unique<MpiRequest>("barrier");
    MPI_CHECK(MPI_Ibarrier(comm_, &req->request_));
    return req;
  }

 private:
  // Elements exchanged with ranks other than this one (what crosses a link).
  int64_t others_total(const std::vector<int64_t>& counts) const {
    int64_t total = 0;
    for (int q = 0; q < size_; ++q)
      if (q != rank_) total += counts[q];
    return total;
  }

  MPI_Comm comm_;
  int rank_ = 0;
  int size_ = 1;
};

}  // namespace

namespace {

// Open MPI's TCP transport, unless the user chose otherwise: every send of up to 64 MiB goes out
// whole at once (eager: no rendezvous hand-shake) into a 4 MiB socket buffer, so the kernel
// carries a pipeline chunk to the peer while the waiting thread sleeps. With the defaults (64 KiB
// eager, 128 KiB fragments) data moves only when some thread calls into MPI, which forces
// frequent wake-ups that slow the compute lane (see comm/wait_schedule.h); and a message just
// above a 4 MiB eager limit was measured 2-3x slower than below it. Open MPI allocates eager
// buffers as messages need them (peak memory unchanged, measured). Shared memory is not affected.
void default_tcp_settings() {
  const char* eager = "67108864";
  const char* socket_buffer = "4194304";
  for (const char* name : {"OMPI_MCA_btl_tcp_eager_limit", "OMPI_MCA_btl_tcp_rndv_eager_limit",
                           "OMPI_MCA_btl_tcp_max_send_size"})
    setenv(name, eager, /*overwrite=*/0);
  for (const char* name : {"OMPI_MCA_btl_tcp_sndbuf", "OMPI_MCA_btl_tcp_rcvbuf"}) setenv(name, socket_buffer, 0);
}

}  // namespace

MpiRuntime::MpiRuntime(int* argc, char*** argv) {
  default_tcp_settings();
  int provided = 0;
  MPI_CHECK(MPI_Init_thread(argc, argv, MPI_THREAD_SERIALIZED, &provided));
  // Errors come back as return codes so that MPI_CHECK can name the call.
  MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
  PM_CHECK(provided >= MPI_THREAD_SERIALIZED,
           "this MPI library gives thread level {}, the engine needs MPI_THREAD_SERIALIZED", provided);
}

MpiRuntime::~MpiRuntime() {
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (!finalized) MPI_Finalize();
}

void MpiRuntime::abort_job(int exit_code) {
  if (running()) MPI_Abort(MPI_COMM_WORLD, exit_code);
  std::_Exit(exit_code);
}

bool MpiRuntime::running() {
  int initialized = 0, finalized = 0;
  MPI_Initialized(&initialized);
  MPI_Finalized(&finalized);
  return initialized && !finalized;
}

std::unique_ptr<Communicator> make_mpi_world_communicator(std::shared_ptr<Waiter> waiter) {
  return std::make_unique<MpiCommunicator>(MPI_COMM_WORLD, std::move(waiter));
}

}  // namespace pm
