#include "kernels/cpu/elementwise.h"

#include <immintrin.h>

#include <array>
#include <cmath>
#include <cstring>
#include <tuple>
#include <utility>

#include "core/bf16_lanes.h"
#include "core/tensor.h"
#include "kernels/cpu/fast_math.h"
#include "kernels/cpu/gemm_internal.h"
#include "kernels/cpu/lanes.h"

namespace pm {

namespace {

// Elementwise loops run two vectors of 16 floats side by side: each function of fast_math.h is
// one long chain of dependent operations, and a single vector at a time left the core waiting on
// it. Both are loaded before either is stored (so an output may be one of the inputs, element
// for element); GCC interleaves the chains only with -fschedule-insns, which src/CMakeLists.txt
// sets for this file (gelu_backward 1.55 -> 1.02 ns per element on Zen 3 with four vectors of 8;
// two of 16 took GeLU and GeLU' from 1.0 to 0.68 ns per element on Zen 5, where four of 16 ran
// out of registers). On a CPU without AVX-512 GCC splits each vector in two: the same operations
// per lane. The tail runs one float at a time: the same operations per element either way.
using lanes::Lanes;
using lanes::LaneBits;
using lanes::LaneBf16;
using lanes::value_of;

template <size_t In>
[[gnu::always_inline]] inline std::array<Lanes, In> load_lanes(const std::array<const float*, In>& in, int64_t i) {
  std::array<Lanes, In> x;
  for (size_t j = 0; j < In; ++j) std::memcpy(&x[j], in[j] + i, sizeof(Lanes));
  return x;
}

// Stores of a vector or one value into floats, or into bf16 rounded to nearest even as
// float_to_bf16 rounds (core/tensor.h), lane by lane in registers: rounding through a row of
// floats on the stack stalled on store-to-load forwarding.

[[gnu::always_inline]] inline void store(float* p, const Lanes& v) { std::memcpy(p, &v, sizeof(Lanes)); }
[[gnu::always_inline]] inline void store(uint16_t* p, const Lanes& v) {
#if defined(__AVX512F__)
  __m512 x;  // one instruction where the CPU has AVX512_BF16 (core/bf16_lanes.h)
  std::memcpy(&x, &v, sizeof(Lanes));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), floats16_to_bf16(x));
#else
  LaneBits bits;
  std::memcpy(&bits, &v, sizeof(Lanes));
  const LaneBits nan = (LaneBits)((bits & 0x7f800000u) == 0x7f800000u) & (LaneBits)((bits & 0x007fffffu) != 0u);
  const LaneBits rounded = (bits + (0x7fffu + ((bits >> 16) & 1u))) >> 16;
  const LaneBf16 h = __builtin_convertvector((nan & 0x7fc0u) | (~nan & rounded), LaneBf16);
  std::memcpy(p, &h, sizeof(h));
#endif
}
[[gnu::always_inline]] inline void put(float* p, float v) { *p = v; }
[[gnu::always_inline]] inline void put(uint16_t* p, float v) { *p = float_to_bf16(v); }

// out[o][i] = f(in[0][i], in[1][i], ...)[o] for i < n, each out float or bf16; f takes and
// returns floats or vectors.
template <size_t In, typename... Out, typename F>
[[gnu::always_inline]] inline void map_lanes(int64_t n, std::array<const float*, In> in, std::tuple<Out*...> out,
                                             F f) {
  auto store_all = [&]<size_t... o>(int64_t i, const auto& y, std::index_sequence<o...>) {
    (store(std::get<o>(out) + i, y[o]), ...);
  };
  auto put_all = [&]<size_t... o>(int64_t i, const auto& y, std::index_sequence<o...>) {
    (put(std::get<o>(out) + i, y[o]), ...);
  };
  constexpr auto outs = std::index_sequence_for<Out...>{};
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    const auto x0 = load_lanes(in, i), x1 = load_lanes(in, i + 16);
    const auto y0 = std::apply(f, x0), y1 = std::apply(f, x1);
    store_all(i, y0, outs);
    store_all(i + 16, y1, outs);
  }
  for (; i < n; ++i) {
    std::array<float, In> x;
    for (size_t j = 0; j < In; ++j) x[j] = in[j][i];
    put_all(i, std::apply(f, x), outs);
  }
}

}  // namespace

