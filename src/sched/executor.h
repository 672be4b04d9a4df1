// Runs a task graph for real: the compute lane on the calling thread, every other lane on a
// thread of its own (created the first time a graph uses the lane, then kept), so that chunk i's
// all-to-all really overlaps chunk i-1's expert GEMMs, and a dense block's compute overlaps an MoE
// layer's all-to-all.
//
// Lane threads sleep on a condition variable while they have nothing to do; communication tasks
// wait for the network with the Waiter's sleeping policy, so they do not take the core from the
// compute lane. Serial mode runs every task in the order added on the caller: the same math with
// no overlap, for tests and for timing each lane alone.
#pragma once

#include <condition_variable>
#include <exception>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "core/compute_idle.h"
#include "sched/lane_policy.h"
#include "sched/task_graph.h"

namespace pm {

class Trace;

// What one task did in a run: when (on the now_s() clock) and how much CPU its thread used (a
// waiting lane should sleep: cpu_s well below end_s - start_s).
struct TaskRecord {
  int task = -1;
  double start_s = 0, end_s = 0;
  double cpu_s = 0;
};

// Time each lane spent in tasks during the last run, and the run's wall time.
struct ExecutorStats {
  double wall_s = 0;
  std::vector<double> busy_s = std::vector<double>(3, 0.0);  // per lane id
  std::map<std::string, double> cost_busy_s;                  // per cost class
  double comm_cpu_s = 0;            // CPU time of the communication lane's thread in its tasks
  std::vector<TaskRecord> records;  // one per task, in completion order
  double busy(Lane lane) const { return lane.id < static_cast<int>(busy_s.size()) ? busy_s[lane.id] : 0.0; }
  double cost_busy(const std::string& cost) const;
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

  const ExecutorStats& last_stats() const { return stats_; }

 private:
  struct LaneThread {
    Lane lane;
    std::thread thread;
    bool running = false;  // has tasks of the current graph left to run
  };
  LaneThread& lane_thread(Lane lane);
  void lane_thread_main(LaneThread& self);
  void run_lane(Lane lane);
  void record(int id, double start_s, double end_s, double cpu_s);
  bool all_lanes_done() const;

  Mode mode_;
  std::mutex mutex_;
  std::condition_variable changed_;
  bool stopping_ = false;
  long generation_ = 0;  // counts graphs: wakes the lane threads for a new one
  std::map<int, std::unique_ptr<LaneThread>> threads_;  // by lane id; never the compute lane

  // State of the graph being run, guarded by mutex_.
  TaskGraph* graph_ = nullptr;
  Trace* trace_ = nullptr;
  std::optional<LaneQueues> queues_;
  std::vector<char> done_;
  // A lane waits on its own condition variable, and a finished task wakes only the lanes that
  // hold a task depending on it: one wake-up per lane per task (the communication lane, at a
  // real-time priority, preempted the compute lane after every one of its tasks before; a decode
  // pass of small tasks spent a quarter of its time in those wake-ups).
  std::map<int, std::unique_ptr<std::condition_variable>> lane_ready_;  // by lane id
  std::vector<std::vector<int>> wake_lanes_;                           // per task: lanes of its dependents
  std::exception_ptr error_;
  ExecutorStats stats_;
  // Set while the compute lane waits with nothing to run: the lane threads' transfers are then
  // tested often instead of slept through (core/compute_idle.h).
  ComputeIdle compute_idle_;
};

}  // namespace pm
