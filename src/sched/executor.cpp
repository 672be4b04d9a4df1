#include "sched/executor.h"

#include <pthread.h>
#include <sched.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <ctime>

#include "core/clock.h"
#include "core/error.h"
#include "sched/trace.h"

namespace pm {

Executor::Executor(Mode mode) : mode_(mode) {
  if (mode_ == Mode::overlapped) comm_thread_ = std::thread([this] { comm_thread_main(); });
}

Executor::~Executor() {
  {
    std::lock_guard lock(mutex_);
    stopping_ = true;
  }
  changed_.notify_all();
  if (comm_thread_.joinable()) comm_thread_.join();
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

}  // namespace

void Executor::comm_thread_main() {
  prioritize_this_thread();
  long seen = 0;
  std::unique_lock lock(mutex_);
  while (true) {
    changed_.wait(lock, [&] { return stopping_ || !jobs_.empty() || generation_ != seen; });
    if (stopping_) return;
    // jobs posted before a graph's run() precede its communication tasks
    run_posted_jobs(lock);
    if (generation_ == seen) continue;
    seen = generation_;
    lock.unlock();
    run_lane(Lane::comm);
    lock.lock();
    comm_lane_done_ = true;
    changed_.notify_all();
  }
}

namespace {

double thread_cpu_s() {
  timespec ts;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return ts.tv_sec + ts.tv_nsec * 1e-9;
}

}  // namespace

void Executor::run_posted_jobs(std::unique_lock<std::mutex>& lock) {
  while (!jobs_.empty()) {
    PostedJob job = std::move(jobs_.front());
    jobs_.pop_front();
    if (job_error_) continue;  // the communicator is in an unknown state: skip, drain() reports
    job_running_ = true;
    lock.unlock();
    std::exception_ptr error;
    double start = now_s();
    try {
      job.run();
    } catch (...) {
      error = std::current_exception();
    }
    if (job.trace) job.trace->add({job.name, job.trace->category(), static_cast<int>(Lane::comm), start, now_s()});
    lock.lock();
    job_running_ = false;
    if (error && !job_error_) job_error_ = error;
    changed_.notify_all();
  }
}

void Executor::post(std::string name, std::function<void()> job, Trace* trace) {
  if (mode_ == Mode::serial) {
    double start = now_s();
    job();
    if (trace) trace->add({name, trace->category(), static_cast<int>(Lane::comm), start, now_s()});
    return;
  }
  {
    std::lock_guard lock(mutex_);
    jobs_.push_back({std::move(name), std::move(job), trace});
  }
  changed_.notify_all();
}

double Executor::drain() {
  const double start = now_s();
  std::unique_lock lock(mutex_);
  changed_.wait(lock, [&] { return jobs_.empty() && !job_running_; });
  if (job_error_) {
    std::exception_ptr error = job_error_;
    job_error_ = nullptr;
    std::rethrow_exception(error);
  }
  return now_s() - start;
}

void Executor::record(int id, double start_s, double end_s, double cpu_s) {
  const Task& task = graph_->tasks()[id];
  stats_.busy_s[static_cast<int>(task.lane)] += end_s - start_s;
  stats_.kind_busy_s[static_cast<int>(task.kind)] += end_s - start_s;
  if (task.lane == Lane::comm) stats_.comm_cpu_s += cpu_s;
  stats_.records.push_back({id, start_s, end_s, cpu_s});
  if (trace_) trace_->add({task.name, trace_->category(), static_cast<int>(task.lane), start_s, end_s});
}

// Takes, again and again, the first ready task of this lane, until the lane has none left or a
// task failed anywhere.
void Executor::run_lane(Lane lane) {
  const std::vector<int>& mine = lane_tasks_[static_cast<int>(lane)];
  std::unique_lock lock(mutex_);
  while (!error_) {
    int next = -1;
    bool any_left = false;
    for (int id : mine) {
      if (started_[id]) continue;
      any_left = true;
      bool ready = true;
      for (int dep : graph_->tasks()[id].deps) ready = ready && done_[dep];
      if (ready) {
        next = id;
        break;
      }
    }
    if (!any_left) return;
    if (next < 0) {
      changed_.wait(lock);
      continue;
    }
    started_[next] = 1;
    Task& task = graph_->tasks()[next];
    lock.unlock();
    double start = now_s(), cpu_start = thread_cpu_s();
    try {
      task.run();
    } catch (...) {
      lock.lock();
      if (!error_) error_ = std::current_exception();
      changed_.notify_all();
      return;
    }
    double end = now_s(), cpu = thread_cpu_s() - cpu_start;
    lock.lock();
    record(next, start, end, cpu);
    done_[next] = 1;
    changed_.notify_all();
  }
}

void Executor::run(TaskGraph& graph, Trace* trace) {
  const double start = now_s();
  {
    std::lock_guard lock(mutex_);
    if (job_error_) std::rethrow_exception(job_error_);  // a posted job failed: the communicator is unusable
    graph_ = &graph;
    trace_ = trace;
    started_.assign(graph.size(), 0);
    done_.assign(graph.size(), 0);
    for (auto& lane : lane_tasks_) lane.clear();
    for (int id = 0; id < graph.size(); ++id) {
      Lane lane = mode_ == Mode::serial ? Lane::compute : graph.tasks()[id].lane;
      lane_tasks_[static_cast<int>(lane)].push_back(id);
    }
    error_ = nullptr;
    stats_ = ExecutorStats{};
    comm_lane_done_ = lane_tasks_[static_cast<int>(Lane::comm)].empty();
    if (!comm_lane_done_) ++generation_;
  }
  changed_.notify_all();
  run_lane(Lane::compute);
  {
    std::unique_lock lock(mutex_);
    changed_.wait(lock, [&] { return comm_lane_done_; });
    stats_.wall_s = now_s() - start;
    graph_ = nullptr;
    if (error_) std::rethrow_exception(error_);
  }
}

}  // namespace pm
