#include "core/log.h"

#include <cstdio>

namespace pm::log {
namespace {
int g_rank = 0;
bool g_quiet = false;
}  // namespace

void set_rank(int rank) { g_rank = rank; }
int rank() { return g_rank; }
void set_quiet(bool quiet) { g_quiet = quiet; }
bool quiet() { return g_quiet; }

void write_line(const std::string& line) {
  std::fputs(line.c_str(), stderr);
  std::fputc('\n', stderr);
  std::fflush(stderr);
}

}  // namespace pm::log