void gelu_forward(const float* in, float* out, int64_t n) {
  map_lanes<1>(n, {in}, std::tuple{out}, [](auto x) { return std::array{gelu(x)}; });
}

void gelu_backward(const float* in, const float* grad_out, float* grad_in, int64_t n) {
  map_lanes<2>(n, {in, grad_out}, std::tuple{grad_in}, [](auto x, auto g) { return std::array{g * gelu_grad(x)}; });
}

namespace {

// GeLU of N vectors of 16 side by side into out, with SaveGrad GeLU' over x: all loaded before
// any is stored, as map_lanes does.
template <bool SaveGrad, size_t N, typename Out>
[[gnu::always_inline]] inline void gelu_vectors(const std::array<float*, N>& x, const std::array<Out*, N>& out) {
  std::array<Lanes, N> in, g, d;
#pragma GCC unroll 4
  for (size_t k = 0; k < N; ++k) std::memcpy(&in[k], x[k], sizeof(Lanes));
#pragma GCC unroll 4
  for (size_t k = 0; k < N; ++k) g[k] = gelu(in[k]);
  if constexpr (SaveGrad) {
#pragma GCC unroll 4
    for (size_t k = 0; k < N; ++k) d[k] = gelu_grad(in[k]);
  }
#pragma GCC unroll 4
  for (size_t k = 0; k < N; ++k) store(out[k], g[k]);
  if constexpr (SaveGrad) {
#pragma GCC unroll 4
    for (size_t k = 0; k < N; ++k) store(x[k], d[k]);
  }
}

// The tile's whole vectors of 16 three at a time, running on across its rows, then the rows' last
// values one by one. GeLU with GeLU' is one long chain of dependent operations per vector, and
// the GEMM's tiles are 64 values wide: two vectors at a time, row by row, left the core waiting on
// the chains. Three side by side fit the 32 vector registers (four measured the same). Each value's
// operations are those of gelu_forward: the same bits. One bf16 expert's forward (1025 rows, M 512,
// H 1024, bench/expert_parts.cpp, 6 interleaved runs, with fast_math's clamp in two instructions):
// 7.03 -> 6.83 ms median.
template <bool SaveGrad, typename Out>
void gelu_tile_lanes(float* x, int64_t ld, int64_t rows, int64_t n, Out* out, int64_t ld_out) {
  const int64_t width = n / 16 * 16, vectors = rows * (n / 16);
  int64_t row = 0, col = 0;  // the next vector's place
  auto next = [&](float*& xv, Out*& o) {
    xv = x + row * ld + col;
    o = out + row * ld_out + col;
    col += 16;
    if (col == width) col = 0, ++row;
  };
  int64_t v = 0;
  for (; v + 3 <= vectors; v += 3) {
    std::array<float*, 3> xs;
    std::array<Out*, 3> os;
    for (int k = 0; k < 3; ++k) next(xs[k], os[k]);
    gelu_vectors<SaveGrad>(xs, os);
  }
  for (; v < vectors; ++v) {
    std::array<float*, 1> xs;
    std::array<Out*, 1> os;
    next(xs[0], os[0]);
    gelu_vectors<SaveGrad>(xs, os);
  }
  for (int64_t i = 0; i < rows && width < n; ++i)
    for (int64_t j = width; j < n; ++j) {
      const float xv = x[i * ld + j];
      put(out + i * ld_out + j, gelu(xv));
      if constexpr (SaveGrad) x[i * ld + j] = gelu_grad(xv);
    }
}

}  // namespace

