// A named parameter and its gradient, as the optimizer, the all-reduce and checkpoints see it.
#pragma once

#include <string>
#include <vector>

#include "core/tensor.h"

namespace pm {

struct Parameter {
  std::string name;         // e.g. "blocks.1.attn.w_qkv"
  Tensor* value = nullptr;
  Tensor* grad = nullptr;
  // Sharded: this rank holds a slice of the whole tensor, the others of its group the rest (its
  // experts along dim 0; a tensor-parallel weight's columns or rows). Its gradient is this rank's
  // own, summed only over the ranks that hold the same slice.
  bool expert = false;
  bool decay = true;        // weight decay applies (matrices; not biases, norms, embeddings)
  // Where the slice lies: along shard_dim the whole tensor is parts in the proportions shard_parts
  // (w_qkv's columns: q, k and v, {1, 1, 1}, or {heads, kv_heads, kv_heads} with grouped-query
  // attention) and every part is split in equal consecutive pieces over the group's ranks in
  // order; rank r holds piece r of every part, the parts in order (core/shard.h).
  int shard_dim = 0;
  std::vector<int> shard_parts{1};
};

}  // namespace pm
