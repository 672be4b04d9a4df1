// A sum over ranks with bfloat16 on the wire: half the bytes of a float32 all-reduce, for the
// gradient all-reduce of data-parallel training (config grad_allreduce_dtype "bf16"), where that
// all-reduce is the communication left exposed (docs/BENCHMARKS.md, bf16 training).
//
// A reduce-scatter then an all-gather, both in bf16: rank r receives every rank's slice r
// (rounded to bf16, nearest even), sums them in float32 in rank order, rounds the sum to bf16 and
// every rank gathers the sums. So every element of the result is
//   bf16( (((bf16(x_0) + bf16(x_1)) + bf16(x_2)) + ...) )   in float32,
// the same bits on every rank and from run to run, whatever MPI's algorithms.
#pragma once

#include <cstdint>

#include "comm/communicator.h"

namespace pm {

// data[n]: this rank's values in, the sum out (as float32 values bf16 can hold); one rank: as is.
void allreduce_sum_bf16_wire(Communicator& comm, float* data, int64_t n);

}  // namespace pm
