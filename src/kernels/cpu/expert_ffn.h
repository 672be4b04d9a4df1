// One expert's FFN on a block of rows, on the CPU (kernels/backend.h, Activation):
//   gelu:   FFN(u) = GeLU(u W1 + b1) W2 + b2, W1[M, H], W2[H, M];
//   swiglu: FFN(u) = (SiLU(u W1g + b1g) * (u W1v + b1v)) W2 + b2, W1 = [W1g | W1v] [M, 2H].
// Forward keeps what the backward reads: SwiGLU's pre-activation, GeLU's derivative at it (GeLU
// and its derivative share the erf, which the backward would compute again). Backward is split in
// two so that the pipeline can send the input gradient of each chunk before the weight gradients
// (which no other rank waits for) are computed once over all rows. A bf16 expert's GEMMs are bf16
// GEMMs (gemm.h); its pre-activations, their saved values and gradients stay fp32 and are
// rounded where a GEMM reads them; its inputs and activations, which only GEMMs read, may be kept
// in bf16 (backend.h, RowsIn). GeLU runs inside the GEMMs, on each finished tile while it is in
// cache; SwiGLU needs both halves of a row, so it runs on whole rows after the GEMM.
#pragma once

#include <cstdint>
#include <vector>

#include "kernels/cpu/gemm.h"

namespace pm {

// An expert's weights, packed once per pass for the GEMMs of every chunk (H1 = fc1_width).
struct ExpertWeights : PackedExpert {
  Activation activation = Activation::gelu;
  Precision precision = Precision::fp32;  // bf16: packed rounded, so every GEMM with them is a bf16 GEMM
  PackedB w1;    // W1 [M, H1]                   forward
  PackedB w2;    // W2 [H, M]                    forward
  PackedB w2_t;  // W2^T [M, H]                  backward
  PackedB w1_t;  // W1^T [H1, M]                 backward
  const float* b1 = nullptr;  // [H1]
  const float* b2 = nullptr;  // [M]
  void pack_forward(const float* w1, const float* w2, int64_t M, int64_t H);
  void pack_backward(const float* w1, const float* w2, int64_t M, int64_t H);
};

// act[rows, H] = the activation of hpre = u W1 + b1 (rounded to bf16 when act is bf16 rows), u[i]
// pointing at row i of the input wherever it sits;
// y[rows, M] = act W2 + b2 (y null: not computed; its rows may sit anywhere: OutputRows). bf16
// rows of u or act need a bf16 expert. saved[rows, H1]: hpre, which GeLU overwrites with its
// derivative there for a backward (one erf for both: the backward would compute it again, and
// more, to get the same bits).
void expert_forward(const ExpertWeights& w, int64_t rows, int64_t M, int64_t H, RowPointers u, float* saved,
                    RowsOut act, OutputRows y, ForwardFor use);

// From dy[rows, M]: dhpre[rows, H1] = the activation's backward of dy W2^T; du[rows, M] = dhpre W1^T.
// saved_rows[i] points at row i's saved values (H1 of them) wherever the forward left them; du's
// rows may sit anywhere (OutputRows).
void expert_backward_input(const ExpertWeights& w, int64_t rows, int64_t M, int64_t H,
                           DyRows dy, const float* const* saved_rows, float* dhpre, OutputRows du);

// g.w2 += act^T dy, g.b2 += colsum(dy), g.w1 += u^T dhpre, g.b1 += colsum(dhpre), summed over
// the rows in order: the same bits whatever the pipeline degrees that produced them.
void expert_weight_grads(const ExpertGrads& g, Activation activation, Precision precision, int64_t M, int64_t H,
                         const ExpertRows& rows);

}  // namespace pm
