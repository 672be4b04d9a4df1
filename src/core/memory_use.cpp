#include "core/memory_use.h"

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <string>

namespace pm {
namespace {

double status_mb(const char* field) {
  std::ifstream in("/proc/self/status");
  std::string line;
  while (std::getline(in, line))
    if (line.rfind(field, 0) == 0) return std::strtod(line.c_str() + std::strlen(field), nullptr) / 1024.0;
  return NAN;
}

}  // namespace

double resident_mb() { return status_mb("VmRSS:"); }
double peak_resident_mb() { return status_mb("VmHWM:"); }

}  // namespace pm
