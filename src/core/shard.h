// A sharded parameter's slice and the whole tensor (core/parameter.h: shard_dim, shard_parts):
// along `dim` the whole is parts in the proportions `parts`, each split in `places` consecutive
// pieces; the slice of place r is piece r of every part, the parts in order. Experts are dim 0
// with one part; a tensor-parallel w_qkv is dim 1 with three (q, k, v: each rank its heads of
// all three; {heads, kv_heads, kv_heads} with grouped-query attention).
#pragma once

#include <vector>

#include "core/tensor.h"

namespace pm {

// The whole tensor's shape from one slice's.
Shape whole_shape(const Shape& slice, int dim, int places);
// slice <- place `place`'s piece of whole.
void take_shard(const Tensor& whole, Tensor& slice, int dim, const std::vector<int>& parts, int place, int places);
// The floats [first, end) of the whole tensor that place `place`'s slice lies in: what a rank
// needs of the whole (a checkpoint's load sends each rank its span alone).
struct ShardSpan {
  int64_t first = 0, end = 0;
  int64_t size() const { return end - first; }
};
ShardSpan shard_span(const Shape& slice, int dim, const std::vector<int>& parts, int place, int places);
// slice <- place `place`'s piece of the whole, given the whole's floats from `first` on at
// `window` (at least the slice's span).
void take_shard_from(const float* window, int64_t first, Tensor& slice, int dim, const std::vector<int>& parts,
                     int place, int places);
// whole <- slice, at place `place`.
void put_shard(const Tensor& slice, Tensor& whole, int dim, const std::vector<int>& parts, int place, int places);

}  // namespace pm
