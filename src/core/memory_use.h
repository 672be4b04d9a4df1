// This process's resident memory, now and at its peak (MB, from /proc/self/status; NaN where the
// system does not say): what soak tests and benchmarks report. And how much of it sits in
// transparent huge pages now (MB, /proc/self/smaps_rollup's AnonHugePages): whether the large
// buffers' advice (core/aligned.h) took.
#pragma once

namespace pm {

double resident_mb();
double peak_resident_mb();
double huge_pages_mb();

}  // namespace pm
