// The core's own arithmetic ceiling: fused multiply-adds with nothing else in the way (no memory,
// independent chains), in the widest vectors our GEMM kernels use here. `bench gemm` prints its
// peak against this, so "how close to the hardware" has an answer on any machine, whatever the
// clock or the number of FMA units.
#pragma once

namespace pm {

// GFLOP/s of this thread running FMA chains for about `seconds` (an FMA counts 2 FLOPs per lane).
double fma_ceiling_gflops(double seconds = 0.2);

}  // namespace pm
