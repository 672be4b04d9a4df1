// A named parameter and its gradient, as the optimizer, the all-reduce and checkpoints see it.
#pragma once

#include <string>

#include "core/tensor.h"

namespace pm {

struct Parameter {
  std::string name;         // e.g. "blocks.1.attn.w_qkv"
  Tensor* value = nullptr;
  Tensor* grad = nullptr;
  bool expert = false;      // this rank's experts along dim 0: gradients stay local
  bool decay = true;        // weight decay applies (matrices; not biases, norms, embeddings)
};

}  // namespace pm
