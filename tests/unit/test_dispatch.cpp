// Dispatch/combine kernels and their backwards against finite differences of the combine loss.
#include <gtest/gtest.h>

#include <cstring>
#include <string>
#include <vector>

#include "core/rng.h"
#include "core/tensor.h"
#include "kernels/cpu/dispatch.h"
#include "kernels/cpu/elementwise.h"

namespace pm {
namespace {

TEST(Dispatch, ScatterGatherAndBackwards) {
  const int64_t T = 3, M = 4;
  const int k = 2;
  // token 0 -> slots 2, 0; token 1 -> slot 3 and a dropped choice; token 2 -> nothing kept
  std::vector<int64_t> pos = {2, 0, 3, -1, -1, -1};
  std::vector<float> x(T * M), gate = {0.7f, 0.3f, 1.0f, 0.5f, 0.6f, 0.4f};
  Rng(3, 3).fill_normal(x.data(), x.size(), 0, 1);
  std::vector<float> slots(4 * M, -9.0f);
  dispatch_rows(x.data(), T, M, k, pos.data(), slots.data());
  for (int m = 0; m < M; ++m) {
    EXPECT_EQ(slots[2 * M + m], x[m]);
    EXPECT_EQ(slots[0 * M + m], x[m]);
    EXPECT_EQ(slots[3 * M + m], x[M + m]);
    EXPECT_EQ(slots[1 * M + m], -9.0f);  // untouched
  }
  // expert outputs: some other rows
  std::vector<float> out(4 * M), y(T * M, 5.0f);
  Rng(3, 4).fill_normal(out.data(), out.size(), 0, 1);
  combine_rows(out.data(), gate.data(), T, M, k, pos.data(), y.data());
  for (int m = 0; m < M; ++m) {
    EXPECT_FLOAT_EQ(y[m], 0.7f * out[2 * M + m] + 0.3f * out[m]);
    EXPECT_FLOAT_EQ(y[M + m], out[3 * M + m]);
    EXPECT_EQ(y[2 * M + m], 0.0f);
  }
  // loss = <dy, combine(out, gate)>: its gradients by finite differences in double
  std::vector<float> dy(T * M), dslots(4 * M, 0.0f), dgate(T * k);
  Rng(3, 5).fill_normal(dy.data(), dy.size(), 0, 1);
  combine_rows_backward_slots(dy.data(), gate.data(), T, M, k, pos.data(), dslots.data());
  combine_rows_backward_gate(dy.data(), out.data(), T, M, k, pos.data(), dgate.data());
  auto loss = [&](const std::vector<float>& o, const std::vector<float>& g) {
    std::vector<float> yy(T * M);
    combine_rows(o.data(), g.data(), T, M, k, pos.data(), yy.data());
    double s = 0;
    for (int64_t i = 0; i < T * M; ++i) s += double(dy[i]) * yy[i];
    return s;
  };
  const float h = 1e-2f;
  for (int64_t i = 0; i < 4 * M; ++i) {
    auto plus = out, minus = out;
    plus[i] += h, minus[i] -= h;
    EXPECT_NEAR(dslots[i], (loss(plus, gate) - loss(minus, gate)) / (2 * h), 1e-3) << i;
  }
  for (int64_t i = 0; i < T * k; ++i) {
    auto plus = gate, minus = gate;
    plus[i] += h, minus[i] -= h;
    EXPECT_NEAR(dgate[i], (loss(out, plus) - loss(out, minus)) / (2 * h), 1e-3) << i;
  }
  // dispatch backward: dx[t] += sum of its kept slots' gradients
  std::vector<float> dx(T * M, 1.0f);
  dispatch_rows_backward(dslots.data(), T, M, k, pos.data(), dx.data());
  for (int m = 0; m < M; ++m) {
    EXPECT_FLOAT_EQ(dx[m], 1.0f + dslots[2 * M + m] + dslots[m]);
    EXPECT_FLOAT_EQ(dx[M + m], 1.0f + dslots[3 * M + m]);
    EXPECT_EQ(dx[2 * M + m], 1.0f);
  }
}

// bf16 slots (a bf16 layer's all-to-all buffers): written rounded, read widened; every result is
// the float kernels' on the bf16 values, bit for bit.
TEST(Dispatch, Bf16SlotsGiveTheBitsOfFloatSlotsHoldingTheRoundedValues) {
  const int64_t T = 5, M = 37, rows = 7;
  const int k = 2;
  std::vector<int64_t> pos = {3, 0, 6, -1, 1, 2, -1, -1, 5, 4};
  std::vector<float> x(T * M), dy(T * M), gate(T * k);
  Rng(4, 1).fill_normal(x.data(), x.size(), 0, 1);
  Rng(4, 2).fill_normal(dy.data(), dy.size(), 0, 1);
  Rng(4, 3).fill_normal(gate.data(), gate.size(), 0, 1);
  auto rounded = [](std::vector<float> v) {
    for (float& f : v) f = round_to_bf16(f);
    return v;
  };
  auto widened = [](const std::vector<uint16_t>& v) {
    std::vector<float> out(v.size());
    bf16_to_floats(v.data(), out.data(), static_cast<int64_t>(v.size()));
    return out;
  };
  auto same = [](const std::vector<float>& a, const std::vector<float>& b) {
    return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
  };
  // dispatch: the rounded rows
  std::vector<uint16_t> slots16(rows * M, 0);
  std::vector<float> slots(rows * M, 0.0f);
  dispatch_rows(x.data(), T, M, k, pos.data(), slots16.data());
  dispatch_rows(x.data(), T, M, k, pos.data(), slots.data());
  EXPECT_TRUE(same(widened(slots16), rounded(slots)));
  // combine and the gate's gradient read bf16 slots as the float kernels read their values
  std::vector<float> y16(T * M), y(T * M), dgate16(T * k), dgate(T * k);
  const std::vector<float> as_floats = widened(slots16);
  combine_rows(slots16.data(), gate.data(), T, M, k, pos.data(), y16.data());
  combine_rows(as_floats.data(), gate.data(), T, M, k, pos.data(), y.data());
  EXPECT_TRUE(same(y16, y));
  combine_rows_backward_gate(dy.data(), slots16.data(), T, M, k, pos.data(), dgate16.data());
  combine_rows_backward_gate(dy.data(), as_floats.data(), T, M, k, pos.data(), dgate.data());
  EXPECT_TRUE(same(dgate16, dgate));
  // the combine's backward into bf16 slots: the float products, rounded
  std::vector<uint16_t> dslots16(rows * M, 0);
  std::vector<float> dslots(rows * M, 0.0f);
  combine_rows_backward_slots(dy.data(), gate.data(), T, M, k, pos.data(), dslots16.data());
  combine_rows_backward_slots(dy.data(), gate.data(), T, M, k, pos.data(), dslots.data());
  EXPECT_TRUE(same(widened(dslots16), rounded(dslots)));
  // the dispatch's backward sums the widened rows
  std::vector<float> dx16(T * M, 0.5f), dx(T * M, 0.5f);
  const std::vector<float> dslots_floats = widened(dslots16);
  dispatch_rows_backward(dslots16.data(), T, M, k, pos.data(), dx16.data());
  dispatch_rows_backward(dslots_floats.data(), T, M, k, pos.data(), dx.data());
  EXPECT_TRUE(same(dx16, dx));
  // and rounding really happened
  EXPECT_FALSE(same(widened(slots16), slots));
}

// The deduplicated backward dispatch's expert side: gate * dy made from the unscaled float rows by
// runs gives the bits the combine's backward writes on the token side, into float and bf16 rows.
TEST(Dispatch, ScaledCopiesGiveTheBitsOfTheCombinesBackward) {
  const int64_t T = 5, M = 37, rows = 7;
  const int k = 2;
  std::vector<int64_t> pos = {3, 0, 6, -1, 1, 2, -1, -1, 5, 4};
  std::vector<float> dy(T * M), gate(T * k);
  Rng(5, 1).fill_normal(dy.data(), dy.size(), 0, 1);
  Rng(5, 2).fill_normal(gate.data(), gate.size(), 0, 1);
  // each slot's gate value, and runs from its token's row of dy (slots 0-1 one run of two rows)
  std::vector<float> slot_gate(rows, 0.0f);
  std::vector<RowRun> runs;
  for (int64_t i = 0; i < T * k; ++i)
    if (pos[i] >= 0) slot_gate[pos[i]] = gate[i], runs.push_back({i / k, pos[i], 1});
  runs.push_back({0, 0, 0});  // an empty run copies nothing
  for (bool bf16 : {false, true}) {
    std::vector<float> want(rows * M, 0.0f), got(rows * M, 0.0f);
    std::vector<uint16_t> want16(rows * M, 0), got16(rows * M, 0);
    RowsOut want_rows = bf16 ? RowsOut(want16.data()) : RowsOut(want.data());
    RowsOut got_rows = bf16 ? RowsOut(got16.data()) : RowsOut(got.data());
    combine_rows_backward_slots(dy.data(), gate.data(), T, M, k, pos.data(), want_rows);
    copy_rows_scaled(dy.data(), got_rows, M, runs, slot_gate.data());
    EXPECT_EQ(std::memcmp(want.data(), got.data(), want.size() * sizeof(float)), 0) << "bf16 " << bf16;
    EXPECT_EQ(std::memcmp(want16.data(), got16.data(), want16.size() * sizeof(uint16_t)), 0) << "bf16 " << bf16;
    if (!bf16) {
      EXPECT_NE(want[3 * M], 0.0f);  // (the rows were written)
    }
  }
}

// The gathers' fixed order of operations, which a layer's bits rest on (and the CUDA kernels
// repeat): y[t] = ((0 + g_0 r_0) + g_1 r_1) + ... over the kept choices in order, dx[t] the same
// from its old value, a gate gradient pm::dot's. Widths that fill the kernels' blocks of 64
// columns and leave tails, k past their groups of 8, dropped choices, float and bf16 slots.
TEST(Dispatch, GathersKeepTheOrderOfOneChoiceAtATime) {
  const int64_t T = 9;
  for (int64_t M : {5, 37, 64, 100, 512})
    for (int k : {1, 3, 8, 11}) {
      const int64_t rows = T * k;
      std::vector<int64_t> pos(T * k);
      for (int64_t i = 0; i < T * k; ++i) pos[i] = (i * 7 + 3) % 5 == 0 ? -1 : (i * 13) % rows;  // some dropped
      std::vector<float> slots(rows * M), dy(T * M), gate(T * k), start(T * M);
      Rng(5, M * 16 + k).fill_normal(slots.data(), slots.size(), 0, 1);
      Rng(6, M * 16 + k).fill_normal(dy.data(), dy.size(), 0, 1);
      Rng(7, M * 16 + k).fill_normal(gate.data(), gate.size(), 0, 1);
      Rng(8, M * 16 + k).fill_normal(start.data(), start.size(), 0, 1);
      std::vector<uint16_t> slots16(slots.size());
      floats_to_bf16(slots.data(), slots16.data(), static_cast<int64_t>(slots.size()));
      std::vector<float> widened(slots.size());
      bf16_to_floats(slots16.data(), widened.data(), static_cast<int64_t>(slots.size()));
      for (bool bf16 : {false, true}) {
        const std::vector<float>& values = bf16 ? widened : slots;
        const RowsIn in = bf16 ? RowsIn(slots16.data()) : RowsIn(slots.data());
        std::vector<float> y(T * M), y_ref(T * M), dx = start, dx_ref = start, dgate(T * k), dgate_ref(T * k);
        for (int64_t t = 0; t < T; ++t)
          for (int64_t m = 0; m < M; ++m) {
            float acc = 0.0f, sum = dx_ref[t * M + m];
            for (int j = 0; j < k; ++j) {
              const int64_t p = pos[t * k + j];
              if (p < 0) continue;
              const float product = gate[t * k + j] * values[p * M + m];  // (two statements: no FMA)
              acc += product;
              sum += values[p * M + m];
            }
            y_ref[t * M + m] = acc;
            dx_ref[t * M + m] = sum;
          }
        for (int64_t i = 0; i < T * k; ++i)
          dgate_ref[i] = pos[i] < 0 ? 0.0f : dot(dy.data() + (i / k) * M, values.data() + pos[i] * M, M);
        combine_rows(in, gate.data(), T, M, k, pos.data(), y.data());
        dispatch_rows_backward(in, T, M, k, pos.data(), dx.data());
        combine_rows_backward_gate(dy.data(), in, T, M, k, pos.data(), dgate.data());
        const std::string where = "M " + std::to_string(M) + ", k " + std::to_string(k) + (bf16 ? ", bf16" : "");
        EXPECT_EQ(std::memcmp(y.data(), y_ref.data(), y.size() * sizeof(float)), 0) << where;
        EXPECT_EQ(std::memcmp(dx.data(), dx_ref.data(), dx.size() * sizeof(float)), 0) << where;
        EXPECT_EQ(std::memcmp(dgate.data(), dgate_ref.data(), dgate.size() * sizeof(float)), 0) << where;
      }
    }
}

}  // namespace
}  // namespace pm
