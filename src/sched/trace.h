// Records what ran on which lane and when, and writes it as a Chrome / Perfetto trace
// (chrome://tracing or ui.perfetto.dev): one process per rank, one thread per lane.
#pragma once

#include <mutex>
#include <string>
#include <vector>

namespace pm {

class Communicator;

struct TraceEvent {
  std::string name;
  std::string category;  // e.g. "forward", "backward"
  int lane = 0;
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

  // Gathers every rank's events on rank 0 and writes one trace file there. Times are aligned
  // after a barrier, so lanes of different ranks line up to within the barrier's skew.
  void write_chrome_json(const std::string& path, Communicator& comm, double origin_s) const;

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
