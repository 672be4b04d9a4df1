// Cache lines fetched ahead of their use, for the kernels of kernels/cpu.
#pragma once

namespace pm {

// A cache line fetched ahead into L1 (prefetcht0) or L2 (prefetcht1). In asm: GCC 12 (-O3)
// removes a loop of _mm_prefetch or __builtin_prefetch calls and nothing else as code without
// effect, silently (docs/BENCHMARKS.md, "Expert outputs straight into the all-to-all's rows").
inline void fetch_into_l1(const void* p) { asm volatile("prefetcht0 %0" : : "m"(*static_cast<const char*>(p))); }
inline void fetch_into_l2(const void* p) { asm volatile("prefetcht1 %0" : : "m"(*static_cast<const char*>(p))); }

}  // namespace pm
