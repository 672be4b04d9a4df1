// Attention's core by causal blocks (chain_product) against the formulation it replaced: whole
// square products by gemm, bit for bit, forward and backward, with grouped key/value heads and
// sequence lengths and head sizes that are no multiple of the blocks or of 16; the cached decode
// against the forward's rows; chain_product against gemm on every operand form. The numbers
// themselves are checked against PyTorch in float64 by tests/reference/test_model.py.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "kernels/cpu/attention.h"
#include "kernels/cpu/chain_product.h"
#include "kernels/cpu/fast_math.h"
#include "kernels/cpu/gemm.h"
#include "support/random_values.h"

namespace pm {
namespace {

using test::normal_values;
using test::same_bits;

int64_t first_difference(const std::vector<float>& a, const std::vector<float>& b) {
  for (std::size_t i = 0; i < a.size(); ++i)
    if (std::memcmp(&a[i], &b[i], sizeof(float)) != 0) return static_cast<int64_t>(i);
  return -1;
}

// Sequence b's head h in qkv, out and dqkv (attention.h's layouts): query head h reads key/value
// head h / group.
struct HeadAt {
  int64_t D, Dkv, ld, group;
  HeadAt(int64_t heads, int64_t kv_heads, int64_t hd)
      : D(heads * hd), Dkv(kv_heads * hd), ld(D + 2 * Dkv), group(heads / kv_heads) {}
  int64_t q(int64_t b, int64_t S, int64_t h, int64_t hd) const { return b * S * ld + h * hd; }
  int64_t k(int64_t b, int64_t S, int64_t h, int64_t hd) const { return b * S * ld + D + (h / group) * hd; }
  int64_t v(int64_t b, int64_t S, int64_t h, int64_t hd) const { return k(b, S, h, hd) + Dkv; }
  int64_t out(int64_t b, int64_t S, int64_t h, int64_t hd) const { return b * S * D + h * hd; }
};

// The square formulation: every product over the whole sequence by gemm, the softmax row by row.
void square_forward(const float* qkv, int64_t B, int64_t S, int64_t heads, int64_t kv_heads, int64_t hd, float* probs,
                    float* out) {
  const HeadAt at(heads, kv_heads, hd);
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < heads; ++h) {
      float* p = probs + (b * heads + h) * S * S;
      gemm(Trans::no, Trans::yes, S, S, hd, qkv + at.q(b, S, h, hd), at.ld, qkv + at.k(b, S, h, hd), at.ld, 0.0f, p,
           S);
      for (int64_t i = 0; i < S; ++i) {
        float* row = p + i * S;
        float max = row[0] * scale;
        for (int64_t j = 0; j <= i; ++j) max = std::max(max, row[j] * scale);
        float sum = 0;
        for (int64_t j = 0; j <= i; ++j) {
          row[j] = exp_approx(row[j] * scale - max);
          sum += row[j];
        }
        const float inv = 1.0f / sum;
        for (int64_t j = 0; j <= i; ++j) row[j] *= inv;
        for (int64_t j = i + 1; j < S; ++j) row[j] = 0.0f;
      }
      gemm(Trans::no, Trans::no, S, hd, S, p, S, qkv + at.v(b, S, h, hd), at.ld, 0.0f, out + at.out(b, S, h, hd), at.D);
    }
}

void square_backward(const float* qkv, const float* probs, const float* dout, int64_t B, int64_t S, int64_t heads,
                     int64_t kv_heads, int64_t hd, float* dqkv) {
  const HeadAt at(heads, kv_heads, hd);
  const int64_t ld = at.ld;
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  std::vector<float> dp(S * S);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < heads; ++h) {
      const float* p = probs + (b * heads + h) * S * S;
      const float* dO = dout + at.out(b, S, h, hd);
      const float into = h % at.group == 0 ? 0.0f : 1.0f;  // grouped heads: the sum in head order
      gemm(Trans::yes, Trans::no, S, hd, S, p, S, dO, at.D, into, dqkv + at.v(b, S, h, hd), ld);
      gemm(Trans::no, Trans::yes, S, S, hd, dO, at.D, qkv + at.v(b, S, h, hd), ld, 0.0f, dp.data(), S);
      for (int64_t i = 0; i < S; ++i) {
        float* row = dp.data() + i * S;
        const float* pr = p + i * S;
        float inner = 0;
        for (int64_t j = 0; j <= i; ++j) inner += pr[j] * row[j];
        for (int64_t j = 0; j <= i; ++j) row[j] = pr[j] * (row[j] - inner) * scale;
        for (int64_t j = i + 1; j < S; ++j) row[j] = 0.0f;
      }
      gemm(Trans::no, Trans::no, S, hd, S, dp.data(), S, qkv + at.k(b, S, h, hd), ld, 0.0f, dqkv + at.q(b, S, h, hd),
           ld);
      gemm(Trans::yes, Trans::no, S, hd, S, dp.data(), S, qkv + at.q(b, S, h, hd), ld, into, dqkv + at.k(b, S, h, hd),
           ld);
    }
}

struct Shape {
  int64_t B, S, heads, kv_heads, hd;
};

// sequences shorter than a block, of a block and one more, past 64 columns, heads of 16 and less
// than 16, not multiples of 16; one key/value head for three query heads
const Shape kShapes[] = {{2, 37, 4, 2, 24}, {1, 128, 4, 4, 48}, {1, 1, 2, 1, 16},  {1, 7, 2, 2, 8},
                         {1, 70, 3, 1, 20}, {2, 13, 2, 2, 64}, {1, 200, 2, 2, 40}};

