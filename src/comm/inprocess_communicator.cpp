#include "comm/inprocess_communicator.h"

#include <unistd.h>

#include <algorithm>
#include <condition_variable>
#include <cstring>
#include <map>
#include <mutex>
#include <thread>

#include "core/clock.h"
#include "core/error.h"
#include "core/log.h"

namespace pm {
namespace {

using Bytes = std::vector<char>;

// What every thread of one run shares: one lock for all groups (tests are small), and the first
// failure.
struct Run {
  std::mutex mutex;
  bool failed = false;
  int failed_rank = -1;  // in the world
  std::string failure;
};

// One rank's part of a collective: the bytes it contributes and, per peer, which of them
// (offset, length) the peer receives.
struct Contribution {
  Bytes bytes;
  std::vector<std::pair<int64_t, int64_t>> to_peer;  // [size]
};

struct Group;

// The n-th collective of a group, as its ranks arrive.
struct Collective {
  std::string kind;
  int arrived = 0, finished = 0;
  std::vector<Contribution> from;                  // [size]
  std::map<int, std::shared_ptr<Group>> children;  // split: the new group of each color
};

struct Group {
  std::shared_ptr<Run> run;
  std::vector<int> world_ranks;                  // [size]: each member's rank in the world
  std::map<long, Collective> collectives;        // by sequence number
  std::map<std::pair<int, int>, std::map<long, Bytes>> messages;  // (from, to) -> by sequence
  int size() const { return static_cast<int>(world_ranks.size()); }
};

void throw_if_failed(const Run& run, const std::string& what) {
  if (run.failed)
    throw Error(ErrorKind::comm,
                fmt::format("{}: rank {} stopped with an error: {}", what, run.failed_rank, run.failure));
}

std::string local_host() {
  char name[256] = {};
  gethostname(name, sizeof name - 1);
  return name;
}

// A request that completes by running `complete` under the run's lock once `ready` holds.
class InProcessRequest : public CommRequest {
 public:
  InProcessRequest(std::shared_ptr<Run> run, std::string what, std::function<bool()> ready,
                   std::function<void()> complete)
      : run_(std::move(run)), what_(std::move(what)), ready_(std::move(ready)), complete_(std::move(complete)) {}
  bool test() override {
    if (done_) return true;
    std::lock_guard lock(run_->mutex);
    if (abandoned_) return false;
    throw_if_failed(*run_, what_);
    if (!ready_()) return false;
    complete_();
    done_ = true;
    return true;
  }
  std::string what() const override { return what_; }
  void abandon() override { abandoned_ = true; }

 private:
  std::shared_ptr<Run> run_;
  std::string what_;
  std::function<bool()> ready_;
  std::function<void()> complete_;
  bool done_ = false, abandoned_ = false;
};

class InProcessCommunicator : public Communicator {
 public:
  InProcessCommunicator(std::shared_ptr<Group> group, int rank, std::shared_ptr<Waiter> waiter)
      : Communicator(std::move(waiter)), group_(std::move(group)), rank_(rank) {}

  int rank() const override { return rank_; }
  int size() const override { return group_->size(); }
  std::string backend() const override { return "in-process"; }
  std::string host() const override { return local_host(); }

  RequestPtr ialltoallv(const void* send, const std::vector<int64_t>& send_counts,
                        const std::vector<int64_t>& send_displs, void* recv,
                        const std::vector<int64_t>& recv_counts, const std::vector<int64_t>& recv_displs,
                        DType dtype) override {
    const int P = size();
    PM_CHECK(static_cast<int>(send_counts.size()) == P && static_cast<int>(recv_counts.size()) == P &&
                 send_displs.size() == send_counts.size() && recv_displs.size() == recv_counts.size(),
             "all-to-all needs one count and displacement per rank ({})", P);
    const int64_t es = static_cast<int64_t>(dtype_size(dtype));
    Contribution c;
    int64_t total = 0, others_sent = 0, others_received = 0;
    for (int q = 0; q < P; ++q) {
      c.to_peer.push_back({total, send_counts[q] * es});
      total += send_counts[q] * es;
      if (q != rank_) others_sent += send_counts[q], others_received += recv_counts[q];
    }
    c.bytes.resize(total);
    for (int q = 0; q < P; ++q)
      if (send_counts[q] > 0)
        std::memcpy(c.bytes.data() + c.to_peer[q].first, static_cast<const char*>(send) + send_displs[q] * es,
                    send_counts[q] * es);
    auto req = start("all-to-all", std::move(c), [=, this](const std::vector<Contribution>& from) {
      for (int q = 0; q < P; ++q) {
        auto [offset, length] = from[q].to_peer[rank_];
        PM_CHECK(length == recv_counts[q] * es, "all-to-all: rank {} sends {} bytes to rank {}, which expects {}", q,
                 length, rank_, recv_counts[q] * es);
        if (length > 0) std::memcpy(static_cast<char*>(recv) + recv_displs[q] * es, from[q].bytes.data() + offset, length);
      }
    });
    req->op = CommOp::all_to_all;
    req->wire_bytes = static_cast<double>(std::max(others_sent, others_received)) * es;
    return req;
  }

