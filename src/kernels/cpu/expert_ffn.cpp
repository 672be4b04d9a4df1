#include "kernels/cpu/expert_ffn.h"

#include "core/error.h"
#include "kernels/cpu/elementwise.h"

namespace pm {

namespace {

void pack(Precision precision, Trans trans, int64_t K, int64_t N, const float* B, int64_t ldb, PackedB& out) {
  if (precision == Precision::bf16)
    pack_b_bf16(trans, K, N, B, ldb, out);
  else
    pack_b(trans, K, N, B, ldb, out);
}

}  // namespace

void ExpertWeights::pack_forward(const float* w1_data, const float* w2_data, int64_t M, int64_t H) {
  const int64_t H1 = fc1_width(activation, H);
  pack(precision, Trans::no, M, H1, w1_data, H1, w1);
  pack(precision, Trans::no, H, M, w2_data, M, w2);
}

void ExpertWeights::pack_backward(const float* w1_data, const float* w2_data, int64_t M, int64_t H) {
  const int64_t H1 = fc1_width(activation, H);
  pack(precision, Trans::yes, M, H, w2_data, M, w2_t);
  pack(precision, Trans::yes, H1, M, w1_data, H1, w1_t);
}

void expert_forward(const ExpertWeights& w, int64_t rows, int64_t M, int64_t H, const float* u,
                    float* hpre, float* act, float* y) {
  if (rows == 0) return;
  if (w.activation == Activation::swiglu) {
    gemm_packed(Trans::no, rows, u, M, w.w1, 0.0f, hpre, 2 * H, {w.b1, nullptr});
    for (int64_t i = 0; i < rows; ++i) swiglu_forward(hpre + i * 2 * H, act + i * H, H);
  } else {
    // GeLU runs on each finished tile of the pre-activation while it is still in cache.
    TileEpilogue gelu_tile = [&](int64_t r, int64_t c, int64_t nr, int64_t nc) {
      for (int64_t i = r; i < r + nr; ++i) gelu_forward(hpre + i * H + c, act + i * H + c, nc);
    };
    gemm_packed(Trans::no, rows, u, M, w.w1, 0.0f, hpre, H, {w.b1, &gelu_tile});
  }
  gemm_packed(Trans::no, rows, act, H, w.w2, 0.0f, y, M, {w.b2, nullptr});
}

void expert_backward_input(const ExpertWeights& w, int64_t rows, int64_t M, int64_t H,
                           const float* dy, const float* const* hpre_rows, float* dhpre, float* du) {
  if (rows == 0) return;
  const int64_t H1 = fc1_width(w.activation, H);
  if (w.activation == Activation::swiglu) {
    // dact = dy W2^T into the second half of each dhpre row, then both halves from it in place
    // (swiglu_backward reads dact[i] before it writes dhpre[i] and dhpre[n + i])
    gemm_packed(Trans::no, rows, dy, M, w.w2_t, 0.0f, dhpre + H, H1);
    for (int64_t i = 0; i < rows; ++i) swiglu_backward(hpre_rows[i], dhpre + i * H1 + H, dhpre + i * H1, H);
  } else {
    TileEpilogue gelu_grad_tile = [&](int64_t r, int64_t c, int64_t nr, int64_t nc) {
      for (int64_t i = r; i < r + nr; ++i) gelu_backward(hpre_rows[i] + c, dhpre + i * H + c, dhpre + i * H + c, nc);
    };
    gemm_packed(Trans::no, rows, dy, M, w.w2_t, 0.0f, dhpre, H, {nullptr, &gelu_grad_tile});
  }
  gemm_packed(Trans::no, rows, dhpre, H1, w.w1_t, 0.0f, du, M);
}

void expert_weight_grads(const ExpertGrads& g, Activation activation, Precision precision, int64_t M, int64_t H,
                         const ExpertRows& r) {
  const int64_t rows = static_cast<int64_t>(r.u.size());
  PM_CHECK(static_cast<int64_t>(r.act.size()) == rows && static_cast<int64_t>(r.dhpre.size()) == rows &&
               static_cast<int64_t>(r.dy.size()) == rows,
           "expert rows disagree: {} u, {} act, {} dhpre, {} dy", rows, r.act.size(), r.dhpre.size(), r.dy.size());
  if (rows == 0) return;
  const int64_t H1 = fc1_width(activation, H);
  auto tn_rows = precision == Precision::bf16 ? gemm_tn_rows_bf16 : gemm_tn_rows;
  tn_rows(H, M, rows, r.act.data(), r.dy.data(), 1.0f, g.w2, M);
  for (const float* row : r.dy) add_column_sums(row, 1, M, g.b2);
  tn_rows(M, H1, rows, r.u.data(), r.dhpre.data(), 1.0f, g.w1, H1);
  for (const float* row : r.dhpre) add_column_sums(row, 1, H1, g.b1);
}

}  // namespace pm
