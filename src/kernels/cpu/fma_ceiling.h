// The core's own arithmetic ceiling: fused multiply-adds with nothing else in the way (no memory,
// independent chains), in the widest vectors our GEMM kernels use here. `bench gemm` prints its
// peak against this, so "how close to the hardware" has an answer on any machine, whatever the
// clock or the number of FMA units.
#pragma once

namespace pm {

// GFLOP/s of this thread running FMA chains for about `seconds` (an FMA counts 2 FLOPs per lane).
double fma_ceiling_gflops(double seconds = 0.2);

// The same for AVX512_BF16's dot product (vdpbf16ps chains; 4 FLOPs per 32-bit lane: two bf16
// products and their adds), the ceiling of bf16 GEMMs; 0 where the CPU has no AVX512_BF16.
double bf16_dot_ceiling_gflops(double seconds = 0.2);

// The same for AMX's tile product (TDPBF16PS on four accumulator tiles, operands in tiles: 32768
// FLOPs an instruction), the ceiling of bf16 GEMMs in the amx order; 0 where AMX does not run.
double amx_ceiling_gflops(double seconds = 0.2);

}  // namespace pm
