// A fake NCCL for tests/cuda_emulation: the NCCL transport (comm/nccl_communicator.cpp) on the
// emulated GPU, with ranks as threads of one process (`--ranks-in-process`). Every call does its
// work before it returns, as the fake CUDA runtime's streams do: a collective waits for the same
// call of every rank of its communicator, and the last to arrive computes it for all (sums in
// rank order); sends and receives of a group call are matched in order per pair of ranks. It
// checks what NCCL would punish or leave undefined: a buffer that is not device memory, ranks
// that call different collectives, or different sizes, at the same point, a receive whose size
// differs from its send, a rank that never comes (after a timeout, instead of a hang).
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <unistd.h>
#include <utility>
#include <vector>

#include <cuda_runtime.h>  // the fake

typedef enum {
  ncclSuccess = 0,
  ncclUnhandledCudaError = 1,
  ncclSystemError = 2,
  ncclInternalError = 3,
  ncclInvalidArgument = 4,
  ncclInvalidUsage = 5,
  ncclRemoteError = 6,
  ncclInProgress = 7
} ncclResult_t;
typedef enum {
  ncclInt8 = 0,
  ncclUint8 = 1,
  ncclInt32 = 2,
  ncclUint32 = 3,
  ncclInt64 = 4,
  ncclUint64 = 5,
  ncclFloat16 = 6,
  ncclFloat32 = 7,
  ncclFloat64 = 8,
  ncclBfloat16 = 9
} ncclDataType_t;
typedef enum { ncclSum = 0, ncclProd = 1, ncclMax = 2, ncclMin = 3, ncclAvg = 4 } ncclRedOp_t;
typedef struct {
  char internal[128];
} ncclUniqueId;

