// One bf16 expert's backward with its output gradients stored as bf16 rows (what a bf16
// all-to-all carried) against the same values as floats: input gradients, weight and bias
// gradients bit for bit, GeLU and SwiGLU, on the AVX512_BF16 path and the fp32 kernels'.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include "core/rng.h"
#include "core/tensor.h"
#include "kernels/cpu/elementwise.h"
#include "kernels/cpu/expert_ffn.h"
#include "kernels/cpu/gemm.h"

namespace pm {
namespace {

std::vector<float> normal(int64_t n, uint64_t stream, float scale) {
  std::vector<float> v(n);
  Rng(41, stream).fill_normal(v.data(), n, 0.0f, scale);
  return v;
}

struct Grads {
  std::vector<float> dhpre, du, w1, b1, w2, b2;
};

// Gradient buffers of `rows` rows, the weight and bias gradients starting from random values.
Grads start_grads(int64_t rows, int64_t M, int64_t H1, int64_t H, uint64_t stream) {
  return {std::vector<float>(rows * H1), std::vector<float>(rows * M), normal(M * H1, stream, 1.0f),
          normal(H1, stream + 1, 1.0f), normal(H * M, stream + 2, 1.0f), normal(M, stream + 3, 1.0f)};
}

// An expert of random weights (streams from `stream` on) after its forward on `rows` random input
// rows: what its backward reads.
struct ExpertAfterForward {
  int64_t M, H, H1;
  std::vector<float> w1, w2, b1, b2, u, saved, act, y;
  ExpertWeights w;
  std::vector<const float*> saved_rows;
  ExpertAfterForward(Precision precision, Activation activation, int64_t rows, int64_t model_dim, int64_t hidden,
                     uint64_t stream)
      : M(model_dim), H(hidden), H1(fc1_width(activation, hidden)), w1(normal(M * H1, stream, 0.2f)),
        w2(normal(H * M, stream + 1, 0.2f)), b1(normal(H1, stream + 2, 0.1f)), b2(normal(M, stream + 3, 0.1f)),
        u(normal(rows * M, stream + 4, 1.0f)), saved(rows * H1), act(rows * H), y(rows * M), saved_rows(rows) {
    w.precision = precision, w.activation = activation, w.b1 = b1.data(), w.b2 = b2.data();
    w.pack_forward(w1.data(), w2.data(), M, H);
    w.pack_backward(w1.data(), w2.data(), M, H);
    expert_forward(w, rows, M, H, RowList(u.data(), rows, M).pointers(), saved.data(), act.data(), y.data(),
                   ForwardFor::backward);
    for (int64_t i = 0; i < rows; ++i) saved_rows[i] = &saved[i * H1];
  }
};

bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

void expect_same_grads(const Grads& a, const Grads& b) {
  using Field = std::vector<float> Grads::*;
  const std::pair<const char*, Field> fields[] = {{"dhpre", &Grads::dhpre}, {"du", &Grads::du},
                                                  {"w1 grad", &Grads::w1},  {"b1 grad", &Grads::b1},
                                                  {"w2 grad", &Grads::w2},  {"b2 grad", &Grads::b2}};
  for (const auto& [name, field] : fields) EXPECT_TRUE(same_bits(a.*field, b.*field)) << name;
}

Grads backward(Activation activation, bool dy_as_bf16, int64_t rows, int64_t M, int64_t H) {
  const ExpertAfterForward e(Precision::bf16, activation, rows, M, H, 1);
  const int64_t H1 = e.H1;
  std::vector<uint16_t> dy16(rows * M);
  const std::vector<float> dy_raw = normal(rows * M, 6, 1.0f);
  floats_to_bf16(dy_raw.data(), dy16.data(), rows * M);
  std::vector<float> dy(rows * M);  // the values bf16 holds, as floats
  bf16_to_floats(dy16.data(), dy.data(), rows * M);

  Grads g = start_grads(rows, M, H1, H, 7);
  expert_backward_input(e.w, rows, M, H, dy_as_bf16 ? RowsIn(dy16.data()) : RowsIn(dy.data()), e.saved_rows.data(),
                        g.dhpre.data(), g.du.data());
  ExpertRows r;
  for (int64_t i = rows - 1; i >= 0; --i) {  // rows anywhere: here in reverse order
    r.u.push_back(&e.u[i * M]);
    r.act.push_back(&e.act[i * H]);
    r.dhpre.push_back(&g.dhpre[i * H1]);
    if (dy_as_bf16)
      r.dy_bf16.push_back(&dy16[i * M]);
    else
      r.dy.push_back(&dy[i * M]);
  }
  expert_weight_grads({g.w1.data(), g.b1.data(), g.w2.data(), g.b2.data()}, activation, Precision::bf16, M, H, r);
  return g;
}

TEST(ExpertFfn, Bf16OutputGradientsGiveTheBitsOfTheirFloatValues) {
  for (bool emulate : {false, true}) {  // emulate: the AVX512_BF16 path's packing on any CPU
    emulate_bf16_dot_for_testing(emulate);
    for (Activation activation : {Activation::gelu, Activation::swiglu})
      for (int64_t rows : {1, 37}) {
        SCOPED_TRACE(::testing::Message() << "emulate " << emulate << " swiglu " << (activation == Activation::swiglu)
                                          << " rows " << rows);
        expect_same_grads(backward(activation, false, rows, 40, 72), backward(activation, true, rows, 40, 72));
      }
  }
  emulate_bf16_dot_for_testing(false);
}

// fn(precision, activation, rows) for fp32 and bf16 experts, GeLU and SwiGLU, rows fewer and more
// than a tile and than the forward's blocks of 192, each under a trace that names the case.
template <typename Fn>
void for_each_expert_case(Fn&& fn) {
  for (Precision precision : {Precision::fp32, Precision::bf16})
    for (Activation activation : {Activation::gelu, Activation::swiglu})
      for (int64_t rows : {1, 7, 400}) {
        SCOPED_TRACE(::testing::Message() << "bf16 " << (precision == Precision::bf16) << " swiglu "
                                          << (activation == Activation::swiglu) << " rows " << rows);
        fn(precision, activation, rows);
      }
}

// The input gradients against their steps one after another: dact = dy W2^T as a plain GEMM, the
// activation's backward row by row (SwiGLU from the saved pre-activations, GeLU times the saved
// GeLU'), then du = dhpre W1^T. The expert runs the activation's backward on each finished tile of
// the first product (its tile epilogue): the same bits, rows more and fewer than a tile, and a
// hidden size that leaves a partial panel. fp32 and bf16 experts.
TEST(ExpertFfn, InputGradientsGiveTheBitsOfTheirStepsInTurn) {
  for_each_expert_case([](Precision precision, Activation activation, int64_t rows) {
    const int64_t M = 40, H = 72, H1 = fc1_width(activation, H);
    const bool bf16 = precision == Precision::bf16;
    const ExpertAfterForward e(precision, activation, rows, M, H, 31);
    const std::vector<float> dy = normal(rows * M, 36, 1.0f);
    std::vector<float> dhpre(rows * H1), du(rows * M);
    expert_backward_input(e.w, rows, M, H, dy.data(), e.saved_rows.data(), dhpre.data(), du.data());

    using Product = void (*)(Trans, Trans, int64_t, int64_t, int64_t, const float*, int64_t, const float*, int64_t,
                             float, float*, int64_t);
    const Product product = bf16 ? Product(gemm_bf16) : Product(gemm);
    std::vector<float> dact(rows * H), want_dhpre(rows * H1), want_du(rows * M);
    product(Trans::no, Trans::yes, rows, H, M, dy.data(), M, e.w2.data(), M, 0.0f, dact.data(), H);
    for (int64_t i = 0; i < rows; ++i) {
      float* row = &want_dhpre[i * H1];
      if (activation == Activation::swiglu) {
        std::copy_n(&dact[i * H], H, row + H);
        swiglu_backward(e.saved_rows[i], row + H, row, H);
      } else {
        gelu_backward_by_saved_grad(e.saved_rows[i], &dact[i * H], row, H);
      }
    }
    product(Trans::no, Trans::yes, rows, M, H1, want_dhpre.data(), H1, e.w1.data(), H1, 0.0f, want_du.data(), M);
    EXPECT_TRUE(same_bits(dhpre, want_dhpre));
    EXPECT_TRUE(same_bits(du, want_du));
  });
}

// The outputs y and du written to rows anywhere (OutputRows::by_pointer: the all-to-all's rows),
// here every other row of a larger buffer in reverse order, against the same expert writing them
// into one block: the same bits, and nothing written between the rows. fp32 and bf16 experts, GeLU
// and SwiGLU, more rows than the forward's blocks of 192.
TEST(ExpertFfn, OutputRowsByPointerGiveTheBitsOfOneBlock) {
  for_each_expert_case([](Precision precision, Activation activation, int64_t rows) {
    const int64_t M = 40, H = 72, H1 = fc1_width(activation, H);
    ExpertAfterForward e(precision, activation, rows, M, H, 11);
    const ExpertWeights& w = e.w;
    const std::vector<float>& y = e.y;
    const std::vector<float> dy = normal(rows * M, 16, 1.0f);
    std::vector<float> dhpre(rows * H1), du(rows * M);
    const RowList u_rows(e.u.data(), rows, M);
    expert_backward_input(w, rows, M, H, dy.data(), e.saved_rows.data(), dhpre.data(), du.data());

    std::vector<float> y_out(2 * rows * M, -3.0f), du_out(2 * rows * M, -3.0f);
    std::vector<float*> y_at(rows), du_at(rows);
    for (int64_t i = 0; i < rows; ++i) {
      y_at[i] = &y_out[2 * (rows - 1 - i) * M];
      du_at[i] = &du_out[2 * (rows - 1 - i) * M];
    }
    expert_forward(w, rows, M, H, u_rows.pointers(), e.saved.data(), e.act.data(),
                   OutputRows::by_pointer(y_at.data()), ForwardFor::backward);
    expert_backward_input(w, rows, M, H, dy.data(), e.saved_rows.data(), dhpre.data(),
                          OutputRows::by_pointer(du_at.data()));
    for (int64_t i = 0; i < rows; ++i) {
      ASSERT_EQ(std::memcmp(y_at[i], &y[i * M], M * sizeof(float)), 0) << "y row " << i;
      ASSERT_EQ(std::memcmp(du_at[i], &du[i * M], M * sizeof(float)), 0) << "du row " << i;
    }
    for (int64_t r = 1; r < 2 * rows; r += 2)  // the rows between
      for (int64_t j = 0; j < M; ++j) {
        ASSERT_EQ(y_out[r * M + j], -3.0f);
        ASSERT_EQ(du_out[r * M + j], -3.0f);
      }
  });
}

// The output gradients read where the deduplicated dispatch left them, each row times its gate
// value (DyRows::scaled, ExpertRows::dy_scale), against an expert fed the scaled rows as a copy:
// input gradients, weight and bias gradients bit for bit, GeLU and SwiGLU, rows more and fewer
// than a tile and than the forward's blocks. fp32 experts scale as their GEMMs pack, on every
// instruction set; bf16 experts read gate * dy rounded to bf16 (the copy a bf16 expert read), on
// the AVX512_BF16 path (emulated too) and in AMX's order (on its model too).
void expect_scaled_rows_match_a_copy(Precision precision, const std::string& path) {
  const bool bf16 = precision == Precision::bf16;
  for (Activation activation : {Activation::gelu, Activation::swiglu})
    for (int64_t rows : {1, 7, 400}) {
      SCOPED_TRACE(::testing::Message() << path << " swiglu " << (activation == Activation::swiglu) << " rows " << rows);
      const int64_t M = 40, H = 72, H1 = fc1_width(activation, H);
      const ExpertAfterForward e(precision, activation, rows, M, H, 21);
      const std::vector<float> dy = normal(rows * M, 26, 1.0f), gate = normal(rows, 27, 0.5f);
      // the copy: gate * dy (rounded to bf16 for a bf16 expert); the rows by pointer: dy in reverse
      // order in its buffer
      std::vector<float> copy(rows * M), reversed(rows * M);
      std::vector<uint16_t> copy16(rows * M);
      std::vector<const float*> dy_at(rows);
      for (int64_t i = 0; i < rows; ++i) {
        for (int64_t m = 0; m < M; ++m) {
          copy[i * M + m] = gate[i] * dy[i * M + m];
          copy16[i * M + m] = float_to_bf16(copy[i * M + m]);
        }
        std::memcpy(&reversed[(rows - 1 - i) * M], &dy[i * M], M * sizeof(float));
        dy_at[i] = &reversed[(rows - 1 - i) * M];
      }
      Grads a = start_grads(rows, M, H1, H, 28), b = a;
      expert_backward_input(e.w, rows, M, H, bf16 ? RowsIn(copy16.data()) : RowsIn(copy.data()), e.saved_rows.data(),
                            a.dhpre.data(), a.du.data());
      expert_backward_input(e.w, rows, M, H, DyRows::scaled(dy_at.data(), gate.data()), e.saved_rows.data(),
                            b.dhpre.data(), b.du.data());
      ExpertRows ra, rb;
      for (int64_t i = 0; i < rows; ++i) {
        for (ExpertRows* r : {&ra, &rb}) r->u.push_back(&e.u[i * M]), r->act.push_back(&e.act[i * H]);
        ra.dhpre.push_back(&a.dhpre[i * H1]), rb.dhpre.push_back(&b.dhpre[i * H1]);
        if (bf16)
          ra.dy_bf16.push_back(&copy16[i * M]);
        else
          ra.dy.push_back(&copy[i * M]);
        rb.dy.push_back(dy_at[i]), rb.dy_scale.push_back(gate[i]);
      }
      expert_weight_grads({a.w1.data(), a.b1.data(), a.w2.data(), a.b2.data()}, activation, precision, M, H, ra);
      expert_weight_grads({b.w1.data(), b.b1.data(), b.w2.data(), b.b2.data()}, activation, precision, M, H, rb);
      expect_same_grads(a, b);
    }
}

TEST(ExpertFfn, ScaledOutputGradientsGiveTheBitsOfAScaledCopy) {
  for (const std::string& isa : {std::string("avx512"), std::string("avx2"), std::string("scalar")}) {
    try {
      force_gemm_isa(isa);
    } catch (const std::exception&) {
      continue;  // not on this CPU
    }
    expect_scaled_rows_match_a_copy(Precision::fp32, isa);
  }
  force_gemm_isa("");
  for (bool emulate : {false, true}) {  // emulate: the AVX512_BF16 path's packing on any CPU
    emulate_bf16_dot_for_testing(emulate);
    expect_scaled_rows_match_a_copy(Precision::bf16, emulate ? "bf16 dot, emulated" : "bf16 dot");
  }
  emulate_bf16_dot_for_testing(false);
  set_bf16_order(Bf16Order::amx);
  for (bool model : {false, true}) {  // model: AMX's order on the fp32 kernels even where the CPU has AMX
    use_amx_model_for_testing(model);
    expect_scaled_rows_match_a_copy(Precision::bf16, model ? "bf16 amx order, model" : "bf16 amx order");
  }
  use_amx_model_for_testing(false);
  set_bf16_order(Bf16Order::dot);
  ExpertRows r;
  const float frow[4] = {};
  r.u.push_back(frow), r.act.push_back(frow), r.dhpre.push_back(frow), r.dy.push_back(frow), r.dy_scale.push_back(0.5f);
  EXPECT_NO_THROW(r.check(Precision::fp32));
  EXPECT_NO_THROW(r.check(Precision::bf16));
  r.dy_scale.push_back(0.5f);  // more scales than rows
  EXPECT_THROW(r.check(Precision::fp32), std::exception);
}

TEST(ExpertFfn, Bf16RowsNeedABf16Expert) {
  ExpertRows r;
  const uint16_t row[4] = {};
  const float frow[4] = {};
  r.u.push_back(frow), r.act.push_back(frow), r.dhpre.push_back(frow), r.dy_bf16.push_back(row);
  EXPECT_THROW(r.check(Precision::fp32), std::exception);
  EXPECT_NO_THROW(r.check(Precision::bf16));
  r.dy.push_back(frow);  // dy in both forms
  EXPECT_THROW(r.check(Precision::bf16), std::exception);
}

}  // namespace
}  // namespace pm
