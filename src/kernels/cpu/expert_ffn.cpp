#include "kernels/cpu/expert_ffn.h"

#include <algorithm>
#include <type_traits>
#include <vector>

#include "core/error.h"
#include "core/tensor.h"
#include "kernels/cpu/elementwise.h"
#include "kernels/cpu/fetch_ahead.h"

namespace pm {

namespace {

void pack(Precision precision, Trans trans, int64_t K, int64_t N, const float* B, int64_t ldb, PackedB& out) {
  if (precision == Precision::bf16)
    pack_b_bf16(trans, K, N, B, ldb, out);
  else
    pack_b(trans, K, N, B, ldb, out);
}

// C[rows, ldc] = A B (+ extras), A's rows floats or bf16, K values each, B packed.
void gemm_rows(RowsIn A, int64_t rows, int64_t K, const PackedB& B, float* C, int64_t ldc,
               const GemmExtras& extras = {}) {
  if (A.bf16)
    gemm_packed(Trans::no, rows, A.bf16, K, B, 0.0f, C, ldc, extras);
  else
    gemm_packed(Trans::no, rows, A.f32, K, B, 0.0f, C, ldc, extras);
}

// C[rows, N] = A B + bias into `out` (a block of rows N apart, or rows by pointer), A's rows
// floats or bf16, K values each.
void gemm_rows_out(RowsIn A, int64_t rows, int64_t K, const PackedB& B, OutputRows out, const float* bias) {
  if (out.block) return gemm_rows(A, rows, K, B, out.block, B.N, {bias, nullptr});
  GemmExtras extras{bias, nullptr, out.rows};
  extras.c_rows16 = out.rows16;
  if (A.bf16)
    gemm_packed(Trans::no, rows, A.bf16, K, B, 0.0f, nullptr, 0, extras);
  else
    gemm_packed(Trans::no, rows, A.f32, K, B, 0.0f, nullptr, 0, extras);
}

// A bf16 expert's scaled rows of dy (DyRows::scaled): out row i = float_to_bf16(scale[i] * rows[i]),
// the values a bf16 copy of gate * dy holds. One piece of an expert's rows, made where they are
// read and read while they sit in L2, where the layer does not keep a bf16 copy of every row of
// the pass (16 MB a rank in a DeepSeek-style layer; expert_parallel.cpp, dy_by_pointer). Rounding
// in the packing, as the weight gradients do (gemm_tn_rows_bf16), would take each of A's bf16
// packers (dot, AMX, their fp32 model) a scale, and a DeepSeek-style expert's dot order reads bf16
// rows of A in place, unpacked.
const uint16_t* scaled_rows_in_bf16(const float* const* rows, const float* scale, int64_t n, int64_t width) {
  thread_local std::vector<uint16_t> block;
  block.resize(n * width);
  for (int64_t i = 0; i < n; ++i) scaled_floats_to_bf16(scale[i], rows[i], block.data() + i * width, width);
  return block.data();
}

// C[rows, ldc] = dy B (+ extras): dy a block, or rows by pointer each times its scale (an fp32
// expert scales them as it packs them, a bf16 one rounds them into a block first).
void gemm_dy_rows(DyRows dy, int64_t rows, int64_t K, const PackedB& B, float* C, int64_t ldc,
                  GemmExtras extras = {}) {
  if (!dy.rows) return gemm_rows(dy.block, rows, K, B, C, ldc, extras);
  if (B.bf16) return gemm_rows(RowsIn(scaled_rows_in_bf16(dy.rows, dy.scale, rows, K)), rows, K, B, C, ldc, extras);
  extras.a_row_scale = dy.scale;
  gemm_packed_rows(rows, dy.rows, B, 0.0f, C, ldc, extras);
}

// The same with A's rows by pointer.
void gemm_rows(RowPointers A, int64_t rows, const PackedB& B, float* C, int64_t ldc, const GemmExtras& extras) {
  if (A.bf16)
    gemm_packed_rows(rows, A.bf16, B, 0.0f, C, ldc, extras);
  else
    gemm_packed_rows(rows, A.f32, B, 0.0f, C, ldc, extras);
}

// fn(rows) with whichever of the two lists holds the rows (float or bf16 pointers).
template <typename Fn>
void with_rows(const std::vector<const float*>& f32, const std::vector<const uint16_t*>& bf16, Fn&& fn) {
  if (f32.empty() && !bf16.empty())
    fn(bf16);
  else
    fn(f32);
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

namespace {

// Rows per pass of the forward's two products: the activation of 192 rows (384 KB in bf16, 768 KB
// in fp32) is still in L2 when the second product reads it, where a whole expert's (1025 rows,
// 2 MB) went out to memory and came back. One bf16 expert (1025 rows, M 512, H 1024, one thread,
// bench/expert_parts.cpp, 12 interleaved runs): 7.30 -> 7.06 ms median, 7.14 -> 6.59 best. The
// input gradient's two products gained nothing from the same (6.51 -> 6.44 ms, within the noise).
// A row's results do not depend on the rows beside it: the same bits.
constexpr int64_t kForwardRowBlock = 192;

void expert_forward_block(const ExpertWeights& w, int64_t rows, int64_t M, int64_t H, RowPointers u, float* saved,
                          RowsOut act, OutputRows y, ForwardFor use) {
  const int64_t H1 = fc1_width(w.activation, H);
  if (w.activation == Activation::swiglu) {
    gemm_rows(u, rows, w.w1, saved, H1, {w.b1, nullptr});
    for (int64_t i = 0; i < rows; ++i) {
      if (act.bf16)
        swiglu_forward(saved + i * 2 * H, act.bf16 + i * H, H);
      else
        swiglu_forward(saved + i * 2 * H, act.f32 + i * H, H);
    }
  } else {
    // GeLU runs on each finished tile of the pre-activation while it is still in cache.
    TileEpilogue gelu_tile = [&](int64_t r, int64_t c, int64_t nr, int64_t nc) {
      gelu_forward_tile(saved + r * H + c, H, nr, nc, act.f32 ? act.f32 + r * H + c : nullptr,
                        act.bf16 ? act.bf16 + r * H + c : nullptr, H, use == ForwardFor::backward);
    };
    gemm_rows(u, rows, w.w1, saved, H1, {w.b1, &gelu_tile});
  }
  if (y) gemm_rows_out(act.bf16 ? RowsIn(act.bf16) : RowsIn(act.f32), rows, H, w.w2, y, w.b2);
}

}  // namespace

void expert_forward(const ExpertWeights& w, int64_t rows, int64_t M, int64_t H, RowPointers u, float* saved,
                    RowsOut act, OutputRows y, ForwardFor use) {
  PM_CHECK((u.bf16 == nullptr && act.bf16 == nullptr) || w.precision == Precision::bf16,
           "bf16 rows of an expert's input or activation need a bf16 expert");
  const int64_t H1 = fc1_width(w.activation, H);
  for (int64_t r = 0; r < rows; r += kForwardRowBlock) {
    const int64_t n = std::min(kForwardRowBlock, rows - r);
    const RowPointers u_r = u.bf16 ? RowPointers(u.bf16 + r) : RowPointers(u.f32 + r);
    const RowsOut act_r = act.bf16 ? RowsOut(act.bf16 + r * H) : RowsOut(act.f32 + r * H);
    expert_forward_block(w, n, M, H, u_r, saved + r * H1, act_r, y ? y.from(r, M) : OutputRows(), use);
  }
}

void expert_backward_input(const ExpertWeights& w, int64_t rows, int64_t M, int64_t H,
                           DyRows dy, const float* const* saved_rows, float* dhpre, OutputRows du) {
  if (rows == 0) return;
  PM_CHECK(dy.block.bf16 == nullptr || w.precision == Precision::bf16, "bf16 rows of dy need a bf16 expert");
  const int64_t H1 = fc1_width(w.activation, H);
  if (w.activation == Activation::swiglu) {
    // dact = dy W2^T into the second half of each dhpre row; each finished tile then becomes both
    // halves' columns in place (swiglu_backward reads dact[j] before it writes dg[j] and dv[j]),
    // while it is in L1 and with the next tile's pre-activations fetched ahead: a pass over the
    // rows after the product read the saved pre-activations from memory, one row after another.
    TileEpilogue swiglu_grad_tile = [&](int64_t r, int64_t c, int64_t nr, int64_t nc) {
      for (int64_t i = r; i < r + nr; ++i) {
        if (i + nr < rows)  // the next tile's rows (tiles run down a column of panels)
          for (int64_t j = 0; j < nc; j += 16) {
            fetch_into_l1(saved_rows[i + nr] + c + j);
            fetch_into_l1(saved_rows[i + nr] + H + c + j);
          }
        float* row = dhpre + i * H1;
        swiglu_backward(saved_rows[i] + c, saved_rows[i] + H + c, row + H + c, row + c, row + H + c, nc);
      }
    };
    gemm_dy_rows(dy, rows, M, w.w2_t, dhpre + H, H1, {nullptr, &swiglu_grad_tile});
  } else {
    TileEpilogue gelu_grad_tile = [&](int64_t r, int64_t c, int64_t nr, int64_t nc) {
      for (int64_t i = r; i < r + nr; ++i) {
        if (i + nr < rows)  // the next tile's rows of GeLU' (tiles run down a column of panels)
          for (int64_t j = 0; j < nc; j += 16) __builtin_prefetch(saved_rows[i + nr] + c + j);
        gelu_backward_by_saved_grad(saved_rows[i] + c, dhpre + i * H + c, dhpre + i * H + c, nc);
      }
    };
    gemm_dy_rows(dy, rows, M, w.w2_t, dhpre, H, {nullptr, &gelu_grad_tile});
  }
  gemm_rows_out(dhpre, rows, H1, w.w1_t, du, nullptr);
}

void expert_weight_grads(const ExpertGrads& g, Activation activation, Precision precision, int64_t M, int64_t H,
                         const ExpertRows& r) {
  const int64_t rows = static_cast<int64_t>(r.rows());
  r.check(precision);
  if (rows == 0) return;
  const int64_t H1 = fc1_width(activation, H);
  // c += a^T b over the rows, a's and b's rows floats or bf16 (then a bf16 GEMM); bias += b's rows,
  // summed as the GEMM packs them
  // b's rows times b_scale's where given (a bf16 GEMM rounds each product to bf16)
  auto tn_rows = [&](int64_t m, int64_t n, const auto& a, const auto& b, float* c, float* bias,
                     const float* b_scale) {
    constexpr bool float_b = std::is_same_v<decltype(b.data()), const float* const*>;
    constexpr bool floats = std::is_same_v<decltype(a.data()), const float* const*> && float_b;
    if constexpr (floats)
      if (precision != Precision::bf16)
        return gemm_tn_rows(m, n, rows, a.data(), b.data(), 1.0f, c, n, bias, b_scale);
    if constexpr (float_b)
      gemm_tn_rows_bf16(m, n, rows, a.data(), b.data(), 1.0f, c, n, bias, b_scale);
    else
      gemm_tn_rows_bf16(m, n, rows, a.data(), b.data(), 1.0f, c, n, bias);
  };
  // (a bf16 expert's scaled rows are rounded to bf16 as the packing reads them: gemm_tn_rows_bf16)
  const float* dy_scale = r.dy_scale.empty() ? nullptr : r.dy_scale.data();
  with_rows(r.act, r.act_bf16, [&](const auto& act) {
    with_rows(r.dy, r.dy_bf16, [&](const auto& dy) { tn_rows(H, M, act, dy, g.w2, g.b2, dy_scale); });
  });
  with_rows(r.u, r.u_bf16, [&](const auto& u) { tn_rows(M, H1, u, r.dhpre, g.w1, g.b1, nullptr); });
}

}  // namespace pm