TEST(Attention, BlocksGiveTheBitsOfTheSquareProducts) {
  uint64_t seed = 10;
  for (const Shape& s : kShapes) {
    SCOPED_TRACE(testing::Message() << "B " << s.B << " S " << s.S << " heads " << s.heads << "/" << s.kv_heads
                                    << " hd " << s.hd);
    const int64_t D = s.heads * s.hd, ld = D + 2 * s.kv_heads * s.hd, T = s.B * s.S;
    const std::vector<float> qkv = normal_values(T * ld, ++seed, 1.5f), dout = normal_values(T * D, ++seed);
    std::vector<float> probs(s.B * s.heads * s.S * s.S, 7.0f), out(T * D, 7.0f), dqkv(T * ld, 7.0f);
    std::vector<float> probs_ref(probs.size()), out_ref(out.size()), dqkv_ref(dqkv.size());
    attention_forward(qkv.data(), s.B, s.S, s.heads, s.kv_heads, s.hd, probs.data(), out.data());
    square_forward(qkv.data(), s.B, s.S, s.heads, s.kv_heads, s.hd, probs_ref.data(), out_ref.data());
    EXPECT_TRUE(same_bits(probs, probs_ref)) << "probs differ first at " << first_difference(probs, probs_ref);
    EXPECT_TRUE(same_bits(out, out_ref)) << "out differs first at " << first_difference(out, out_ref);
    attention_backward(qkv.data(), probs.data(), dout.data(), s.B, s.S, s.heads, s.kv_heads, s.hd, dqkv.data());
    square_backward(qkv.data(), probs_ref.data(), dout.data(), s.B, s.S, s.heads, s.kv_heads, s.hd, dqkv_ref.data());
    EXPECT_TRUE(same_bits(dqkv, dqkv_ref)) << "dqkv differs first at " << first_difference(dqkv, dqkv_ref);
  }
}

// Token by token against the key/value cache: each row of the forward's output, bit for bit.
TEST(Attention, DecodeGivesTheForwardsRows) {
  for (const Shape& s : {Shape{2, 37, 4, 2, 24}, Shape{1, 70, 3, 1, 20}}) {
    const int64_t D = s.heads * s.hd, Dkv = s.kv_heads * s.hd, ld = D + 2 * Dkv, T = s.B * s.S;
    const std::vector<float> qkv = normal_values(T * ld, 77);
    std::vector<float> probs(s.B * s.heads * s.S * s.S), out(T * D);
    attention_forward(qkv.data(), s.B, s.S, s.heads, s.kv_heads, s.hd, probs.data(), out.data());
    std::vector<float> k_cache(s.B * Dkv * s.S), v_cache(s.B * s.S * Dkv), step(ld * s.B), got(D * s.B);
    for (int64_t t = 0; t < s.S; ++t) {
      for (int64_t b = 0; b < s.B; ++b) std::memcpy(&step[b * ld], &qkv[(b * s.S + t) * ld], ld * sizeof(float));
      const std::vector<int64_t> pos(s.B, t);
      attention_decode(step.data(), k_cache.data(), v_cache.data(), pos.data(), nullptr, s.B, s.S, s.heads,
                       s.kv_heads, s.hd, got.data());
      for (int64_t b = 0; b < s.B; ++b)
        ASSERT_EQ(std::memcmp(&got[b * D], &out[(b * s.S + t) * D], D * sizeof(float)), 0)
            << "sequence " << b << ", position " << t;
    }
  }
}

TEST(ChainProduct, GivesTheBitsOfGemm) {
  struct Case {
    int64_t M, N, K;
    bool transposed, accumulate;
  };
  const Case cases[] = {{6, 64, 48, false, false}, {5, 37, 13, true, true},  {13, 130, 7, false, true},
                        {1, 1, 1, true, false},    {7, 200, 129, true, false}, {12, 48, 0, false, true}};
  uint64_t seed = 40;
  for (const Case& c : cases) {
    SCOPED_TRACE(testing::Message() << c.M << " x " << c.N << " x " << c.K << (c.transposed ? " A^T" : "")
                                    << (c.accumulate ? " into C" : ""));
    // operands inside wider rows, as attention's heads lie in qkv
    const int64_t lda = (c.transposed ? c.M : c.K) + 3, ldb = c.N + 5, ldc = c.N + 2;
    const std::vector<float> A = normal_values((c.transposed ? c.K : c.M) * lda, ++seed);
    const std::vector<float> B = normal_values(std::max<int64_t>(c.K, 1) * ldb, ++seed);
    std::vector<float> C = normal_values(c.M * ldc, ++seed), expected = C;
    const StridedRows a = c.transposed ? StridedRows{A.data(), 1, lda} : StridedRows{A.data(), lda, 1};
    chain_product(c.M, c.N, c.K, a, B.data(), ldb, C.data(), ldc, c.accumulate);
    gemm(c.transposed ? Trans::yes : Trans::no, Trans::no, c.M, c.N, c.K, A.data(), lda, B.data(), ldb,
         c.accumulate ? 1.0f : 0.0f, expected.data(), ldc);
    EXPECT_TRUE(same_bits(C, expected)) << "C differs first at " << first_difference(C, expected)
                                        << " (columns past N must keep their values)";
  }
}

}  // namespace
}  // namespace pm
