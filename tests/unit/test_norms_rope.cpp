// RMSNorm and rotary embeddings (the Llama-style backbone's kernels) against closed forms in
// double, RMSNorm's backward against finite differences, and the rotations' defining properties.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <vector>

#include "kernels/cpu/layernorm.h"
#include "kernels/cpu/rope.h"
#include "support/random_values.h"

namespace pm {
namespace {

using test::normal_values;
using test::same_bits;

TEST(RmsNorm, ClosedFormAndFiniteDifferences) {
  const int64_t rows = 3, D = 40;
  const float eps = 1e-5f;
  std::vector<float> x = normal_values(rows * D, 1, 2.0f), g = normal_values(D, 2), y(rows * D), rstd(rows);
  rmsnorm_forward(x.data(), g.data(), rows, D, eps, y.data(), rstd.data());
  for (int64_t r = 0; r < rows; ++r) {
    double ms = 0;
    for (int64_t i = 0; i < D; ++i) ms += double(x[r * D + i]) * x[r * D + i];
    const double s = 1.0 / std::sqrt(ms / D + eps);
    EXPECT_NEAR(rstd[r], s, 1e-6 * s);
    for (int64_t i = 0; i < D; ++i) EXPECT_NEAR(y[r * D + i], x[r * D + i] * s * g[i], 1e-5);
  }
  // loss = sum(y * w): dx and dgamma against central differences in double
  std::vector<float> w = normal_values(rows * D, 3), dx(rows * D), dg(D, 0.0f);
  rmsnorm_backward(x.data(), g.data(), rstd.data(), w.data(), rows, D, dx.data(), dg.data());
  auto loss = [&](const std::vector<float>& xs, const std::vector<float>& gs) {
    double l = 0;
    for (int64_t r = 0; r < rows; ++r) {
      double ms = 0;
      for (int64_t i = 0; i < D; ++i) ms += double(xs[r * D + i]) * xs[r * D + i];
      const double s = 1.0 / std::sqrt(ms / D + eps);
      for (int64_t i = 0; i < D; ++i) l += xs[r * D + i] * s * gs[i] * w[r * D + i];
    }
    return l;
  };
  const float h = 1e-2f;
  for (int64_t at : {0L, 7L, 45L, 119L}) {
    std::vector<float> up = x, down = x;
    up[at] += h, down[at] -= h;
    EXPECT_NEAR(dx[at], (loss(up, g) - loss(down, g)) / (2.0 * h), 1e-3) << "dx " << at;
  }
  for (int64_t at : {0L, 13L, 39L}) {
    std::vector<float> up = g, down = g;
    up[at] += h, down[at] -= h;
    EXPECT_NEAR(dg[at], (loss(x, up) - loss(x, down)) / (2.0 * h), 1e-3) << "dgamma " << at;
  }
}

// cos and sin [S, hd / 2] of the angles pos * theta^(-2i / hd), as the model builds them
void rope_tables(int64_t S, int64_t hd, double theta, std::vector<float>& c, std::vector<float>& s) {
  const int64_t half = hd / 2;
  c.resize(S * half), s.resize(S * half);
  for (int64_t p = 0; p < S; ++p)
    for (int64_t i = 0; i < half; ++i) {
      const double angle = p * std::pow(theta, -2.0 * i / hd);
      c[p * half + i] = static_cast<float>(std::cos(angle));
      s[p * half + i] = static_cast<float>(std::sin(angle));
    }
}

// The norms run 8 rows side by side (their sums in double advance together, 8 columns at a time
// and then the columns left one by one): a call over many rows gives the bits of a call per row,
// every sum in the same order, and the parameters' gradients gather the rows in order.
TEST(Norms, RowsSideBySideGiveTheBitsOfOneRowAtATime) {
  const float eps = 1e-5f;
  for (const int64_t rows : {1, 8, 19}) {
    for (const int64_t D : {1, 7, 13, 192, 197}) {
      // and rows whose sums show their order: +-2^60 in the first two columns of each block of 8,
      // which cancel in column order and swallow the small values beside them in any other
      for (const bool cancelling : {false, true}) {
        SCOPED_TRACE(testing::Message() << rows << " rows of " << D << (cancelling ? ", cancelling" : ""));
        std::vector<float> x = normal_values(rows * D, 11, 3.0f), dy = normal_values(rows * D, 12);
        std::vector<float> g = normal_values(D, 13), b = normal_values(D, 14);
        if (cancelling) {
          g.assign(D, 1.0f);
          for (int64_t r = 0; r < rows; ++r)
            for (int64_t i = 0; i + 1 < D; i += 8)
              for (std::vector<float>* v : {&x, &dy}) (*v)[r * D + i] = 0x1p60f, (*v)[r * D + i + 1] = -0x1p60f;
        }
        auto same = same_bits;
        std::vector<float> y(rows * D), mean(rows), rstd(rows), dx(rows * D), dg(D, 0.5f), db(D, 0.25f);
        std::vector<float> y1 = y, mean1 = mean, rstd1 = rstd, dx1 = dx, dg1 = dg, db1 = db;
        layernorm_forward(x.data(), g.data(), b.data(), rows, D, eps, y.data(), mean.data(), rstd.data());
        layernorm_backward(x.data(), g.data(), mean.data(), rstd.data(), dy.data(), rows, D, dx.data(), dg.data(),
                           db.data());
        for (int64_t r = 0; r < rows; ++r) {
          layernorm_forward(&x[r * D], g.data(), b.data(), 1, D, eps, &y1[r * D], &mean1[r], &rstd1[r]);
          layernorm_backward(&x[r * D], g.data(), &mean1[r], &rstd1[r], &dy[r * D], 1, D, &dx1[r * D], dg1.data(),
                             db1.data());
        }
        EXPECT_TRUE(same(y, y1) && same(mean, mean1) && same(rstd, rstd1)) << "LayerNorm's forward";
        EXPECT_TRUE(same(dx, dx1) && same(dg, dg1) && same(db, db1)) << "LayerNorm's backward";
        std::vector<float> ry(rows * D), rr(rows), rdx(rows * D), rdg(D, 0.5f);
        std::vector<float> ry1 = ry, rr1 = rr, rdx1 = rdx, rdg1 = rdg;
        rmsnorm_forward(x.data(), g.data(), rows, D, eps, ry.data(), rr.data());
        rmsnorm_backward(x.data(), g.data(), rr.data(), dy.data(), rows, D, rdx.data(), rdg.data());
        for (int64_t r = 0; r < rows; ++r) {
          rmsnorm_forward(&x[r * D], g.data(), 1, D, eps, &ry1[r * D], &rr1[r]);
          rmsnorm_backward(&x[r * D], g.data(), &rr1[r], &dy[r * D], 1, D, &rdx1[r * D], rdg1.data());
        }
        EXPECT_TRUE(same(ry, ry1) && same(rr, rr1)) << "RMSNorm's forward";
        EXPECT_TRUE(same(rdx, rdx1) && same(rdg, rdg1)) << "RMSNorm's backward";
      }
    }
  }
}

TEST(Rope, TurnsQueriesAndKeysByTheirPositionsOnly) {
  const int64_t S = 12, heads = 2, hd = 8, width = heads * hd, rows = 2 * S;  // two sequences
  std::vector<float> c, s;
  rope_tables(S, hd, 10000.0, c, s);
  const std::vector<float> qkv = normal_values(rows * 3 * width, 4);
  std::vector<float> turned = qkv;
  rope_rotate(turned.data(), rows, 3 * width, 2 * width, hd, nullptr, S, c.data(), s.data(), false);
  for (int64_t t = 0; t < rows; ++t) {
    const int64_t p = t % S;
    for (int64_t at = 0; at < 2 * width; at += hd)
      for (int64_t i = 0; i < hd / 2; ++i) {
        const double a = qkv[t * 3 * width + at + i], b = qkv[t * 3 * width + at + i + hd / 2];
        const double angle = p * std::pow(10000.0, -2.0 * i / hd);
        EXPECT_NEAR(turned[t * 3 * width + at + i], a * std::cos(angle) - b * std::sin(angle), 1e-5);
        EXPECT_NEAR(turned[t * 3 * width + at + i + hd / 2], b * std::cos(angle) + a * std::sin(angle), 1e-5);
      }
    for (int64_t i = 2 * width; i < 3 * width; ++i)  // values untouched
      EXPECT_EQ(turned[t * 3 * width + i], qkv[t * 3 * width + i]);
  }
  // explicit positions give the bits of t % S
  std::vector<int64_t> pos(rows);
  for (int64_t t = 0; t < rows; ++t) pos[t] = t % S;
  std::vector<float> by_pos = qkv;
  rope_rotate(by_pos.data(), rows, 3 * width, 2 * width, hd, pos.data(), S, c.data(), s.data(), false);
  EXPECT_EQ(by_pos, turned);
  // the inverse turns it back
  rope_rotate(turned.data(), rows, 3 * width, 2 * width, hd, nullptr, S, c.data(), s.data(), true);
  for (int64_t i = 0; i < rows * 3 * width; ++i) EXPECT_NEAR(turned[i], qkv[i], 1e-5);
}

TEST(Rope, AQueryMeetsAKeyByTheirDistanceOnly) {
  // the same query and key at positions (p, p - d) score alike for every p: attention sees distance
  const int64_t S = 32, hd = 16, width = hd;
  std::vector<float> c, s;
  rope_tables(S, hd, 10000.0, c, s);
  const std::vector<float> base = normal_values(3 * width, 5);
  auto score = [&](int64_t pq, int64_t pk) {
    std::vector<float> q = base, k = base;
    rope_rotate(q.data(), 1, 3 * width, 2 * width, hd, &pq, S, c.data(), s.data(), false);
    rope_rotate(k.data(), 1, 3 * width, 2 * width, hd, &pk, S, c.data(), s.data(), false);
    double dot = 0;
    for (int64_t i = 0; i < hd; ++i) dot += double(q[i]) * k[width + i];
    return dot;
  };
  for (int64_t d : {0, 1, 5}) {
    const double at = score(d, 0);
    for (int64_t p = d; p < S; p += 7) EXPECT_NEAR(score(p, p - d), at, 1e-4) << "distance " << d << ", position " << p;
  }
  EXPECT_GT(std::abs(score(1, 0) - score(5, 0)), 1e-3);  // and distance matters
}

}  // namespace
}  // namespace pm