void gelu_forward_tile(float* x, int64_t ld, int64_t rows, int64_t n, float* out, uint16_t* out_bf16, int64_t ld_out,
                       bool save_grad) {
  auto run = [&](auto* o) {
    if (save_grad)
      gelu_tile_lanes<true>(x, ld, rows, n, o, ld_out);
    else
      gelu_tile_lanes<false>(x, ld, rows, n, o, ld_out);
  };
  if (out_bf16)
    run(out_bf16);
  else
    run(out);
}

void gelu_backward_by_saved_grad(const float* saved_grad, const float* grad_out, float* grad_in, int64_t n) {
  map_lanes<2>(n, {saved_grad, grad_out}, std::tuple{grad_in}, [](auto d, auto g) { return std::array{g * d}; });
}

namespace {

template <typename Out>
void swiglu_into(const float* hpre, Out* act, int64_t n) {
  map_lanes<2>(n, {hpre, hpre + n}, std::tuple{act}, [](auto g, auto v) { return std::array{g * sigmoid_approx(g) * v}; });
}

}  // namespace

void swiglu_forward(const float* hpre, float* act, int64_t n) { swiglu_into(hpre, act, n); }
void swiglu_forward(const float* hpre, uint16_t* act_bf16, int64_t n) { swiglu_into(hpre, act_bf16, n); }

void swiglu_backward(const float* g, const float* v, const float* dact, float* dg, float* dv, int64_t n) {
  // dact may be dv (the expert's backward computes it there): map_lanes reads before it writes
  map_lanes<3>(n, {dact, g, v}, std::tuple{dg, dv}, [](auto d, auto g, auto v) {
    const auto s = sigmoid_approx(g);
    return std::array{d * v * (s + g * s * (1.0f - s)), d * (g * s)};
  });
}

void swiglu_backward(const float* hpre, const float* dact, float* dhpre, int64_t n) {
  swiglu_backward(hpre, hpre + n, dact, dhpre, dhpre + n, n);
}

void softmax_rows(const float* logits, float* probs, int64_t rows, int64_t cols) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* x = logits + r * cols;
    float* p = probs + r * cols;
    float max = x[0];
    for (int64_t c = 1; c < cols; ++c) max = x[c] > max ? x[c] : max;
    float sum = 0;
    for (int64_t c = 0; c < cols; ++c) {
      p[c] = exp_approx(x[c] - max);
      sum += p[c];
    }
    float inv = 1.0f / sum;
    for (int64_t c = 0; c < cols; ++c) p[c] *= inv;
  }
}

void softmax_rows_backward(const float* probs, const float* dprobs, float* dlogits, int64_t rows,
                           int64_t cols) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* p = probs + r * cols;
    const float* dp = dprobs + r * cols;
    float* dl = dlogits + r * cols;
    float inner = 0;
    for (int64_t c = 0; c < cols; ++c) inner += p[c] * dp[c];
    for (int64_t c = 0; c < cols; ++c) dl[c] = p[c] * (dp[c] - inner);
  }
}

