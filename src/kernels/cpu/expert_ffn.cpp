#include "kernels/cpu/expert_ffn.h"

#include <vector>

#include "core/error.h"
#include "core/tensor.h"
#include "kernels/cpu/elementwise.h"

namespace pm {

namespace {

void pack(Precision precision, Trans trans, int64_t K, int64_t N, const float* B, int64_t ldb, PackedB& out) {
  if (precision == Precision::bf16)
    pack_b_bf16(trans, K, N, B, ldb, out);
  else
    pack_b(trans, K, N, B, ldb, out);
}

// hpre = u W1 + b1, u floats or bf16.
void fc1_gemm(const ExpertWeights& w, int64_t rows, int64_t M, RowsIn u, float* hpre, int64_t H1,
              const GemmExtras& extras) {
  if (u.bf16)
    gemm_packed(Trans::no, rows, u.bf16, M, w.w1, 0.0f, hpre, H1, extras);
  else
    gemm_packed(Trans::no, rows, u.f32, M, w.w1, 0.0f, hpre, H1, extras);
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

void expert_forward(const ExpertWeights& w, int64_t rows, int64_t M, int64_t H, RowsIn u, float* saved,
                    RowsOut act, float* y, ForwardFor use) {
  if (rows == 0) return;
  PM_CHECK((u.bf16 == nullptr && act.bf16 == nullptr) || w.precision == Precision::bf16,
           "bf16 rows of an expert's input or activation need a bf16 expert");
  const int64_t H1 = fc1_width(w.activation, H);
  // fn(out) computes n activation values into out: act's row i, columns [c, c + n), or, when
  // act is bf16, a float scratch rounded into it (the values the float path would store, rounded)
  auto activate = [&](int64_t i, int64_t c, int64_t n, auto&& fn) {
    if (act.f32) return fn(act.f32 + i * H + c);
    thread_local std::vector<float> scratch;
    scratch.resize(n);
    fn(scratch.data());
    floats_to_bf16(scratch.data(), act.bf16 + i * H + c, n);
  };
  if (w.activation == Activation::swiglu) {
    fc1_gemm(w, rows, M, u, saved, H1, {w.b1, nullptr});
    for (int64_t i = 0; i < rows; ++i)
      activate(i, 0, H, [&](float* out) { swiglu_forward(saved + i * 2 * H, out, H); });
  } else {
    // GeLU runs on each finished tile of the pre-activation while it is still in cache.
    TileEpilogue gelu_tile = [&](int64_t r, int64_t c, int64_t nr, int64_t nc) {
      gelu_forward_tile(saved + r * H + c, H, nr, nc, act.f32 ? act.f32 + r * H + c : nullptr,
                        act.bf16 ? act.bf16 + r * H + c : nullptr, H, use == ForwardFor::backward);
    };
    fc1_gemm(w, rows, M, u, saved, H1, {w.b1, &gelu_tile});
  }
  if (act.bf16)
    gemm_packed(Trans::no, rows, act.bf16, H, w.w2, 0.0f, y, M, {w.b2, nullptr});
  else
    gemm_packed(Trans::no, rows, act.f32, H, w.w2, 0.0f, y, M, {w.b2, nullptr});
}

void expert_backward_input(const ExpertWeights& w, int64_t rows, int64_t M, int64_t H,
                           const float* dy, const float* const* saved_rows, float* dhpre, float* du) {
  if (rows == 0) return;
  const int64_t H1 = fc1_width(w.activation, H);
  if (w.activation == Activation::swiglu) {
    // dact = dy W2^T into the second half of each dhpre row, then both halves from it in place
    // (swiglu_backward reads dact[i] before it writes dhpre[i] and dhpre[n + i])
    gemm_packed(Trans::no, rows, dy, M, w.w2_t, 0.0f, dhpre + H, H1);
    for (int64_t i = 0; i < rows; ++i) swiglu_backward(saved_rows[i], dhpre + i * H1 + H, dhpre + i * H1, H);
  } else {
    TileEpilogue gelu_grad_tile = [&](int64_t r, int64_t c, int64_t nr, int64_t nc) {
      for (int64_t i = r; i < r + nr; ++i) {
        if (i + nr < rows)  // the next tile's rows of GeLU' (tiles run down a column of panels)
          for (int64_t j = 0; j < nc; j += 16) __builtin_prefetch(saved_rows[i + nr] + c + j);
        gelu_backward_by_saved_grad(saved_rows[i] + c, dhpre + i * H + c, dhpre + i * H + c, nc);
      }
    };
    gemm_packed(Trans::no, rows, dy, M, w.w2_t, 0.0f, dhpre, H, {nullptr, &gelu_grad_tile});
  }
  gemm_packed(Trans::no, rows, dhpre, H1, w.w1_t, 0.0f, du, M);
}

void expert_weight_grads(const ExpertGrads& g, Activation activation, Precision precision, int64_t M, int64_t H,
                         const ExpertRows& r) {
  const int64_t rows = static_cast<int64_t>(r.dy.size());
  r.check(precision);
  if (rows == 0) return;
  const int64_t H1 = fc1_width(activation, H);
  // c += a^T b over the rows, a's rows floats or bf16 (then a bf16 GEMM); bias += b's rows, summed
  // as the GEMM packs them
  auto tn_rows = [&](int64_t m, int64_t n, const std::vector<const float*>& a, const std::vector<const uint16_t*>& a16,
                     const std::vector<const float*>& b, float* c, float* bias) {
    if (!a16.empty())
      gemm_tn_rows_bf16(m, n, rows, a16.data(), b.data(), 1.0f, c, n, bias);
    else if (precision == Precision::bf16)
      gemm_tn_rows_bf16(m, n, rows, a.data(), b.data(), 1.0f, c, n, bias);
    else
      gemm_tn_rows(m, n, rows, a.data(), b.data(), 1.0f, c, n, bias);
  };
  tn_rows(H, M, r.act, r.act_bf16, r.dy, g.w2, g.b2);
  tn_rows(M, H1, r.u, r.u_bf16, r.dhpre, g.w1, g.b1);
}

}  // namespace pm
