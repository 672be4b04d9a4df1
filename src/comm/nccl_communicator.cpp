#include "comm/nccl_communicator.h"

#include "core/error.h"

#if PIPEMOE_HAVE_NCCL

#include <cuda_runtime.h>
#include <nccl.h>
#if !PM_CUDA_EMULATION
#include <dlfcn.h>
#endif

#include <algorithm>
#include <cstring>
#include <functional>
#include <mutex>
#include <vector>

#include "core/local_rank.h"

namespace pm {
namespace {

// NCCL's functions: from the library, loaded when a run first asks for NCCL; in the emulation
// tests (PM_CUDA_EMULATION), the fake's (tests/cuda_emulation/fake_nccl).
struct NcclApi {
  decltype(&ncclGetUniqueId) get_unique_id = nullptr;
  decltype(&ncclCommInitRank) comm_init_rank = nullptr;
  decltype(&ncclCommDestroy) comm_destroy = nullptr;
  decltype(&ncclCommAbort) comm_abort = nullptr;
  decltype(&ncclCommGetAsyncError) comm_get_async_error = nullptr;
  decltype(&ncclGetErrorString) get_error_string = nullptr;
  decltype(&ncclAllReduce) all_reduce = nullptr;
  decltype(&ncclAllGather) all_gather = nullptr;
  decltype(&ncclBroadcast) broadcast = nullptr;
  decltype(&ncclSend) send = nullptr;
  decltype(&ncclRecv) recv = nullptr;
  decltype(&ncclGroupStart) group_start = nullptr;
  decltype(&ncclGroupEnd) group_end = nullptr;
};

#if PM_CUDA_EMULATION
bool load(NcclApi& api, std::string*) {
  api = {&ncclGetUniqueId, &ncclCommInitRank, &ncclCommDestroy, &ncclCommAbort, &ncclCommGetAsyncError,
         &ncclGetErrorString, &ncclAllReduce, &ncclAllGather, &ncclBroadcast, &ncclSend, &ncclRecv,
         &ncclGroupStart, &ncclGroupEnd};
  return true;
}
#else
template <typename Fn>
bool bind(void* library, const char* name, Fn& fn, std::string* why_not) {
  fn = reinterpret_cast<Fn>(dlsym(library, name));
  if (!fn) *why_not = std::string("libnccl.so.2 has no ") + name + " (NCCL older than 2.7?)";
  return fn != nullptr;
}

bool load(NcclApi& api, std::string* why_not) {
  void* library = dlopen("libnccl.so.2", RTLD_NOW | RTLD_LOCAL);
  if (!library) library = dlopen("/usr/local/cuda/lib64/libnccl.so.2", RTLD_NOW | RTLD_LOCAL);
  if (!library) {
    *why_not = std::string("the NCCL library was not found (") + dlerror() + ")";
    return false;
  }
  return bind(library, "ncclGetUniqueId", api.get_unique_id, why_not) &&
         bind(library, "ncclCommInitRank", api.comm_init_rank, why_not) &&
         bind(library, "ncclCommDestroy", api.comm_destroy, why_not) &&
         bind(library, "ncclCommAbort", api.comm_abort, why_not) &&
         bind(library, "ncclCommGetAsyncError", api.comm_get_async_error, why_not) &&
         bind(library, "ncclGetErrorString", api.get_error_string, why_not) &&
         bind(library, "ncclAllReduce", api.all_reduce, why_not) && bind(library, "ncclAllGather", api.all_gather, why_not) &&
         bind(library, "ncclBroadcast", api.broadcast, why_not) && bind(library, "ncclSend", api.send, why_not) &&
         bind(library, "ncclRecv", api.recv, why_not) && bind(library, "ncclGroupStart", api.group_start, why_not) &&
         bind(library, "ncclGroupEnd", api.group_end, why_not);
}
#endif

// The API once loaded, or null with the reason.
const NcclApi* nccl_api(std::string* why_not) {
  static std::once_flag once;
  static NcclApi api;
  static std::string error;
  static bool loaded = false;
  std::call_once(once, [] {
    int devices = 0;
    const cudaError_t status = cudaGetDeviceCount(&devices);
    if (status != cudaSuccess || devices == 0)
      error = status != cudaSuccess ? std::string("no usable GPU (") + cudaGetErrorString(status) + ")" : "no GPU on this machine";
    else
      loaded = load(api, &error);
  });
  if (!loaded && why_not) *why_not = error;
  return loaded ? &api : nullptr;
}

void cuda_check(cudaError_t status, const char* what) {
  if (status != cudaSuccess) throw Error(ErrorKind::comm, fmt::format("NCCL transport: {} failed: {}", what, cudaGetErrorString(status)));
}

ncclDataType_t nccl_type(DType dtype) {
  switch (dtype) {
    case DType::f32: return ncclFloat32;
    case DType::f64: return ncclFloat64;
    case DType::bf16: return ncclBfloat16;
    case DType::i32: return ncclInt32;
    case DType::i64: return ncclInt64;
    case DType::u8: return ncclUint8;
  }
  return ncclUint8;
}

ncclRedOp_t nccl_op(ReduceOp op) {
  switch (op) {
    case ReduceOp::sum: return ncclSum;
    case ReduceOp::max: return ncclMax;
    case ReduceOp::min: return ncclMin;
  }
  return ncclSum;
}

// Pinned host memory and device memory of one size, growing as operations need.
struct Staging {
  void* host = nullptr;
  void* device = nullptr;
  std::size_t capacity = 0;
  void reserve(std::size_t bytes) {
    bytes = std::max<std::size_t>(bytes, 1);
    if (bytes <= capacity) return;
    release();
    cuda_check(cudaMallocHost(&host, bytes), "cudaMallocHost");
    cuda_check(cudaMalloc(&device, bytes), "cudaMalloc");
    capacity = bytes;
  }
  void release() {
    if (host) cudaFreeHost(host);
    if (device) cudaFree(device);
    host = device = nullptr, capacity = 0;
  }
  ~Staging() { release(); }
};

// What one operation in flight holds: its send and receive staging, and the event after its last
// copy. Reused by later operations once it completes.
struct Slot {
  Staging send, recv;
  cudaEvent_t done = nullptr;
  Slot() { cuda_check(cudaEventCreateWithFlags(&done, cudaEventDisableTiming), "cudaEventCreate"); }
  ~Slot() { cudaEventDestroy(done); }
  Slot(const Slot&) = delete;
  Slot& operator=(const Slot&) = delete;
};

// One NCCL communicator with its stream and its slots; shared with the requests in flight, so it
// is destroyed after the last of them.
struct Group {
  const NcclApi& api;
  int device;
  ncclComm_t comm = nullptr;
  cudaStream_t stream = nullptr;
  std::mutex mutex;  // operations and tests (the engine already calls one at a time)
  std::vector<std::unique_ptr<Slot>> free_slots;
  bool abandoned = false;  // an operation will never finish: abort instead of waiting

