// Softmax cross-entropy over a vocabulary, for next-token prediction.
#pragma once

#include <cstdint>

namespace pm {

// logits[rows, V], targets[rows] -> per-row loss (nats) in losses[rows]; dlogits[rows, V] =
// (softmax - onehot) * scale, computed in the same pass when dlogits is not null.
void cross_entropy(const float* logits, const int32_t* targets, int64_t rows, int64_t V, float* losses,
                   float* dlogits, float scale);

}  // namespace pm
