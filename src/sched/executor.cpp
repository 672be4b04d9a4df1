#include "sched/executor.h"

#include <pthread.h>
#include <sched.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <ctime>
#include <limits>

#include "core/clock.h"
#include "core/error.h"
#include "sched/trace.h"

namespace pm {

double ExecutorStats::cost_busy(const std::string& cost) const {
  auto it = cost_busy_s.find(cost);
  return it == cost_busy_s.end() ? 0.0 : it->second;
}

Executor::Executor(Mode mode) : mode_(mode) {
  if (mode_ == Mode::overlapped) lane_thread(lanes::comm);  // every pass of a layer needs it: start it now
}

Executor::~Executor() {
  {
    std::lock_guard lock(mutex_);
    stopping_ = true;
  }
  changed_.notify_all();
  for (auto& [id, t] : threads_) t->thread.join();
}

namespace {

// The communication thread sleeps through transfers and must run the moment it wakes: on a CPU
// rank every core is busy computing, and the scheduler let a woken thread wait up to ~2 ms for a
// core (measured: a chunk's all-to-all started 1.9 ms after the lane was free, while both cores
// ran GEMMs). A real-time priority lets it preempt the compute threads at once; it uses a few
// percent of a core, and the kernel caps real-time threads anyway. Without the privilege
// (CAP_SYS_NICE or an RLIMIT_RTPRIO), a higher nice value is the fallback; failing both, it
// runs as it is.
void prioritize_this_thread() {
  sched_param param{};
  param.sched_priority = 1;
  if (pthread_setschedparam(pthread_self(), SCHED_FIFO, &param) == 0) return;
  setpriority(PRIO_PROCESS, static_cast<id_t>(syscall(SYS_gettid)), -10);
}

double thread_cpu_s() {
  timespec ts;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return ts.tv_sec + ts.tv_nsec * 1e-9;
}

}  // namespace

Executor::LaneThread& Executor::lane_thread(Lane lane) {
  std::unique_ptr<LaneThread>& t = threads_[lane.id];
  if (!t) {
    t = std::make_unique<LaneThread>();
    t->lane = lane;
    LaneThread* self = t.get();
    t->thread = std::thread([this, self] { lane_thread_main(*self); });
  }
  return *t;
}

void Executor::lane_thread_main(LaneThread& self) {
  // only the lane that waits for the network; a copy lane does CPU work and must not preempt
  if (self.lane == lanes::comm) prioritize_this_thread();
  set_compute_lane_beside(&compute_idle_);
  long seen = 0;
  std::unique_lock lock(mutex_);
  while (true) {
    changed_.wait(lock, [&] { return stopping_ || generation_ != seen; });
    if (stopping_) return;
    seen = generation_;
    if (!self.running) continue;
    lock.unlock();
    run_lane(self.lane);
    lock.lock();
    self.running = false;
    changed_.notify_all();
  }
}

void Executor::record(int id, double start_s, double end_s, double cpu_s) {
  // the task's own lane, also in serial mode: timing each lane alone reads it
  const Task& task = graph_->task(id);
  const Lane lane = task.lane;
  if (lane.id >= static_cast<int>(stats_.busy_s.size())) stats_.busy_s.resize(lane.id + 1, 0.0);
  stats_.busy_s[lane.id] += end_s - start_s;
  stats_.cost_busy_s[task.cost] += end_s - start_s;
  if (lane == lanes::comm) stats_.comm_cpu_s += cpu_s;
  stats_.records.push_back({id, start_s, end_s, cpu_s});
  if (trace_) trace_->add({task.name, trace_->category(), task.lane.id, start_s, end_s});
}

// Takes, again and again, the lane's next task by the lane policy, until the lane has none left
// or a task failed anywhere.
void Executor::run_lane(Lane lane) {
  const double inf = std::numeric_limits<double>::infinity();
  auto ready_at = [&](int id) {
    for (int dep : graph_->task(id).deps)
      if (!done_[dep]) return inf;
    return 0.0;
  };
  std::unique_lock lock(mutex_);
  while (!error_) {
    int next = queues_->pick(lane, 0.0, ready_at).task;
    if (next < 0) {
      if (!queues_->has_tasks_left(lane)) return;
      if (lane == lanes::compute) compute_idle_.set(true);
      lane_ready_.at(lane.id)->wait(lock);
      if (lane == lanes::compute) compute_idle_.set(false);
      continue;
    }
    Task& task = graph_->tasks()[next];
    lock.unlock();
    double start = now_s(), cpu_start = thread_cpu_s();
    try {
      task.run();
    } catch (...) {
      lock.lock();
      if (!error_) error_ = std::current_exception();
      for (auto& [id, ready] : lane_ready_) ready->notify_all();  // every lane stops
      changed_.notify_all();
      return;
    }
    double end = now_s(), cpu = thread_cpu_s() - cpu_start;
    lock.lock();
    record(next, start, end, cpu);
    done_[next] = 1;
    for (int id : wake_lanes_[next]) {
      // the compute lane may have work again: its waiters go back to their sleeping schedule
      if (id == lanes::compute.id) compute_idle_.set(false);
      lane_ready_.at(id)->notify_all();
    }
  }
}

bool Executor::all_lanes_done() const {
  for (const auto& [id, t] : threads_)
    if (t->running) return false;
  return true;
}

void Executor::run(TaskGraph& graph, Trace* trace) {
  const double start = now_s();
  {
    std::lock_guard lock(mutex_);
    graph_ = &graph;
    trace_ = trace;
    queues_.emplace(graph, mode_ == Mode::serial);
    done_.assign(graph.size(), 0);
    wake_lanes_.assign(graph.size(), {});
    for (int id = 0; id < graph.size(); ++id) {
      const Task& t = graph.task(id);
      if (!lane_ready_.count(t.lane.id)) lane_ready_[t.lane.id] = std::make_unique<std::condition_variable>();
      for (int dep : t.deps) {
        std::vector<int>& wake = wake_lanes_[dep];
        if (std::find(wake.begin(), wake.end(), t.lane.id) == wake.end()) wake.push_back(t.lane.id);
      }
    }
    error_ = nullptr;
    stats_ = ExecutorStats{};
    for (Lane lane : queues_->lanes())
      if (lane != lanes::compute) lane_thread(lane).running = true;
    ++generation_;
  }
  changed_.notify_all();
  run_lane(lanes::compute);
  {
    std::unique_lock lock(mutex_);
    compute_idle_.set(true);  // the compute lane is done; the other lanes finish theirs
    changed_.wait(lock, [&] { return all_lanes_done(); });
    compute_idle_.set(false);
    stats_.wall_s = now_s() - start;
    graph_ = nullptr;
    queues_.reset();
    if (error_) std::rethrow_exception(error_);
  }
}

}  // namespace pm