  Group(const NcclApi& a, int gpu) : api(a), device(gpu) {}
  ~Group() {
    cudaSetDevice(device);
    if (comm) {
      if (abandoned) {
        api.comm_abort(comm);
      } else {
        cudaStreamSynchronize(stream);
        api.comm_destroy(comm);
      }
    }
    if (stream) cudaStreamDestroy(stream);
  }
  void check(ncclResult_t status, const char* what) const {
    if (status != ncclSuccess) throw Error(ErrorKind::comm, fmt::format("NCCL transport: {} failed: {}", what, api.get_error_string(status)));
  }
  std::unique_ptr<Slot> take() {
    if (free_slots.empty()) return std::make_unique<Slot>();
    std::unique_ptr<Slot> slot = std::move(free_slots.back());
    free_slots.pop_back();
    return slot;
  }
};

class NcclRequest final : public CommRequest {
 public:
  // finish(slot): copies the received bytes out of the slot's pinned memory into the caller's
  // buffer once the GPU is done.
  NcclRequest(std::shared_ptr<Group> group, std::unique_ptr<Slot> slot, std::string what,
              std::function<void(const Slot&)> finish)
      : group_(std::move(group)), slot_(std::move(slot)), what_(std::move(what)), finish_(std::move(finish)) {}
  ~NcclRequest() override {
    // dropped unfinished: the GPU may still write into the slot; wait for it (unless abandoned)
    if (slot_ && !abandoned_) {
      cudaEventSynchronize(slot_->done);
      std::lock_guard<std::mutex> lock(group_->mutex);
      group_->free_slots.push_back(std::move(slot_));
    }
  }
  bool test() override {
    if (!slot_) return true;
    std::lock_guard<std::mutex> lock(group_->mutex);
    const cudaError_t status = cudaEventQuery(slot_->done);
    if (status == cudaErrorNotReady) {
      ncclResult_t async = ncclSuccess;
      group_->check(group_->api.comm_get_async_error(group_->comm, &async), "ncclCommGetAsyncError");
      if (async != ncclSuccess && async != ncclInProgress) group_->check(async, what_.c_str());
      return false;
    }
    cuda_check(status, "cudaEventQuery");
    if (finish_) finish_(*slot_);
    group_->free_slots.push_back(std::move(slot_));
    return true;
  }
  std::string what() const override { return what_ + " (NCCL)"; }
  void abandon() override {
    // the slot stays with the GPU (leaked): the job is about to end
    abandoned_ = true;
    std::lock_guard<std::mutex> lock(group_->mutex);
    group_->abandoned = true;
    (void)slot_.release();
  }

