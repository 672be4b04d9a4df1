#include "core/log.h"

#include <cstdio>

namespace pm::log {
namespace {
int g_rank = 0;
thread_local int t_rank = -1;
bool g_quiet = false;
}  // namespace

void set_rank(int rank) { g_rank = rank; }
void set_thread_rank(int rank) { t_rank = rank; }
int rank() { return t_rank >= 0 ? t_rank : g_rank; }
void set_quiet(bool quiet) { g_quiet = quiet; }
bool quiet() { return g_quiet; }

void write_line(const std::string& line) {
  std::fputs(line.c_str(), stderr);
  std::fputc('\n', stderr);
  std::fflush(stderr);
}

}  // namespace pm::log