namespace fake_nccl {

constexpr auto kTimeout = std::chrono::seconds(60);

// One posted collective call of one rank.
struct Call {
  int kind = -1;  // 0 all-reduce, 1 all-gather, 2 broadcast
  const void* send = nullptr;
  void* recv = nullptr;
  std::size_t count = 0;
  ncclDataType_t type = ncclUint8;
  ncclRedOp_t op = ncclSum;
  int root = 0;
};

// The ranks of one communicator.
struct Clique {
  int nranks = 0;
  std::mutex mutex;
  std::condition_variable changed;
  int joined = 0;
  std::vector<Call> posted;
  int arrived = 0;
  long generation = 0;     // collectives completed
  ncclResult_t last = ncclSuccess;
  std::map<std::pair<int, int>, std::deque<std::vector<char>>> mail;  // (from, to) -> messages in order
};

struct Comm {
  std::shared_ptr<Clique> clique;
  int rank = 0;
};

struct Registry {
  std::mutex mutex;
  std::map<std::string, std::shared_ptr<Clique>> cliques;
  long next_id = 0;
};
inline Registry& registry() {
  static Registry r;
  return r;
}

inline std::size_t type_size(ncclDataType_t t) {
  switch (t) {
    case ncclInt8: case ncclUint8: return 1;
    case ncclFloat16: case ncclBfloat16: return 2;
    case ncclInt32: case ncclUint32: case ncclFloat32: return 4;
    default: return 8;
  }
}

inline ncclResult_t misuse(const char* why) {
  std::fprintf(stderr, "fake NCCL: %s\n", why);
  fake_cuda::misuse();
  return ncclInvalidUsage;
}

inline bool on_device(const void* p, std::size_t bytes) { return bytes == 0 || fake_cuda::device_memory_holds(p, bytes); }

template <typename T>
void reduce_into(T* out, const T* in, std::size_t n, ncclRedOp_t op) {
  for (std::size_t i = 0; i < n; ++i) {
    if (op == ncclSum) out[i] = out[i] + in[i];
    if (op == ncclMax) out[i] = in[i] > out[i] ? in[i] : out[i];
    if (op == ncclMin) out[i] = in[i] < out[i] ? in[i] : out[i];
  }
}

// Every rank's result of the posted calls (the caller holds the clique's lock): into temporaries
// first, so that an in-place call reads no buffer another rank's result overwrote.
inline ncclResult_t execute(Clique& c) {
  const Call& first = c.posted[0];
  for (const Call& call : c.posted)
    if (call.kind != first.kind || call.count != first.count || call.type != first.type || call.op != first.op ||
        call.root != first.root)
      return misuse("ranks called different collectives (or sizes) at the same point");
  const std::size_t bytes = first.count * type_size(first.type);
  std::vector<std::vector<char>> results(c.nranks);
  if (first.kind == 0) {
    std::vector<char> sum(static_cast<const char*>(first.send), static_cast<const char*>(first.send) + bytes);
    for (int r = 1; r < c.nranks; ++r) {
      const void* in = c.posted[r].send;
      switch (first.type) {
        case ncclFloat32: reduce_into(reinterpret_cast<float*>(sum.data()), static_cast<const float*>(in), first.count, first.op); break;
        case ncclFloat64: reduce_into(reinterpret_cast<double*>(sum.data()), static_cast<const double*>(in), first.count, first.op); break;
        case ncclInt32: reduce_into(reinterpret_cast<int32_t*>(sum.data()), static_cast<const int32_t*>(in), first.count, first.op); break;
        case ncclInt64: reduce_into(reinterpret_cast<int64_t*>(sum.data()), static_cast<const int64_t*>(in), first.count, first.op); break;
        case ncclUint8: reduce_into(reinterpret_cast<uint8_t*>(sum.data()), static_cast<const uint8_t*>(in), first.count, first.op); break;
        default: return misuse("an all-reduce of a type the fake does not sum");
      }
    }
    results.assign(c.nranks, sum);
  } else if (first.kind == 1) {
    std::vector<char> all(bytes * c.nranks);
    for (int r = 0; r < c.nranks; ++r) std::memcpy(all.data() + r * bytes, c.posted[r].send, bytes);
    results.assign(c.nranks, all);
  } else {
    const char* from = static_cast<const char*>(c.posted[first.root].send);
    results.assign(c.nranks, std::vector<char>(from, from + bytes));
  }
  for (int r = 0; r < c.nranks; ++r) std::memcpy(c.posted[r].recv, results[r].data(), results[r].size());
  return ncclSuccess;
}

// Posts this rank's call and returns once every rank's is done.
inline ncclResult_t collective(Comm* comm, Call call) {
  Clique& c = *comm->clique;
  std::unique_lock<std::mutex> lock(c.mutex);
  c.posted[comm->rank] = call;
  const long generation = c.generation;
  if (++c.arrived == c.nranks) {
    c.last = execute(c);
    c.arrived = 0;
    ++c.generation;
    c.changed.notify_all();
    return c.last;
  }
  if (!c.changed.wait_for(lock, kTimeout, [&] { return c.generation != generation; }))
    return misuse("a collective that not every rank of the communicator called");
  return c.last;
}

// A send or receive waiting for its group call's end.
struct PointToPoint {
  Comm* comm;
  bool send;
  const void* data;
  std::size_t bytes;
  int peer;
};
inline int& group_depth() {
  thread_local int depth = 0;
  return depth;
}
inline std::vector<PointToPoint>& pending() {
  thread_local std::vector<PointToPoint> ops;
  return ops;
}

// Sends first (into the peers' mailboxes), then receives in order: what a group call lets NCCL do.
inline ncclResult_t run_pending() {
  std::vector<PointToPoint> ops;
  ops.swap(pending());
  for (const PointToPoint& p : ops)
    if (p.send) {
      Clique& c = *p.comm->clique;
      std::lock_guard<std::mutex> lock(c.mutex);
      const char* from = static_cast<const char*>(p.data);
      c.mail[{p.comm->rank, p.peer}].emplace_back(from, from + p.bytes);
      c.changed.notify_all();
    }
  for (const PointToPoint& p : ops)
    if (!p.send) {
      Clique& c = *p.comm->clique;
      std::unique_lock<std::mutex> lock(c.mutex);
      auto& box = c.mail[{p.peer, p.comm->rank}];
      if (!c.changed.wait_for(lock, kTimeout, [&] { return !box.empty(); }))
        return misuse("a receive whose send never came");
      if (box.front().size() != p.bytes) return misuse("a receive of another size than its send");
      std::memcpy(const_cast<void*>(p.data), box.front().data(), p.bytes);
      box.pop_front();
    }
  return ncclSuccess;
}

inline ncclResult_t point_to_point(PointToPoint op, ncclDataType_t type, std::size_t count) {
  if (op.peer < 0 || op.peer >= op.comm->clique->nranks) return misuse("a peer outside the communicator");
  op.bytes = count * type_size(type);
  if (!on_device(op.data, op.bytes)) return misuse("a send or receive buffer that is not device memory");
  pending().push_back(op);
  return group_depth() == 0 ? run_pending() : ncclSuccess;
}

}  // namespace fake_nccl

typedef fake_nccl::Comm* ncclComm_t;

inline const char* ncclGetErrorString(ncclResult_t r) { return r == ncclSuccess ? "no error" : "fake NCCL: misuse"; }

