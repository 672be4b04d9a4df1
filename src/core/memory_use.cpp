#include "core/memory_use.h"

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <string>

namespace pm {
namespace {

// A "Field:  N kB" line of a /proc file, in MB.
double proc_mb(const char* file, const char* field) {
  std::ifstream in(file);
  std::string line;
  while (std::getline(in, line))
    if (line.rfind(field, 0) == 0) return std::strtod(line.c_str() + std::strlen(field), nullptr) / 1024.0;
  return NAN;
}

}  // namespace

double resident_mb() { return proc_mb("/proc/self/status", "VmRSS:"); }
double peak_resident_mb() { return proc_mb("/proc/self/status", "VmHWM:"); }
double huge_pages_mb() { return proc_mb("/proc/self/smaps_rollup", "AnonHugePages:"); }

}  // namespace pm
