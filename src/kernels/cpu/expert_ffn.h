// One expert's FFN on a block of rows, on the CPU: FFN(u) = GeLU(u W1 + b1) W2 + b2, with
// W1[M, H], W2[H, M]. Forward keeps the pre-activation; backward is split in two so that the
// pipeline can send the input gradient of each chunk before the weight gradients (which no other
// rank waits for) are computed once over all rows. GeLU runs inside the GEMMs, on each finished
// tile while it is in cache.
#pragma once

#include <cstdint>
#include <vector>

#include "kernels/cpu/gemm.h"

namespace pm {

// An expert's weights, packed once per pass for the GEMMs of every chunk.
struct ExpertWeights : PackedExpert {
  PackedB w1;    // W1 [M, H]                    forward
  PackedB w2;    // W2 [H, M]                    forward
  PackedB w2_t;  // W2^T [M, H]                  backward
  PackedB w1_t;  // W1^T [H, M]                  backward
  const float* b1 = nullptr;  // [H]
  const float* b2 = nullptr;  // [M]
  void pack_forward(const float* w1, const float* w2, int64_t M, int64_t H);
  void pack_backward(const float* w1, const float* w2, int64_t M, int64_t H);
};

// hpre[rows, H] = u W1 + b1; act[rows, H] = GeLU(hpre); y[rows, M] = act W2 + b2.
void expert_forward(const ExpertWeights& w, int64_t rows, int64_t M, int64_t H, const float* u,
                    float* hpre, float* act, float* y);

// From dy[rows, M]: dhpre[rows, H] = (dy W2^T) * GeLU'(hpre); du[rows, M] = dhpre W1^T.
// hpre_rows[i] points at row i's pre-activation (H values) wherever the forward left it.
void expert_backward_input(const ExpertWeights& w, int64_t rows, int64_t M, int64_t H,
                           const float* dy, const float* const* hpre_rows, float* dhpre, float* du);

// g.w2 += act^T dy, g.b2 += colsum(dy), g.w1 += u^T dhpre, g.b1 += colsum(dhpre), summed over
// the rows in order: the same bits whatever the pipeline degrees that produced them.
void expert_weight_grads(const ExpertGrads& g, int64_t M, int64_t H, const ExpertRows& rows);

}  // namespace pm