 private:
  std::shared_ptr<Group> group_;
  std::unique_ptr<Slot> slot_;
  std::string what_;
  std::function<void(const Slot&)> finish_;
  bool abandoned_ = false;
};

class NcclCommunicator final : public Communicator {
 public:
  // Collective over `bootstrap`; owns it when `owned` holds it (a split group's).
  NcclCommunicator(Communicator& bootstrap, std::unique_ptr<Communicator> owned, const NcclApi& api, int device)
      : Communicator(bootstrap.shared_waiter()), bootstrap_(bootstrap), owned_(std::move(owned)),
        group_(std::make_shared<Group>(api, device)) {
    cuda_check(cudaSetDevice(device), "cudaSetDevice");
    ncclUniqueId id;
    std::memset(&id, 0, sizeof id);
    if (bootstrap_.rank() == 0) group_->check(api.get_unique_id(&id), "ncclGetUniqueId");
    bootstrap_.broadcast(&id, sizeof id, DType::u8, 0);
    group_->check(api.comm_init_rank(&group_->comm, bootstrap_.size(), id, bootstrap_.rank()), "ncclCommInitRank");
    cuda_check(cudaStreamCreateWithFlags(&group_->stream, cudaStreamNonBlocking), "cudaStreamCreate");
  }

  int rank() const override { return bootstrap_.rank(); }
  int size() const override { return bootstrap_.size(); }
  std::string backend() const override { return "nccl"; }
  std::string host() const override { return bootstrap_.host(); }

  std::unique_ptr<Communicator> split(int color, int key) override {
    std::unique_ptr<Communicator> part = bootstrap_.split(color, key);
    Communicator& ref = *part;
    return std::make_unique<NcclCommunicator>(ref, std::move(part), group_->api, group_->device);
  }

