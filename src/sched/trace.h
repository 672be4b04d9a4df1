// Records what ran on which lane and when, and writes it as a Chrome / Perfetto trace
// (chrome://tracing or ui.perfetto.dev): one process per rank, one thread per lane.
#pragma once

#include <functional>
#include <mutex>
#include <string>
#include <vector>

namespace pm {

struct TraceEvent {
  std::string name;
  std::string category;  // e.g. "forward", "backward"
  int lane = 0;         // lane id (sched/task_graph.h)
  double start_s = 0;  // on the now_s() clock
  double end_s = 0;
};

class Trace {
 public:
  void add(TraceEvent event);
  // Tasks of the next graphs are tagged with this category.
  void set_category(std::string category);
  std::string category() const;
  std::vector<TraceEvent> events() const;
  void clear();

  // Every rank's events in one trace file, written by rank 0. Collective through `gather`, which
  // takes this rank's events (JSON) and returns every rank's on rank 0 (nothing elsewhere), e.g.
  // a communicator's gather_strings. Times are relative to origin_s, taken after a barrier, so
  // lanes of different ranks line up to within the barrier's skew.
  using Gather = std::function<std::vector<std::string>(const std::string& mine)>;
  void write_chrome_json(const std::string& path, double origin_s, int rank, const Gather& gather) const;

 private:
  mutable std::mutex mutex_;
  std::vector<TraceEvent> events_;
  std::string category_ = "task";
};

// Records one span of work on a lane for as long as it lives (nothing when trace is null): for
// work outside task graphs, such as a model's dense layers.
class TraceSpan {
 public:
  TraceSpan(Trace* trace, std::string name, int lane = 0);
  ~TraceSpan();
  TraceSpan(const TraceSpan&) = delete;
  TraceSpan& operator=(const TraceSpan&) = delete;

 private:
  Trace* trace_;
  std::string name_;
  int lane_;
  double start_s_;
};

}  // namespace pm
