#include "kernels/cpu/thread_pool.h"

#include <algorithm>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

namespace pm {
namespace {

// Set on the pool's workers and on a thread while its call runs: a kernel that calls
// parallel_for from inside a parallel part runs that part inline.
thread_local bool t_in_pool = false;

class Pool {
 public:
  ~Pool() { resize(1); }

  void resize(int threads) {
    threads = std::max(1, threads);
    {
      std::lock_guard lock(mutex_);
      stopping_ = true;
      ++generation_;
    }
    wake_.notify_all();
    for (auto& t : workers_) t.join();
    workers_.clear();
    stopping_ = false;
    size_ = threads;
    // A worker must know the generation it was born in: reading it when it first runs would miss
    // a call that started in between.
    long born = generation_;
    for (int i = 1; i < threads; ++i) workers_.emplace_back([this, i, born] { worker(i, born); });
  }

  int size() const { return size_; }

  void run(int64_t count, const std::function<void(int64_t, int64_t)>& fn) {
    int parts = static_cast<int>(std::min<int64_t>(size_, count));
    if (parts <= 1 || t_in_pool) {
      fn(0, count);
      return;
    }
    // Ranks run as threads of one process (tests) call kernels at the same time: they take turns
    // with the whole pool. Results do not depend on who goes first.
    std::lock_guard turn(run_mutex_);
    t_in_pool = true;
    {
      std::lock_guard lock(mutex_);
      fn_ = &fn;
      count_ = count;
      parts_ = parts;
      pending_ = parts - 1;
      ++generation_;
    }
    wake_.notify_all();
    fn(0, count / parts);  // part 0 on the caller
    std::unique_lock lock(mutex_);
    done_.wait(lock, [&] { return pending_ == 0; });
    fn_ = nullptr;
    t_in_pool = false;
  }

 private:
  void worker(int index, long seen) {
    t_in_pool = true;
    while (true) {
      std::unique_lock lock(mutex_);
      wake_.wait(lock, [&] { return generation_ != seen; });
      seen = generation_;
      if (stopping_) return;
      if (index >= parts_ || fn_ == nullptr) continue;
      auto fn = fn_;
      int64_t begin = count_ * index / parts_, end = count_ * (index + 1) / parts_;
      lock.unlock();
      (*fn)(begin, end);
      lock.lock();
      if (--pending_ == 0) done_.notify_all();
    }
  }

  std::mutex run_mutex_;  // one call at a time
  std::mutex mutex_;
  std::condition_variable wake_, done_;
  std::vector<std::thread> workers_;
  int size_ = 1;
  bool stopping_ = false;
  long generation_ = 0;
  const std::function<void(int64_t, int64_t)>* fn_ = nullptr;
  int64_t count_ = 0;
  int parts_ = 0;
  int pending_ = 0;
};

Pool& pool() {
  static Pool instance;
  return instance;
}

}  // namespace

void set_compute_threads(int threads) {
  if (threads != pool().size()) pool().resize(threads);
}

int compute_threads() { return pool().size(); }

void parallel_for(int64_t count, const std::function<void(int64_t, int64_t)>& fn) {
  if (count <= 0) return;
  pool().run(count, fn);
}

}  // namespace pm
