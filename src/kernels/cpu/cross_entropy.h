// Softmax cross-entropy over a vocabulary, for next-token prediction.
#pragma once

#include <cstdint>

namespace pm {

// logits[rows, V], targets[rows] -> per-row loss (nats) in losses[rows]; dlogits[rows, V] =
// (softmax - onehot) * scale, computed in the same pass when dlogits is not null.
void cross_entropy(const float* logits, const int32_t* targets, int64_t rows, int64_t V, float* losses,
                   float* dlogits, float scale);

// The vocabulary-parallel form in three phases (kernels/backend.h shard_row_max ...): this rank's
// columns [lo, lo + V) of the logits; between the phases the caller reduces over the ranks.
void shard_row_max(const float* logits, int64_t rows, int64_t V, float* max);
void shard_exp_sums(const float* logits, const int32_t* targets, int64_t rows, int64_t V, int64_t lo, const float* max,
                    double* sums);
void shard_cross_entropy(const float* logits, const int32_t* targets, int64_t rows, int64_t V, int64_t lo,
                         const float* max, const double* sums, float* losses, float* dlogits, float scale);

}  // namespace pm