namespace {

// The k largest of one row by selection: pick the largest not yet taken, k times (O(k^2 cols)).
// Kept for rows holding a NaN, where "largest" is this loop's answer and no order is total.
void topk_row_by_selection(const float* v, int64_t cols, int k, int32_t* index, float* value) {
  for (int j = 0; j < k; ++j) {
    int32_t best = -1;
    for (int64_t c = 0; c < cols; ++c) {
      bool taken = false;
      for (int i = 0; i < j; ++i) taken |= index[i] == c;
      // strict '>' keeps the lower index on ties
      if (!taken && (best < 0 || v[c] > v[best])) best = static_cast<int32_t>(c);
    }
    index[j] = best;
    value[j] = v[best];
  }
}

// The same answer in one pass for rows without NaN: a list of the best k so far, largest first,
// that a value enters only when strictly larger than the list's last (an equal later value ranks
// after the earlier one: ties to the lower index) and in which it goes after every value it
// does not exceed. Why: the selection's k passes over 64 experts for top-8 took 3% of a
// DeepSeek-style layer; this takes one pass and a few insertions.
bool topk_row_by_insertion(const float* v, int64_t cols, int k, int32_t* index, float* value) {
  int have = 0;
  for (int64_t c = 0; c < cols; ++c) {
    const float x = v[c];
    if (x != x) return false;  // NaN: no total order, the caller selects
    if (have == k && !(x > value[k - 1])) continue;
    int at = have < k ? have++ : k - 1;
    for (; at > 0 && x > value[at - 1]; --at) {
      value[at] = value[at - 1];
      index[at] = index[at - 1];
    }
    value[at] = x;
    index[at] = static_cast<int32_t>(c);
  }
  return true;
}

// The insertion's list for 16 rows at once, one row per lane (AVX-512, k <= kMaxLanesK): each
// column's 16 values enter the 16 lists branch-free. A value x goes after every listed value it
// does not exceed (x > v[j] is false for a head of the list and true for the rest, the list being
// in order), the values from its place on move down one, the last drops out: for the first k
// columns the list grows by one instead. The same comparisons as the insertion, so the same lists,
// -0 and +0 equal in both. Why: the insertion's data-dependent branches mispredict on scores in
// random order: 550 ns a row for top-8 of 64 experts (1.1 ms of a 2048-token router pass, Xeon
// family 6 model 207), 1050 ns of 256; in lanes 88 and 417 (bench/topk_rows.cpp). Returns the
// lanes whose row holds a NaN (their lists are not the insertion's: the caller selects those rows).
constexpr int kMaxLanesK = 8;

template <int K>
__attribute__((target("avx512f"))) __mmask16 topk_16_rows(const float* values, int64_t cols, int32_t* index,
                                                           float* value) {
  const __m512i rows = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                          _mm512_set1_epi32(static_cast<int32_t>(cols)));
  __m512 v[K];
  __m512i at[K];
  for (int j = 0; j < K; ++j) v[j] = _mm512_setzero_ps(), at[j] = _mm512_setzero_si512();
  __mmask16 nan = 0;
  for (int64_t c = 0; c < cols; ++c) {
    const __m512 x = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), 0xffff, rows, values + c, 4);
    const __m512i column = _mm512_set1_epi32(static_cast<int32_t>(c));
    nan |= _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
    __mmask16 after[K];  // x > v[j]: x goes before v[j]
    for (int j = 0; j < K; ++j)
      after[j] = j < c ? _mm512_cmp_ps_mask(x, v[j], _CMP_GT_OQ) : (j == c ? __mmask16{0xffff} : __mmask16{0});
    for (int j = K - 1; j > 0; --j) {  // slot j: v[j], or v[j - 1] moved down, or x
      v[j] = _mm512_mask_blend_ps(after[j], v[j], _mm512_mask_blend_ps(after[j - 1], x, v[j - 1]));
      at[j] = _mm512_mask_blend_epi32(after[j], at[j], _mm512_mask_blend_epi32(after[j - 1], column, at[j - 1]));
    }
    v[0] = _mm512_mask_blend_ps(after[0], v[0], x);
    at[0] = _mm512_mask_blend_epi32(after[0], at[0], column);
  }
  alignas(64) float lane_value[K][16];
  alignas(64) int32_t lane_index[K][16];
  for (int j = 0; j < K; ++j) _mm512_store_ps(lane_value[j], v[j]), _mm512_store_si512(lane_index[j], at[j]);
  for (int r = 0; r < 16; ++r)
    for (int j = 0; j < K; ++j) value[r * K + j] = lane_value[j][r], index[r * K + j] = lane_index[j][r];
  return nan;
}

