// A small pool of compute threads for splitting one kernel call (e.g. a GEMM's column panels).
// The calling thread takes part. Static partitioning: each index is always run by one thread, so
// results never depend on the thread count.
#pragma once

#include <cstdint>
#include <functional>

namespace pm {

void set_compute_threads(int threads);
int compute_threads();

// Runs fn(begin, end) on disjoint ranges covering [0, count), in parallel when worth it.
void parallel_for(int64_t count, const std::function<void(int64_t, int64_t)>& fn);

}  // namespace pm