  RequestPtr ialltoallv(const void* send, const std::vector<int64_t>& send_counts, const std::vector<int64_t>& send_displs,
                        void* recv, const std::vector<int64_t>& recv_counts, const std::vector<int64_t>& recv_displs,
                        DType dtype) override {
    const int P = size();
    PM_CHECK(static_cast<int>(send_counts.size()) == P && static_cast<int>(recv_counts.size()) == P &&
                 send_displs.size() == send_counts.size() && recv_displs.size() == recv_counts.size(),
             "all-to-all needs one count and displacement per rank ({})", P);
    const std::size_t es = dtype_size(dtype);
    // the staging keeps the caller's layout: [0, end) elements of each side
    auto end_of = [](const std::vector<int64_t>& counts, const std::vector<int64_t>& displs) {
      int64_t end = 0;
      for (std::size_t p = 0; p < counts.size(); ++p)
        if (counts[p] > 0) end = std::max(end, displs[p] + counts[p]);
      return end;
    };
    const int64_t send_end = end_of(send_counts, send_displs), recv_end = end_of(recv_counts, recv_displs);
    std::lock_guard<std::mutex> lock(group_->mutex);
    Group& g = *group_;
    cuda_check(cudaSetDevice(g.device), "cudaSetDevice");
    std::unique_ptr<Slot> slot = g.take();
    slot->send.reserve(send_end * es);
    slot->recv.reserve(recv_end * es);
    for (int p = 0; p < P; ++p)
      if (send_counts[p] > 0)
        std::memcpy(static_cast<char*>(slot->send.host) + send_displs[p] * es, static_cast<const char*>(send) + send_displs[p] * es,
                    send_counts[p] * es);
    copy_in(*slot, send_end * es);
    g.check(g.api.group_start(), "ncclGroupStart");
    for (int p = 0; p < P; ++p) {
      // (a count of 0 is skipped on both sides: this rank's send count to p is p's receive count)
      if (send_counts[p] > 0)
        g.check(g.api.send(static_cast<const char*>(slot->send.device) + send_displs[p] * es, send_counts[p], nccl_type(dtype), p,
                           g.comm, g.stream),
                "ncclSend");
      if (recv_counts[p] > 0)
        g.check(g.api.recv(static_cast<char*>(slot->recv.device) + recv_displs[p] * es, recv_counts[p], nccl_type(dtype), p,
                           g.comm, g.stream),
                "ncclRecv");
    }
    g.check(g.api.group_end(), "ncclGroupEnd");
    copy_out(*slot, recv_end * es);
    auto req = std::make_unique<NcclRequest>(group_, std::move(slot), "all-to-all",
                                             [recv, recv_counts, recv_displs, es](const Slot& s) {
                                               for (std::size_t p = 0; p < recv_counts.size(); ++p)
                                                 if (recv_counts[p] > 0)
                                                   std::memcpy(static_cast<char*>(recv) + recv_displs[p] * es,
                                                               static_cast<const char*>(s.recv.host) + recv_displs[p] * es,
                                                               recv_counts[p] * es);
                                             });
    req->op = CommOp::all_to_all;
    req->wire_bytes = static_cast<double>(std::max(others_total(send_counts), others_total(recv_counts))) * es;
    return req;
  }

  RequestPtr iallreduce(const void* send, void* recv, int64_t count, DType dtype, ReduceOp op) override {
    const std::size_t bytes = count * dtype_size(dtype);
    auto req = collective("all-reduce", send, bytes, recv, bytes, [&](Group& g, const Slot& s) {
      return g.api.all_reduce(s.send.device, s.recv.device, count, nccl_type(dtype), nccl_op(op), g.comm, g.stream);
    });
    req->op = CommOp::all_reduce;
    req->wire_bytes = 2.0 * (size() - 1) / size() * bytes;  // a ring sends and receives 2 (P-1)/P of it
    return req;
  }

  RequestPtr iallgather(const void* send, void* recv, int64_t count, DType dtype) override {
    const std::size_t bytes = count * dtype_size(dtype);
    auto req = collective("all-gather", send, bytes, recv, bytes * size(), [&](Group& g, const Slot& s) {
      return g.api.all_gather(s.send.device, s.recv.device, count, nccl_type(dtype), g.comm, g.stream);
    });
    req->wire_bytes = static_cast<double>(size() - 1) * bytes;
    return req;
  }

  RequestPtr ibroadcast(void* data, int64_t count, DType dtype, int root) override {
    const std::size_t bytes = count * dtype_size(dtype);
    const bool is_root = rank() == root;
    // (the root sends its buffer and keeps it; the others receive into theirs)
    auto req = collective("broadcast", is_root ? data : nullptr, is_root ? bytes : 0, is_root ? nullptr : data, bytes,
                          [&](Group& g, const Slot& s) {
                            return g.api.broadcast(s.send.device, s.recv.device, count, nccl_type(dtype), root, g.comm, g.stream);
                          });
    req->wire_bytes = static_cast<double>(bytes);
    return req;
  }

  RequestPtr ibarrier() override {
    // a one-element all-reduce in stream order after every operation started before it
    return collective("barrier", nullptr, 0, nullptr, 4, [&](Group& g, const Slot& s) {
      return g.api.all_reduce(s.recv.device, s.recv.device, 1, ncclInt32, ncclSum, g.comm, g.stream);
    });
  }

