#include "sched/trace.h"

#include <cstdio>
#include <fstream>
#include <nlohmann/json.hpp>

#include "core/clock.h"
#include "core/error.h"
#include "sched/task_graph.h"

namespace pm {

void Trace::add(TraceEvent event) {
  std::lock_guard lock(mutex_);
  events_.push_back(std::move(event));
}

void Trace::set_category(std::string category) {
  std::lock_guard lock(mutex_);
  category_ = std::move(category);
}

std::string Trace::category() const {
  std::lock_guard lock(mutex_);
  return category_;
}

std::vector<TraceEvent> Trace::events() const {
  std::lock_guard lock(mutex_);
  return events_;
}

void Trace::clear() {
  std::lock_guard lock(mutex_);
  events_.clear();
}

TraceSpan::TraceSpan(Trace* trace, std::string name, int lane)
    : trace_(trace), name_(std::move(name)), lane_(lane), start_s_(trace ? now_s() : 0) {}

TraceSpan::~TraceSpan() {
  if (trace_) trace_->add({name_, trace_->category(), lane_, start_s_, now_s()});
}

void Trace::write_chrome_json(const std::string& path, double origin_s, int rank, const Gather& gather) const {
  nlohmann::json mine = nlohmann::json::array();
  for (const TraceEvent& e : events()) {
    mine.push_back({{"name", e.name},
                    {"cat", e.category},
                    {"ph", "X"},
                    {"pid", rank},
                    {"tid", e.lane},
                    {"ts", (e.start_s - origin_s) * 1e6},
                    {"dur", (e.end_s - e.start_s) * 1e6}});
  }
  std::vector<std::string> all = gather(mine.dump());
  if (rank != 0) return;

  nlohmann::json events = nlohmann::json::array();
  for (int r = 0; r < static_cast<int>(all.size()); ++r) {
    events.push_back({{"name", "process_name"}, {"ph", "M"}, {"pid", r}, {"args", {{"name", fmt::format("rank {}", r)}}}});
    for (int lane = 0; lane < lane_count(); ++lane)
      events.push_back({{"name", "thread_name"}, {"ph", "M"}, {"pid", r}, {"tid", lane},
                        {"args", {{"name", lane_name(Lane{lane})}}}});
    for (auto& e : nlohmann::json::parse(all[r])) events.push_back(std::move(e));
  }
  nlohmann::json doc = {{"traceEvents", events}, {"displayTimeUnit", "ms"}};
  std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp);
    PM_IO_CHECK(out.good(), "cannot write trace file {}", tmp);
    out << doc.dump() << "\n";
    PM_IO_CHECK(out.good(), "writing trace file {} failed", tmp);
  }
  PM_IO_CHECK(std::rename(tmp.c_str(), path.c_str()) == 0, "cannot rename {} to {}", tmp, path);
}

}  // namespace pm
