// This process's resident memory, now and at its peak (MB, from /proc/self/status; NaN where the
// system does not say): what soak tests and benchmarks report.
#pragma once

namespace pm {

double resident_mb();
double peak_resident_mb();

}  // namespace pm
