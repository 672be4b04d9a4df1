// Logging to stderr. info() speaks only on rank 0 (what the user reads once); every_rank() prefixes
// the rank. Results (tables, JSON) go to stdout, never through here.
#pragma once

#include <fmt/format.h>

#include <string>

namespace pm::log {

// The process's rank; a thread that plays a rank of its own (ranks as threads, for tests) sets
// its own, which wins on that thread.
void set_rank(int rank);
void set_thread_rank(int rank);
int rank();
void set_quiet(bool quiet);
bool quiet();
void write_line(const std::string& line);

template <typename... Args>
void info(fmt::format_string<Args...> format, Args&&... args) {
  if (rank() == 0 && !quiet()) write_line(fmt::format(format, std::forward<Args>(args)...));
}

template <typename... Args>
void every_rank(fmt::format_string<Args...> format, Args&&... args) {
  write_line(fmt::format("[rank {}] {}", rank(), fmt::format(format, std::forward<Args>(args)...)));
}

}  // namespace pm::log