  // Point-to-point: the bootstrap's (see the header).
  RequestPtr isend(const void* data, int64_t count, DType dtype, int peer) override {
    return bootstrap_.isend(data, count, dtype, peer);
  }
  RequestPtr irecv(void* data, int64_t count, DType dtype, int peer) override {
    return bootstrap_.irecv(data, count, dtype, peer);
  }

 private:
  // Stages [send, send + send_bytes) in, runs `call` on the slot's device memory, and copies
  // recv_bytes back into `recv` (when not null) once the GPU is done.
  template <typename Call>
  RequestPtr collective(const char* what, const void* send, std::size_t send_bytes, void* recv, std::size_t recv_bytes,
                        Call call) {
    std::lock_guard<std::mutex> lock(group_->mutex);
    Group& g = *group_;
    cuda_check(cudaSetDevice(g.device), "cudaSetDevice");
    std::unique_ptr<Slot> slot = g.take();
    slot->send.reserve(send_bytes);
    slot->recv.reserve(recv_bytes);
    if (send_bytes > 0) {
      std::memcpy(slot->send.host, send, send_bytes);
      copy_in(*slot, send_bytes);
    }
    g.check(call(g, *slot), what);
    copy_out(*slot, recv ? recv_bytes : 0);  // (the event always: the slot is busy until the GPU is done)
    std::function<void(const Slot&)> finish;
    if (recv && recv_bytes > 0) finish = [recv, recv_bytes](const Slot& s) { std::memcpy(recv, s.recv.host, recv_bytes); };
    return std::make_unique<NcclRequest>(group_, std::move(slot), what, std::move(finish));
  }
  void copy_in(Slot& slot, std::size_t bytes) {
    if (bytes > 0)
      cuda_check(cudaMemcpyAsync(slot.send.device, slot.send.host, bytes, cudaMemcpyHostToDevice, group_->stream), "copy to the GPU");
  }
  // The received bytes back to pinned memory, then the slot's event.
  void copy_out(Slot& slot, std::size_t bytes) {
    if (bytes > 0)
      cuda_check(cudaMemcpyAsync(slot.recv.host, slot.recv.device, bytes, cudaMemcpyDeviceToHost, group_->stream), "copy from the GPU");
    cuda_check(cudaEventRecord(slot.done, group_->stream), "cudaEventRecord");
  }
  int64_t others_total(const std::vector<int64_t>& counts) const {
    int64_t total = 0;
    for (int q = 0; q < size(); ++q)
      if (q != rank()) total += counts[q];
    return total;
  }

  Communicator& bootstrap_;
  std::unique_ptr<Communicator> owned_;
  std::shared_ptr<Group> group_;
};

}  // namespace

bool nccl_available(std::string* why_not) { return nccl_api(why_not) != nullptr; }

int nccl_devices() {
  int devices = 0;
  return nccl_available() && cudaGetDeviceCount(&devices) == cudaSuccess ? devices : 0;
}

std::unique_ptr<Communicator> make_nccl_communicator(Communicator& bootstrap) {
  std::string why;
  const NcclApi* api = nccl_api(&why);
  // every rank decides alike unless their machines differ: agree, so that none waits alone
  const bool everywhere = bootstrap.allreduce_scalar(api ? 1.0 : 0.0, ReduceOp::min) > 0;
  if (!everywhere)
    throw Error(ErrorKind::usage, "the NCCL transport cannot run here: " + (api ? std::string("another rank cannot run it") : why));
  int devices = 0;
  cuda_check(cudaGetDeviceCount(&devices), "cudaGetDeviceCount");
  return std::make_unique<NcclCommunicator>(bootstrap, nullptr, *api, gpu_for_rank(devices, bootstrap.rank()));
}

}  // namespace pm

#else  // built without NCCL

namespace pm {

bool nccl_available(std::string* why_not) {
  if (why_not) *why_not = "this build has no NCCL transport (CMake found no CUDA toolkit with nccl.h; see PIPEMOE_CUDA)";
  return false;
}

int nccl_devices() { return 0; }

std::unique_ptr<Communicator> make_nccl_communicator(Communicator&) {
  std::string why;
  nccl_available(&why);
  throw Error(ErrorKind::usage, "the NCCL transport cannot run here: " + why);
}

}  // namespace pm

#endif