// topk_16_rows for a k known at run time (1 to kMaxLanesK).
__mmask16 topk_16_rows_any_k(const float* values, int64_t cols, int k, int32_t* index, float* value) {
  switch (k) {
    case 1: return topk_16_rows<1>(values, cols, index, value);
    case 2: return topk_16_rows<2>(values, cols, index, value);
    case 3: return topk_16_rows<3>(values, cols, index, value);
    case 4: return topk_16_rows<4>(values, cols, index, value);
    case 5: return topk_16_rows<5>(values, cols, index, value);
    case 6: return topk_16_rows<6>(values, cols, index, value);
    case 7: return topk_16_rows<7>(values, cols, index, value);
    default: return topk_16_rows<8>(values, cols, index, value);
  }
}

bool lanes_topk_here() {
  static const bool avx512 = __builtin_cpu_supports("avx512f");
  return avx512 && gemm_detail::isa_is_avx512();  // force_gemm_isa turns it off with the GEMM's kernels
}

}  // namespace

void topk_rows(const float* values, int64_t rows, int64_t cols, int k, int32_t* index, float* value) {
  PM_CHECK(k >= 1 && k <= cols, "top-{} of {} values", k, cols);
  // (cols bound: 16 rows' offsets are 32-bit gather indices)
  const bool lanes = lanes_topk_here() && k <= kMaxLanesK && cols <= (int64_t{1} << 26);
  int64_t r = 0;
  for (; lanes && r + 16 <= rows; r += 16) {
    const __mmask16 nan = topk_16_rows_any_k(values + r * cols, cols, k, index + r * k, value + r * k);
    for (int lane = 0; lane < 16; ++lane)
      if (nan >> lane & 1)
        topk_row_by_selection(values + (r + lane) * cols, cols, k, index + (r + lane) * k, value + (r + lane) * k);
  }
  for (; r < rows; ++r) {
    const float* v = values + r * cols;
    if (!topk_row_by_insertion(v, cols, k, index + r * k, value + r * k))
      topk_row_by_selection(v, cols, k, index + r * k, value + r * k);
  }
}

void fill_rows(float* rows, int64_t n, int64_t width, const float* bias) {
  for (int64_t r = 0; r < n; ++r) std::memcpy(rows + r * width, bias, width * sizeof(float));
}

void add_column_sums(const float* rows, int64_t n, int64_t width, float* sums) {
  for (int64_t r = 0; r < n; ++r) {
    const float* row = rows + r * width;
    for (int64_t c = 0; c < width; ++c) sums[c] += row[c];
  }
}

void gather_rows(const float* src, int64_t width, const int32_t* index, int64_t count, float* dst) {
  for (int64_t i = 0; i < count; ++i)
    std::memcpy(dst + i * width, src + static_cast<int64_t>(index[i]) * width, width * sizeof(float));
}

namespace {


template <typename X>
void axpy_of(float alpha, const X* x, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += alpha * value_of(x[i]);
}

template <typename Y>
float dot_of(const float* x, const Y* y, int64_t n) {
  // 16 independent partial sums (the compiler keeps them in one vector register), then a fixed
  // pairwise order: the same bits on every instruction set.
  float partial[16] = {};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    for (int l = 0; l < 16; ++l) partial[l] += x[i + l] * value_of(y[i + l]);
  for (int l = 0; i < n; ++i, ++l) partial[l] += x[i] * value_of(y[i]);
  for (int width = 8; width >= 1; width /= 2)
    for (int l = 0; l < width; ++l) partial[l] += partial[l + width];
  return partial[0];
}

}  // namespace

void axpy(float alpha, const float* x, float* y, int64_t n) { axpy_of(alpha, x, y, n); }
void axpy(float alpha, const uint16_t* x, float* y, int64_t n) { axpy_of(alpha, x, y, n); }
float dot(const float* x, const float* y, int64_t n) { return dot_of(x, y, n); }
float dot(const float* x, const uint16_t* y, int64_t n) { return dot_of(x, y, n); }

}  // namespace pm
