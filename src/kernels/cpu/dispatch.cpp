#include "kernels/cpu/dispatch.h"

#include <algorithm>
#include <cstring>
#include <vector>

#include "core/tensor.h"
#include "kernels/cpu/elementwise.h"
#include "kernels/cpu/fetch_ahead.h"
#include "kernels/cpu/lanes.h"

namespace pm {
namespace {

// fn(first row) with slots' rows as floats or bf16 (the kernels widen bf16 as they read it).
template <typename Fn>
auto with_slots(RowsIn slots, Fn&& fn) {
  return slots.f32 ? fn(slots.f32) : fn(slots.bf16);
}

// Writes M floats into row `row` of slots (rounded to bf16 there when slots are bf16).
void store_row(const float* values, RowsOut slots, int64_t row, int64_t M) {
  if (slots.f32)
    std::memcpy(slots.f32 + row * M, values, M * sizeof(float));
  else
    floats_to_bf16(values, slots.bf16 + row * M, M);
}

// The gathers below sum a token's k slot rows in registers, 64 columns at a time, where they
// went through the token's row in memory once per choice (an axpy or a dot per choice). Each
// column's sum is the same chain of operations in the same order (choice 0 first, a multiply
// then an add each: we build with -ffp-contract=off), so the same bits. A DeepSeek-style layer's
// token has 8 choices: at top-8 of 64 these kernels take 0.5-0.96x the per-choice loops' time
// (bench/choice_rows.cpp; at top-2, 0.64-1.06x).
using lanes::Lanes;
using lanes::load16;
using lanes::value_of;
constexpr int64_t kLanes = 16, kBlock = 64;  // columns per vector; per block of four vectors

// The next token's rows at columns [m, m + kBlock), fetched while this token's are read: a
// token's k rows lie anywhere in the slots (rows an all-to-all wrote), and each new token began
// with k misses the hardware prefetcher had no stream for. next: the next token's positions, or
// null for the last. From evicted rows (bench/choice_rows.cpp, CHOICE_ROWS_COLD=1, 6 alternating
// runs): top-8 of 64 in bf16, the combine 0.79x and the dispatch's backward 0.85x the time, in
// fp32 0.95-0.96x; the gate gradient 0.96-0.98x; top-2 of 8 the same within the noise. Fetching
// all k rows whole before the gate gradient's first column was slower (1.16x): spread out.
template <typename X>
inline void fetch_next_rows(const X* slots, int64_t M, int k, const int64_t* next, int64_t m) {
  constexpr int64_t kPerLine = 64 / sizeof(X);
  for (int j = 0; next && j < k; ++j)
    if (next[j] >= 0)
      for (int64_t c = 0; c < kBlock; c += kPerLine) __builtin_prefetch(slots + next[j] * M + m + c);
}

// out[m] = init[m] (or 0) + sum over kept choices j, in order, of scale[j] * rows_j[m].
template <typename X>
void sum_choice_rows(const X* slots, int64_t M, int k, const int64_t* position, const float* scale, const float* init,
                     float* out, const int64_t* next = nullptr) {
  const int64_t blocked = M / kBlock * kBlock;
  for (int64_t m = 0; m < blocked; m += kBlock) {
    fetch_next_rows(slots, M, k, next, m);
    Lanes a[4] = {};
    if (init)
      for (int v = 0; v < 4; ++v) a[v] = load16(init + m + v * kLanes);
    for (int j = 0; j < k; ++j) {
      if (position[j] < 0) continue;
      const X* row = slots + position[j] * M + m;
      const float s = scale[j];
      for (int v = 0; v < 4; ++v) a[v] += s * load16(row + v * kLanes);
    }
    for (int v = 0; v < 4; ++v) std::memcpy(out + m + v * kLanes, &a[v], sizeof(Lanes));
  }
  for (int64_t m = blocked; m < M; ++m) {
    float a = init ? init[m] : 0.0f;
    for (int j = 0; j < k; ++j)
      if (position[j] >= 0) a += scale[j] * value_of(slots[position[j] * M + m]);
    out[m] = a;
  }
}

// dgate[j] = dot(dy, rows_j) for the kept choices (0 for the dropped), each as pm::dot computes
// it: 16 partial sums over the columns in order, then a fixed pairwise order. Up to 8 choices at
// once, dy read once for them.
template <typename X>
void dot_choice_rows(const float* dy, const X* slots, int64_t M, int k, const int64_t* position, float* dgate,
                     const int64_t* next = nullptr) {
  constexpr int kGroup = 8;
  const int64_t vectors = M / kLanes * kLanes;
  for (int j0 = 0; j0 < k; j0 += kGroup) {
    const int n = std::min(kGroup, k - j0);
    const X* rows[kGroup];
    int which[kGroup];  // the choice of each kept row
    int kept = 0;
    for (int j = j0; j < j0 + n; ++j) {
      if (position[j] < 0) {
        dgate[j] = 0.0f;
        continue;
      }
      rows[kept] = slots + position[j] * M;
      which[kept++] = j;
    }
    Lanes acc[kGroup] = {};
    for (int64_t m = 0; m < vectors; m += kLanes) {
      if (j0 == 0 && m % kBlock == 0 && m + kBlock <= M) fetch_next_rows(slots, M, k, next, m);  // once, spread out
      const Lanes x = load16(dy + m);
      for (int r = 0; r < kept; ++r) acc[r] += x * load16(rows[r] + m);
    }
    for (int r = 0; r < kept; ++r) {
      float partial[kLanes];
      std::memcpy(partial, &acc[r], sizeof(partial));
      for (int64_t m = vectors, l = 0; m < M; ++m, ++l) partial[l] += dy[m] * value_of(rows[r][m]);
      for (int width = kLanes / 2; width >= 1; width /= 2)
        for (int l = 0; l < width; ++l) partial[l] += partial[l + width];
      dgate[which[r]] = partial[0];
    }
  }
}

}  // namespace

void dispatch_rows(const float* x, int64_t T, int64_t M, int k, const int64_t* position, RowsOut slots) {
  for (int64_t i = 0; i < T * k; ++i)
    if (position[i] >= 0) store_row(x + (i / k) * M, slots, position[i], M);
}

void combine_rows(RowsIn slots, const float* gate, int64_t T, int64_t M, int k, const int64_t* position, float* y) {
  for (int64_t t = 0; t < T; ++t)
    with_slots(slots,
               [&](auto rows) {
                 sum_choice_rows(rows, M, k, position + t * k, gate + t * k, nullptr, y + t * M,
                                 t + 1 < T ? position + (t + 1) * k : nullptr);
               });
}

void dispatch_rows_backward(RowsIn dslots, int64_t T, int64_t M, int k, const int64_t* position, float* dx) {
  const std::vector<float> ones(k, 1.0f);  // 1 * v is v: the old axpy(1, ...)'s bits
  for (int64_t t = 0; t < T; ++t)
    with_slots(dslots, [&](auto rows) {
      sum_choice_rows(rows, M, k, position + t * k, ones.data(), dx + t * M, dx + t * M,
                      t + 1 < T ? position + (t + 1) * k : nullptr);
    });
}

namespace {

// dst row `to` = g * row: one product per value, rounded to bf16 in the same pass for bf16 rows. The
// combine's backward and the deduplicated dispatch's expert side both write gate * dy this way
// (the values its experts read as DyRows::scaled, kernels/backend.h, where they read dy in place).
void scale_row(float g, const float* row, RowsOut dst, int64_t to, int64_t M) {
  if (dst.f32) {
    float* out = dst.f32 + to * M;
    for (int64_t m = 0; m < M; ++m) out[m] = g * row[m];
  } else {
    scaled_floats_to_bf16(g, row, dst.bf16 + to * M, M);
  }
}

}  // namespace

void combine_rows_backward_slots(const float* dy, const float* gate, int64_t T, int64_t M, int k,
                                 const int64_t* position, RowsOut dslots) {
  for (int64_t i = 0; i < T * k; ++i) {
    if (position[i] < 0) continue;
    scale_row(gate[i], dy + (i / k) * M, dslots, position[i], M);
  }
}

void copy_rows_scaled(const float* src, RowsOut dst, int64_t M, const std::vector<RowRun>& runs, const float* dst_scale) {
  // The source rows are an expert's tokens' rows among every token's (runs of a row or two): each
  // is fetched two rows ahead, where the hardware prefetcher started over at each one.
  constexpr std::size_t kAhead = 2;
  std::vector<std::pair<int64_t, int64_t>> rows;  // (source row, destination row)
  for (const RowRun& run : runs)
    for (int64_t i = 0; i < run.rows; ++i) rows.emplace_back(run.src_row + i, run.dst_row + i);
  for (std::size_t j = 0; j < rows.size(); ++j) {
    if (j + kAhead < rows.size())
      for (int64_t m = 0; m < M; m += 16) fetch_into_l1(src + rows[j + kAhead].first * M + m);
    const auto [from, to] = rows[j];
    scale_row(dst_scale[to], src + from * M, dst, to, M);
  }
}

void combine_rows_backward_gate(const float* dy, RowsIn slots, int64_t T, int64_t M, int k, const int64_t* position,
                                float* dgate) {
  for (int64_t t = 0; t < T; ++t)
    with_slots(slots, [&](auto rows) {
      dot_choice_rows(dy + t * M, rows, M, k, position + t * k, dgate + t * k, t + 1 < T ? position + (t + 1) * k : nullptr);
    });
}

}  // namespace pm
