// Runs a task graph: the compute lane on the calling thread, the communication lane on a thread
// of its own, so that chunk i's all-to-all really overlaps chunk i-1's expert GEMMs.
//
// The communication thread sleeps on a condition variable while it has nothing to do, and its
// tasks wait for MPI with the Communicator's sleeping wait policy: it does not take the core from
// the compute lane. serial mode runs every task in id order on the caller: the same math with no
// overlap, for tests and for timing each lane alone.
#pragma once

#include <condition_variable>
#include <deque>
#include <exception>
#include <functional>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "sched/task_graph.h"

namespace pm {

class Trace;

// What one task did in a run: when (on the now_s() clock) and, on the communication lane, how
// much CPU its thread used (the waiting side should sleep: cpu_s well below end_s - start_s).
struct TaskRecord {
  int task = -1;
  double start_s = 0, end_s = 0;
  double cpu_s = 0;
};

// Time each lane spent in tasks during the last run, and the run's wall time.
struct ExecutorStats {
  double wall_s = 0;
  double busy_s[kNumLanes] = {0, 0};
  double kind_busy_s[kNumTaskKinds] = {};
  double comm_cpu_s = 0;            // CPU time of the communication lane's thread in its tasks
  std::vector<TaskRecord> records;  // one per task, in completion order
};

class Executor {
 public:
  enum class Mode { overlapped, serial };
  explicit Executor(Mode mode = Mode::overlapped);
  ~Executor();
  Executor(const Executor&) = delete;
  Executor& operator=(const Executor&) = delete;

  // Runs every task of the graph; returns when all are done. Rethrows the first task error.
  void run(TaskGraph& graph, Trace* trace = nullptr);
  Mode mode() const { return mode_; }

  // Background communication outside any graph, such as a bucket of gradients to all-reduce while
  // the backward goes on. The job runs on the communication thread after every job posted before
  // it and before the communication tasks of any graph run after it: the same program order on
  // every rank, so collectives match. The caller must not use the communicator itself until
  // drain() returns (MPI is initialised for one thread at a time). Serial mode runs it at once.
  void post(std::string name, std::function<void()> job, Trace* trace = nullptr);
  // Waits for every posted job; returns the seconds spent waiting. Rethrows a job's error.
  double drain();
  const ExecutorStats& last_stats() const { return stats_; }

 private:
  void comm_thread_main();
  void run_posted_jobs(std::unique_lock<std::mutex>& lock);
  void run_lane(Lane lane);
  void record(int id, double start_s, double end_s, double cpu_s);

  Mode mode_;
  std::thread comm_thread_;
  std::mutex mutex_;
  std::condition_variable changed_;
  bool stopping_ = false;
  long generation_ = 0;      // counts graphs, wakes the comm thread for a new one
  bool comm_lane_done_ = true;

  struct PostedJob {
    std::string name;
    std::function<void()> run;
    Trace* trace;
  };
  std::deque<PostedJob> jobs_;  // guarded by mutex_
  bool job_running_ = false;
  std::exception_ptr job_error_;

  // State of the graph being run, guarded by mutex_.
  TaskGraph* graph_ = nullptr;
  Trace* trace_ = nullptr;
  std::vector<char> started_, done_;
  std::vector<int> lane_tasks_[kNumLanes];
  std::exception_ptr error_;
  ExecutorStats stats_;
};

}  // namespace pm