  RequestPtr iallreduce(const void* send, void* recv, int64_t count, DType dtype, ReduceOp op) override {
    const int64_t bytes = count * static_cast<int64_t>(dtype_size(dtype));
    auto req = start("all-reduce", everyone(send, bytes), [=](const std::vector<Contribution>& from) {
      // rank order, the same on every rank: every rank gets the same bits
      std::memcpy(recv, from[0].bytes.data(), bytes);
      for (std::size_t q = 1; q < from.size(); ++q) reduce_into(recv, from[q].bytes.data(), count, dtype, op);
    });
    req->op = CommOp::all_reduce;
    req->wire_bytes = 2.0 * (size() - 1) / size() * bytes;
    return req;
  }

  RequestPtr iallgather(const void* send, void* recv, int64_t count, DType dtype) override {
    const int64_t bytes = count * static_cast<int64_t>(dtype_size(dtype));
    return start("all-gather", everyone(send, bytes), [=](const std::vector<Contribution>& from) {
      for (std::size_t q = 0; q < from.size(); ++q)
        std::memcpy(static_cast<char*>(recv) + q * bytes, from[q].bytes.data(), bytes);
    });
  }

  RequestPtr ibroadcast(void* data, int64_t count, DType dtype, int root) override {
    PM_CHECK(root >= 0 && root < size(), "broadcast root {} outside the group of {}", root, size());
    const int64_t bytes = count * static_cast<int64_t>(dtype_size(dtype));
    Contribution c = rank_ == root ? everyone(data, bytes) : Contribution{{}, std::vector<std::pair<int64_t, int64_t>>(size(), {0, 0})};
    return start("broadcast", std::move(c), [=, this](const std::vector<Contribution>& from) {
      if (rank_ == root) return;
      PM_CHECK(static_cast<int64_t>(from[root].bytes.size()) == bytes, "broadcast of {} bytes from rank {}, {} expected",
               from[root].bytes.size(), root, bytes);
      std::memcpy(data, from[root].bytes.data(), bytes);
    });
  }

  RequestPtr ibarrier() override {
    return start("barrier", Contribution{{}, std::vector<std::pair<int64_t, int64_t>>(size(), {0, 0})},
                 [](const std::vector<Contribution>&) {});
  }

  RequestPtr isend(const void* data, int64_t count, DType dtype, int peer) override {
    PM_CHECK(peer >= 0 && peer < size() && peer != rank_, "send to rank {} in a group of {}", peer, size());
    const int64_t bytes = count * static_cast<int64_t>(dtype_size(dtype));
    std::lock_guard lock(group_->run->mutex);
    Bytes message(static_cast<const char*>(data), static_cast<const char*>(data) + bytes);
    group_->messages[{rank_, peer}][next_send_[peer]++] = std::move(message);
    // eager: the bytes are copied, the buffer is free again
    auto req = std::make_unique<InProcessRequest>(group_->run, fmt::format("send to rank {}", peer),
                                                  [] { return true; }, [] {});
    req->wire_bytes = static_cast<double>(bytes);
    return req;
  }

  RequestPtr irecv(void* data, int64_t count, DType dtype, int peer) override {
    PM_CHECK(peer >= 0 && peer < size() && peer != rank_, "receive from rank {} in a group of {}", peer, size());
    const int64_t bytes = count * static_cast<int64_t>(dtype_size(dtype));
    const long seq = next_recv_[peer]++;
    auto box = [group = group_, from = peer, to = rank_]() -> std::map<long, Bytes>& {
      return group->messages[{from, to}];
    };
    auto req = std::make_unique<InProcessRequest>(
        group_->run, fmt::format("receive from rank {}", peer), [box, seq] { return box().count(seq) > 0; },
        [box, seq, data, bytes, peer] {
          auto it = box().find(seq);
          PM_CHECK(static_cast<int64_t>(it->second.size()) == bytes, "rank {} sent {} bytes, {} expected", peer,
                   it->second.size(), bytes);
          std::memcpy(data, it->second.data(), bytes);
          box().erase(it);
        });
    req->wire_bytes = static_cast<double>(bytes);
    return req;
  }

