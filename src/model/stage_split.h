// Which blocks each pipeline stage holds (config pipeline_split): "even" (as many blocks each as
// they go, Megatron-LM's default), "cost" (the split whose most expensive stage costs least, by
// each block's FLOPs per token: an MoE block, its experts at their capacity, counts about twice a
// dense one, and the last stage also computes the head), or the blocks per stage written out,
// "3,1". Stages are consecutive blocks; each holds at least one.
#pragma once

#include <string>
#include <vector>

#include "model/train_config.h"

namespace pm {

// starts[s] is stage s's first block, starts[pp] = layers. Usage error for a split that is not one.
std::vector<int> stage_starts(const ModelConfig& model, int vocab, int pp, const std::string& split);

// Forward FLOPs per token of block l (the backward is twice that), and of the head.
double block_cost(const ModelConfig& model, int l);
double head_cost(const ModelConfig& model, int vocab);

}  // namespace pm