inline ncclResult_t ncclGetUniqueId(ncclUniqueId* id) {
  fake_nccl::Registry& reg = fake_nccl::registry();
  std::lock_guard<std::mutex> lock(reg.mutex);
  std::memset(id, 0, sizeof *id);
  std::snprintf(id->internal, sizeof id->internal, "fake-nccl-%d-%ld", static_cast<int>(getpid()), reg.next_id++);
  return ncclSuccess;
}

inline ncclResult_t ncclCommInitRank(ncclComm_t* comm, int nranks, ncclUniqueId id, int rank) {
  if (nranks < 1 || rank < 0 || rank >= nranks) return fake_nccl::misuse("a rank outside [0, nranks)");
  fake_nccl::Registry& reg = fake_nccl::registry();
  std::shared_ptr<fake_nccl::Clique> clique;
  {
    std::lock_guard<std::mutex> lock(reg.mutex);
    auto& slot = reg.cliques[std::string(id.internal, sizeof id.internal)];
    if (!slot) {
      slot = std::make_shared<fake_nccl::Clique>();
      slot->nranks = nranks;
      slot->posted.resize(nranks);
    }
    clique = slot;
  }
  std::unique_lock<std::mutex> lock(clique->mutex);
  if (clique->nranks != nranks) return fake_nccl::misuse("ranks that disagree on the communicator's size");
  ++clique->joined;
  clique->changed.notify_all();
  // (ranks in other processes never arrive: this fake serves ranks as threads only)
  if (!clique->changed.wait_for(lock, fake_nccl::kTimeout, [&] { return clique->joined >= nranks; }))
    return fake_nccl::misuse("ranks that never joined the communicator (the fake serves ranks as threads of one process)");
  *comm = new fake_nccl::Comm{clique, rank};
  return ncclSuccess;
}

inline ncclResult_t ncclCommDestroy(ncclComm_t comm) {
  delete comm;
  return ncclSuccess;
}
inline ncclResult_t ncclCommAbort(ncclComm_t comm) { return ncclCommDestroy(comm); }
inline ncclResult_t ncclCommGetAsyncError(ncclComm_t, ncclResult_t* error) {
  *error = ncclSuccess;
  return ncclSuccess;
}

inline ncclResult_t ncclAllReduce(const void* send, void* recv, std::size_t count, ncclDataType_t type, ncclRedOp_t op,
                                  ncclComm_t comm, cudaStream_t) {
  const std::size_t bytes = count * fake_nccl::type_size(type);
  if (!fake_nccl::on_device(send, bytes) || !fake_nccl::on_device(recv, bytes))
    return fake_nccl::misuse("an all-reduce buffer that is not device memory");
  return fake_nccl::collective(comm, {0, send, recv, count, type, op, 0});
}

inline ncclResult_t ncclAllGather(const void* send, void* recv, std::size_t count, ncclDataType_t type, ncclComm_t comm,
                                  cudaStream_t) {
  const std::size_t bytes = count * fake_nccl::type_size(type);
  if (!fake_nccl::on_device(send, bytes) || !fake_nccl::on_device(recv, bytes * comm->clique->nranks))
    return fake_nccl::misuse("an all-gather buffer that is not device memory");
  return fake_nccl::collective(comm, {1, send, recv, count, type, ncclSum, 0});
}

inline ncclResult_t ncclBroadcast(const void* send, void* recv, std::size_t count, ncclDataType_t type, int root,
                                  ncclComm_t comm, cudaStream_t) {
  const std::size_t bytes = count * fake_nccl::type_size(type);
  if ((comm->rank == root && !fake_nccl::on_device(send, bytes)) || !fake_nccl::on_device(recv, bytes))
    return fake_nccl::misuse("a broadcast buffer that is not device memory");
  return fake_nccl::collective(comm, {2, send, recv, count, type, ncclSum, root});
}

inline ncclResult_t ncclSend(const void* data, std::size_t count, ncclDataType_t type, int peer, ncclComm_t comm, cudaStream_t) {
  return fake_nccl::point_to_point({comm, true, data, 0, peer}, type, count);
}
inline ncclResult_t ncclRecv(void* data, std::size_t count, ncclDataType_t type, int peer, ncclComm_t comm, cudaStream_t) {
  return fake_nccl::point_to_point({comm, false, data, 0, peer}, type, count);
}
inline ncclResult_t ncclGroupStart() {
  ++fake_nccl::group_depth();
  return ncclSuccess;
}
inline ncclResult_t ncclGroupEnd() {
  if (fake_nccl::group_depth() == 0) return fake_nccl::misuse("ncclGroupEnd without ncclGroupStart");
  return --fake_nccl::group_depth() == 0 ? fake_nccl::run_pending() : ncclSuccess;
}