  std::unique_ptr<Communicator> split(int color, int key) override {
    PM_CHECK(color >= 0, "split color must not be negative, got {}", color);
    int32_t mine[2] = {color, key};
    std::shared_ptr<Group> child;
    int child_rank = -1;
    auto req = start("split", everyone(mine, sizeof mine), [&, this](const std::vector<Contribution>& from) {
      // members of my color, ordered by (key, rank); the first member to complete creates the group
      std::vector<std::pair<int32_t, int>> members;
      for (int q = 0; q < static_cast<int>(from.size()); ++q) {
        int32_t cq[2];
        std::memcpy(cq, from[q].bytes.data(), sizeof cq);
        if (cq[0] == color) members.push_back({cq[1], q});
      }
      std::sort(members.begin(), members.end());
      for (int i = 0; i < static_cast<int>(members.size()); ++i)
        if (members[i].second == rank_) child_rank = i;
      std::shared_ptr<Group>& made = current_collective().children[color];
      if (!made) {
        made = std::make_shared<Group>();
        made->run = group_->run;
        for (const auto& m : members) made->world_ranks.push_back(group_->world_ranks[m.second]);
      }
      child = made;
    });
    waiter().wait(*req);
    return std::make_unique<InProcessCommunicator>(child, child_rank, shared_waiter());
  }

 private:
  // The same bytes for every peer.
  Contribution everyone(const void* data, int64_t bytes) const {
    Contribution c;
    c.bytes.assign(static_cast<const char*>(data), static_cast<const char*>(data) + bytes);
    c.to_peer.assign(size(), {0, bytes});
    return c;
  }

  // Collective number seq_ of this group: only valid under the lock, between arrival and finish.
  Collective& current_collective() { return group_->collectives.at(completing_); }

  // Contributes to this rank's next collective; the request completes once every rank has
  // contributed, by handing all contributions to `deliver` (under the lock).
  RequestPtr start(const char* kind, Contribution mine,
                   std::function<void(const std::vector<Contribution>&)> deliver) {
    const long seq = next_collective_++;
    {
      std::lock_guard lock(group_->run->mutex);
      throw_if_failed(*group_->run, kind);
      Collective& c = group_->collectives[seq];
      if (c.arrived == 0) {
        c.kind = kind;
        c.from.resize(size());
      }
      PM_CHECK(c.kind == kind, "collective {} of the group: rank {} calls {}, another rank {}", seq, rank_, kind, c.kind);
      c.from[rank_] = std::move(mine);
      ++c.arrived;
    }
    auto group = group_;
    const int P = size();
    return std::make_unique<InProcessRequest>(
        group_->run, kind, [group, seq, P] { return group->collectives.at(seq).arrived == P; },
        [group, seq, P, deliver = std::move(deliver), this] {
          Collective& c = group->collectives.at(seq);
          completing_ = seq;
          deliver(c.from);
          if (++c.finished == P) group->collectives.erase(seq);
        });
  }

  static void reduce_into(void* acc, const void* in, int64_t count, DType dtype, ReduceOp op) {
    auto apply = [&](auto* a, const auto* b) {
      for (int64_t i = 0; i < count; ++i) {
        if (op == ReduceOp::sum) a[i] = a[i] + b[i];
        else if (op == ReduceOp::max) a[i] = std::max(a[i], b[i]);
        else a[i] = std::min(a[i], b[i]);
      }
    };
    switch (dtype) {
      case DType::f32: return apply(static_cast<float*>(acc), static_cast<const float*>(in));
      case DType::f64: return apply(static_cast<double*>(acc), static_cast<const double*>(in));
      case DType::i32: return apply(static_cast<int32_t*>(acc), static_cast<const int32_t*>(in));
      case DType::i64: return apply(static_cast<int64_t*>(acc), static_cast<const int64_t*>(in));
      case DType::u8: return apply(static_cast<uint8_t*>(acc), static_cast<const uint8_t*>(in));
      case DType::bf16: PM_CHECK(false, "all-reduce of bf16 is not supported in-process");
    }
  }

  std::shared_ptr<Group> group_;
  int rank_;
  long next_collective_ = 0;
  long completing_ = -1;
  std::map<int, long> next_send_, next_recv_;  // per peer
};

}  // namespace

void run_ranks_in_process(int ranks, const std::function<void(Communicator&)>& body, WaitPolicy policy) {
  PM_CHECK(ranks >= 1, "at least one rank, got {}", ranks);
  auto run = std::make_shared<Run>();
  auto world = std::make_shared<Group>();
  world->run = run;
  for (int r = 0; r < ranks; ++r) world->world_ranks.push_back(r);
  std::vector<std::thread> threads;
  std::exception_ptr first;
  for (int r = 0; r < ranks; ++r)
    threads.emplace_back([&, r] {
      log::set_thread_rank(r);
      InProcessCommunicator comm(world, r, std::make_shared<Waiter>(policy));
      try {
        body(comm);
      } catch (const std::exception& e) {
        std::lock_guard lock(run->mutex);
        if (!run->failed) {
          run->failed = true;
          run->failed_rank = r;
          run->failure = e.what();
          first = std::current_exception();
        }
      } catch (...) {
        std::lock_guard lock(run->mutex);
        if (!run->failed) {
          run->failed = true;
          run->failed_rank = r;
          run->failure = "unknown error";
          first = std::current_exception();
        }
      }
    });
  for (auto& t : threads) t.join();
  if (first) std::rethrow_exception(first);
}

}  // namespace pm
