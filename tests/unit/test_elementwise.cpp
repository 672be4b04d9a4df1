// Element and row kernels against closed forms, and backwards against finite differences.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "core/rng.h"
#include "core/tensor.h"
#include "kernels/cpu/elementwise.h"
#include "kernels/cpu/fast_math.h"
#include "kernels/cpu/gemm.h"

namespace pm {
namespace {

TEST(FastMath, ExpAndErfStayWithinAFewUlps) {
  for (double x = -80; x <= 80; x += 0.0137) {
    float xf = static_cast<float>(x);
    double ref = std::exp(static_cast<double>(xf));
    EXPECT_NEAR(exp_approx(xf), ref, 4e-7 * ref) << x;
  }
  for (double x = -6; x <= 6; x += 0.00071) EXPECT_NEAR(erf_approx(static_cast<float>(x)), std::erf(static_cast<float>(x)), 4e-7) << x;
}

TEST(Gelu, ExactErfFormAndItsDerivative) {
  for (double x = -8; x <= 8; x += 0.013) {
    float xf = static_cast<float>(x);
    double ref = 0.5 * xf * (1 + std::erf(xf / std::sqrt(2.0)));
    EXPECT_NEAR(gelu(xf), ref, 1e-6 * (1 + std::abs(ref))) << x;
    double h = 1e-3;
    double numeric = (0.5 * (xf + h) * (1 + std::erf((xf + h) / std::sqrt(2.0))) -
                      0.5 * (xf - h) * (1 + std::erf((xf - h) / std::sqrt(2.0)))) / (2 * h);
    EXPECT_NEAR(gelu_grad(xf), numeric, 2e-6) << x;
  }
  std::vector<float> in = {-3, -1, 0, 0.5f, 2}, out(5), g(5, 2.0f), din(5);
  gelu_forward(in.data(), out.data(), 5);
  gelu_backward(in.data(), g.data(), din.data(), 5);
  for (int i = 0; i < 5; ++i) {
    EXPECT_FLOAT_EQ(out[i], gelu(in[i]));
    EXPECT_FLOAT_EQ(din[i], 2.0f * gelu_grad(in[i]));
  }
}

// Element by element, never vectorised: the reference for the vectorised loops below.
__attribute__((optimize("no-tree-vectorize"))) void scalar_reference(const std::vector<float>& in, std::vector<float>& out,
                                                                     std::vector<float>& grad) {
  for (std::size_t i = 0; i < in.size(); ++i) {
    out[i] = gelu(in[i]);
    grad[i] = 0.75f * gelu_grad(in[i]);
  }
}

// The row kernels run vectorised (8 or 16 lanes, a scalar tail, any alignment): the same bits as
// the formulas one element at a time, on the clamps' edges, huge, tiny and non-finite values.
TEST(Gelu, VectorisedRowsGiveTheScalarBits) {
  std::vector<float> in;
  for (double x = -12; x <= 12; x += 0.0071) in.push_back(static_cast<float>(x));
  for (float v : {-4.0f, 4.0f, -5.656854f, 5.656854f, -87.0f, 88.0f, 1e-30f, -1e-30f, 3e38f, -3e38f, 0.0f, -0.0f})
    in.push_back(v);
  in.push_back(std::numeric_limits<float>::infinity());
  in.push_back(-std::numeric_limits<float>::infinity());
  const std::size_t n = in.size();
  std::vector<float> out(n), grad(n);
  scalar_reference(in, out, grad);
  for (std::size_t offset : {0, 1, 3}) {  // unaligned starts and tails of every length
    const int64_t m = static_cast<int64_t>(n - offset);
    std::vector<float> fwd(n), bwd(n), scale(n, 0.75f);
    gelu_forward(in.data() + offset, fwd.data(), m);
    gelu_backward(in.data() + offset, scale.data(), bwd.data(), m);
    for (int64_t i = 0; i < m; ++i) {
      ASSERT_EQ(std::memcmp(&fwd[i], &out[i + offset], 4), 0) << "gelu(" << in[i + offset] << ")";
      ASSERT_EQ(std::memcmp(&bwd[i], &grad[i + offset], 4), 0) << "gelu'(" << in[i + offset] << ")";
    }
    // in place, as the expert's backward calls it: the gradient in, its product out
    std::vector<float> in_place(scale.begin(), scale.begin() + m);
    gelu_backward(in.data() + offset, in_place.data(), in_place.data(), m);
    EXPECT_EQ(std::memcmp(in_place.data(), bwd.data(), m * 4), 0) << "offset " << offset;
    // the expert's pair: GeLU'(x) saved in place of x by the forward (a tile of one row), then
    // the backward's product by it, in place on the gradient: the same bits as the two above
    std::vector<float> saved(in.begin() + offset, in.end()), fwd_saving(n), by_saved(scale.begin(), scale.begin() + m);
    gelu_forward_tile(saved.data(), m, 1, m, fwd_saving.data(), nullptr, m, /*save_grad=*/true);
    gelu_backward_by_saved_grad(saved.data(), by_saved.data(), by_saved.data(), m);
    EXPECT_EQ(std::memcmp(fwd_saving.data(), fwd.data(), m * 4), 0) << "offset " << offset;
    EXPECT_EQ(std::memcmp(by_saved.data(), bwd.data(), m * 4), 0) << "offset " << offset;
  }
  EXPECT_TRUE(std::isnan(gelu(std::numeric_limits<float>::quiet_NaN())));
}

// The expert's GeLU runs on each GEMM tile (rows of a wider matrix) and writes its activations
// as floats or rounded to bf16: the bits of gelu_forward row by row, then float_to_bf16, for
// every width of tile (whole vectors and tails), with and without the saved GeLU'.
TEST(Gelu, TilesGiveTheBitsOfRowsAndOfFloatToBf16) {
  const int64_t rows = 6, ld = 80, ld_out = 72;
  std::vector<float> x(rows * ld);
  Rng(7, 1).fill_normal(x.data(), x.size(), 0.0f, 3.0f);
  x[3] = std::numeric_limits<float>::infinity();
  x[ld + 5] = -std::numeric_limits<float>::infinity();  // GeLU(-inf) is NaN: bf16 0x7fc0
  x[2 * ld + 7] = std::numeric_limits<float>::quiet_NaN();
  x[3 * ld + 1] = 1e-39f;  // a subnormal
  x[4 * ld + 2] = 20.0f;    // beyond both clamps (erf at 4, the exp of -x^2 / 2 at -87)
  x[5 * ld + 9] = -20.0f;
  for (int64_t n : {1, 15, 16, 17, 33, 64}) {
    for (bool save_grad : {false, true}) {
      std::vector<float> tile = x, out(rows * ld_out, -1.0f), grads = x;
      std::vector<uint16_t> out_bf16(rows * ld_out, 1);
      gelu_forward_tile(tile.data(), ld, rows, n, out.data(), nullptr, ld_out, save_grad);
      std::vector<float> tile16 = x;
      gelu_forward_tile(tile16.data(), ld, rows, n, nullptr, out_bf16.data(), ld_out, save_grad);
      std::vector<float> one(n, 1.0f);
      for (int64_t r = 0; r < rows; ++r) {
        std::vector<float> want(n), want_grad(n);
        gelu_forward(x.data() + r * ld, want.data(), n);
        gelu_backward(x.data() + r * ld, one.data(), want_grad.data(), n);  // 1 * GeLU'(x)
        for (int64_t c = 0; c < n; ++c) {
          ASSERT_EQ(std::memcmp(&out[r * ld_out + c], &want[c], 4), 0) << "row " << r << " col " << c;
          ASSERT_EQ(out_bf16[r * ld_out + c], float_to_bf16(want[c])) << "row " << r << " col " << c << " n " << n;
          // (a NaN's sign may differ from 1 * NaN's)
          const float saved = save_grad ? want_grad[c] : x[r * ld + c];
          for (float got : {tile[r * ld + c], tile16[r * ld + c]})
            ASSERT_TRUE(std::memcmp(&got, &saved, 4) == 0 || (std::isnan(got) && std::isnan(saved)))
                << "row " << r << " col " << c;
        }
        for (int64_t c = n; c < ld_out; ++c) ASSERT_EQ(out[r * ld_out + c], -1.0f) << "written past the tile";
        for (int64_t c = n; c < ld; ++c) ASSERT_EQ(std::memcmp(&tile[r * ld + c], &x[r * ld + c], 4), 0);
      }
    }
  }
  EXPECT_EQ(float_to_bf16(std::numeric_limits<float>::quiet_NaN()), 0x7fc0);
}

// SwiGLU's rows: the scalar formulas' bits, with the backward's gradient read from the second
// half of the row it writes (dact = dhpre + n, as the expert's backward lays it out).
__attribute__((optimize("no-tree-vectorize"))) void swiglu_reference(const float* hpre, const float* dact, int64_t n,
                                                                     float* act, float* dhpre) {
  for (int64_t i = 0; i < n; ++i) {
    const float g = hpre[i], v = hpre[n + i], s = sigmoid_approx(g);
    act[i] = g * s * v;
    dhpre[i] = dact[i] * v * (s + g * s * (1.0f - s));
    dhpre[n + i] = dact[i] * (g * s);
  }
}

TEST(Swiglu, VectorisedRowsGiveTheScalarBits) {
  for (int64_t n : {1, 7, 31, 32, 33, 100, 257}) {
    std::vector<float> hpre(2 * n), dact(n);
    Rng(5, n).fill_normal(hpre.data(), 2 * n, 0.0f, 4.0f);
    Rng(6, n).fill_normal(dact.data(), n, 0.0f, 1.0f);
    hpre[0] = 100.0f;  // sigmoid saturates
    if (n > 2) hpre[2] = -100.0f;
    std::vector<float> act_ref(n), dhpre_ref(2 * n), act(n), dhpre(2 * n);
    swiglu_reference(hpre.data(), dact.data(), n, act_ref.data(), dhpre_ref.data());
    swiglu_forward(hpre.data(), act.data(), n);
    std::copy(dact.begin(), dact.end(), dhpre.begin() + n);
    swiglu_backward(hpre.data(), dhpre.data() + n, dhpre.data(), n);
    EXPECT_EQ(std::memcmp(act.data(), act_ref.data(), n * 4), 0) << n;
    EXPECT_EQ(std::memcmp(dhpre.data(), dhpre_ref.data(), 2 * n * 4), 0) << n;
    // straight into bf16 (a bf16 expert's activations): the floats rounded as float_to_bf16 rounds
    std::vector<uint16_t> act16(n);
    swiglu_forward(hpre.data(), act16.data(), n);
    for (int64_t i = 0; i < n; ++i) ASSERT_EQ(act16[i], float_to_bf16(act_ref[i])) << n << " " << i;
  }
}

TEST(Softmax, RowsSumToOneAndBackwardMatchesFiniteDifferences) {
  const int rows = 3, cols = 7;
  std::vector<float> x(rows * cols), p(rows * cols), dp(rows * cols), dx(rows * cols);
  Rng(1, 1).fill_normal(x.data(), x.size(), 0, 3);
  Rng(1, 2).fill_normal(dp.data(), dp.size(), 0, 1);
  softmax_rows(x.data(), p.data(), rows, cols);
  for (int r = 0; r < rows; ++r) {
    double sum = 0;
    for (int c = 0; c < cols; ++c) sum += p[r * cols + c];
    EXPECT_NEAR(sum, 1.0, 1e-6);
  }
  softmax_rows_backward(p.data(), dp.data(), dx.data(), rows, cols);
  // loss = sum(dp * softmax(x)); d loss / dx by central differences in double
  for (int i = 0; i < rows * cols; ++i) {
    auto loss = [&](double delta) {
      int r = i / cols;
      double max = -1e30, sum = 0, out = 0;
      std::vector<double> row(cols);
      for (int c = 0; c < cols; ++c) row[c] = x[r * cols + c] + (r * cols + c == i ? delta : 0.0), max = std::max(max, row[c]);
      for (int c = 0; c < cols; ++c) sum += std::exp(row[c] - max);
      for (int c = 0; c < cols; ++c) out += dp[r * cols + c] * std::exp(row[c] - max) / sum;
      return out;
    };
    EXPECT_NEAR(dx[i], (loss(1e-4) - loss(-1e-4)) / 2e-4, 1e-4) << i;
  }
}

TEST(TopK, LargestFirstTiesToTheLowerIndex) {
  std::vector<float> v = {0.1f, 0.3f, 0.3f, 0.2f,   // tie between 1 and 2
                          0.5f, 0.5f, 0.5f, 0.5f};  // all equal
  std::vector<int32_t> idx(4);
  std::vector<float> val(4);
  topk_rows(v.data(), 2, 4, 2, idx.data(), val.data());
  EXPECT_EQ(idx[0], 1);
  EXPECT_EQ(idx[1], 2);
  EXPECT_EQ(idx[2], 0);
  EXPECT_EQ(idx[3], 1);
  EXPECT_FLOAT_EQ(val[0], 0.3f);
}

// Against a stable sort (largest first, ties keep their order): rows drawn from a few values so
// that ties are everywhere, with signed zeros and infinities, every k from 1 to the width. Both
// ways topk_rows runs: 16 rows at once in vector lanes (AVX-512, k <= 8; the last rows of a
// matrix one by one) and one row at a time (the GEMM's AVX2 or scalar kernels forced).
TEST(TopK, MatchesAStableSortWithTiesZerosAndInfinities) {
  const float pool[] = {-INFINITY, -1.0f, -0.0f, 0.0f, 0.5f, 0.5f, 2.0f, INFINITY};
  for (const char* isa : {"", "avx2"}) {
    if (*isa && !__builtin_cpu_supports("avx2")) continue;
    force_gemm_isa(isa);
    Rng rng(7, 0);
    for (int cols : {1, 2, 8, 17, 64, 100, 256}) {
      const int rows = 50;
      std::vector<float> v(rows * cols);
      for (float& x : v) x = pool[rng.next_u64() % 8];
      for (int k = 1; k <= cols; k = k < 8 ? k + 1 : k * 2) {
        std::vector<int32_t> idx(rows * k);
        std::vector<float> val(rows * k);
        topk_rows(v.data(), rows, cols, k, idx.data(), val.data());
        for (int r = 0; r < rows; ++r) {
          std::vector<int32_t> order(cols);
          for (int c = 0; c < cols; ++c) order[c] = c;
          const float* row = &v[r * cols];
          std::stable_sort(order.begin(), order.end(), [&](int32_t a, int32_t b) { return row[a] > row[b]; });
          for (int j = 0; j < k; ++j) {
            ASSERT_EQ(idx[r * k + j], order[j]) << "isa '" << isa << "' cols " << cols << " k " << k << " row " << r
                                                << " place " << j;
            ASSERT_EQ(std::signbit(val[r * k + j]), std::signbit(row[order[j]]));
            ASSERT_EQ(val[r * k + j], row[order[j]]);
          }
        }
      }
    }
  }
  force_gemm_isa("");
}

// Random scores (few ties) of router shapes, 16 rows at a time or not, with a NaN in some rows of
// a block of 16: every row as topk_rows gives it on its own (one row: never the lanes), so a NaN
// row in a block keeps the selection's answer and its neighbours their own.
TEST(TopK, RowsInBlocksOf16GiveEachRowsOwnAnswer) {
  Rng rng(11, 0);
  for (int cols : {8, 64, 256}) {
    const int rows = 37;
    std::vector<float> v(rows * cols);
    rng.fill_uniform(v.data(), rows * cols, -1.0f, 1.0f);
    v[3 * cols + 5] = NAN;
    v[20 * cols + cols - 1] = NAN;
    for (int k : {1, 2, 6, 8}) {
      std::vector<int32_t> idx(rows * k), one_idx(k);
      std::vector<float> val(rows * k), one_val(k);
      topk_rows(v.data(), rows, cols, k, idx.data(), val.data());
      for (int r = 0; r < rows; ++r) {
        topk_rows(&v[r * cols], 1, cols, k, one_idx.data(), one_val.data());
        for (int j = 0; j < k; ++j) {
          ASSERT_EQ(idx[r * k + j], one_idx[j]) << "cols " << cols << " k " << k << " row " << r << " place " << j;
          ASSERT_TRUE(val[r * k + j] == one_val[j] || (std::isnan(val[r * k + j]) && std::isnan(one_val[j])));
        }
      }
    }
  }
}

// A NaN has no place in an order: such a row keeps the selection's answer (first untaken wins
// until something compares larger), whatever the fast path does for other rows.
TEST(TopK, ARowWithANanKeepsTheSelectionsAnswer) {
  const std::vector<float> v = {NAN, 1.0f, 2.0f, 3.0f, 1.0f, 2.0f};  // [2, 3]
  std::vector<int32_t> idx(4);
  std::vector<float> val(4);
  topk_rows(v.data(), 2, 3, 2, idx.data(), val.data());
  EXPECT_EQ(idx[0], 0);
  EXPECT_EQ(idx[1], 2);
  EXPECT_TRUE(std::isnan(val[0]));
  EXPECT_EQ(idx[2], 0);
  EXPECT_EQ(idx[3], 2);
  EXPECT_ANY_THROW(topk_rows(v.data(), 2, 3, 0, idx.data(), val.data()));  // no choice to make
  EXPECT_ANY_THROW(topk_rows(v.data(), 2, 3, 4, idx.data(), val.data()));  // more than there are
}

TEST(Rows, GatherFillColumnSumsAxpyDot) {
  std::vector<float> src = {1, 2, 3, 4, 5, 6};  // [3, 2]
  std::vector<int32_t> index = {2, 0, 2};
  std::vector<float> dst(6);
  gather_rows(src.data(), 2, index.data(), 3, dst.data());
  EXPECT_EQ(dst, (std::vector<float>{5, 6, 1, 2, 5, 6}));
  std::vector<float> bias = {7, 8}, rows(6);
  fill_rows(rows.data(), 3, 2, bias.data());
  EXPECT_EQ(rows, (std::vector<float>{7, 8, 7, 8, 7, 8}));
  std::vector<float> sums = {1, 1};
  add_column_sums(src.data(), 3, 2, sums.data());
  EXPECT_EQ(sums, (std::vector<float>{10, 13}));
  std::vector<float> y = {1, 1, 1};
  axpy(2.0f, src.data(), y.data(), 3);
  EXPECT_EQ(y, (std::vector<float>{3, 5, 7}));
  std::vector<float> a(37), b(37);
  double expected = 0;
  for (int i = 0; i < 37; ++i) a[i] = 0.5f * i, b[i] = 1.0f - 0.01f * i, expected += double(a[i]) * b[i];
  EXPECT_NEAR(dot(a.data(), b.data(), 37), expected, 1e-5 * std::abs(expected));
}

// axpy and dot on bf16 rows (the all-to-all's slots) give the bits of the widened floats, for
// lengths with and without a tail.
TEST(RowKernels, Bf16OperandsGiveTheBitsOfTheirWidenedValues) {
  for (int64_t n : {1, 16, 37, 512}) {
    std::vector<float> x(n), y0(n), widened(n);
    Rng(9, n).fill_normal(x.data(), n, 0.0f, 2.0f);
    Rng(10, n).fill_normal(y0.data(), n, 0.0f, 1.0f);
    std::vector<uint16_t> x16(n);
    floats_to_bf16(x.data(), x16.data(), n);
    bf16_to_floats(x16.data(), widened.data(), n);
    std::vector<float> from_floats = y0, from_bf16 = y0;
    axpy(0.3f, widened.data(), from_floats.data(), n);
    axpy(0.3f, x16.data(), from_bf16.data(), n);
    EXPECT_EQ(std::memcmp(from_floats.data(), from_bf16.data(), n * 4), 0) << n;
    EXPECT_NE(std::memcmp(from_bf16.data(), y0.data(), n * 4), 0) << n;
    const float d_floats = dot(y0.data(), widened.data(), n), d_bf16 = dot(y0.data(), x16.data(), n);
    EXPECT_EQ(std::memcmp(&d_floats, &d_bf16, 4), 0) << n;
  }
}

}  // namespace
}  // namespace pm
