#include "kernels/cpu/attention.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "core/transpose.h"
#include "kernels/cpu/chain_product.h"
#include "kernels/cpu/fast_math.h"
#include "kernels/cpu/lanes.h"

namespace pm {

namespace {

using lanes::Lanes;

// Query rows per causal block: chain_product's tile height. A block of rows sees positions
// [0, end), end its last row's position + 1: the products run over those, not the whole sequence.
constexpr int64_t kBlock = 6;

// dst[k * S + j] = src[j * ld + k]: a head's keys or values, [S, hd] in qkv, as [hd, S], so that a
// query's scores against consecutive positions come from one row of it (in 16 x 16 blocks: stored
// one value per row of dst, S floats apart, the transposition took a quarter of the forward's time
// beside its products).
void transpose_head(const float* src, int64_t ld, int64_t S, int64_t hd, float* dst) {
  transpose(src, ld, S, hd, dst, S);
}

// max_j x[j] * scale over j < n: a maximum is the same in any order (16 lanes, then the tail).
float scaled_max(const float* x, int64_t n, float scale) {
  float m = x[0] * scale;
  int64_t j = 0;
  if (n >= 16) {
    Lanes mv = lanes::load16(x) * scale;
    for (j = 16; j + 16 <= n; j += 16) {
      const Lanes v = lanes::load16(x + j) * scale;
      mv = mv > v ? mv : v;
    }
    for (int l = 0; l < 16; ++l) m = std::max(m, mv[l]);
  }
  for (; j < n; ++j) m = std::max(m, x[j] * scale);
  return m;
}

// x[j] = exp(x[j] * scale - max) for j < n, 16 at a time: the scalar operations lane by lane.
void scaled_exps(float* x, int64_t n, float scale, float max) {
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    Lanes v = lanes::load16(x + j);
    v = exp_approx(v * scale - max);
    std::memcpy(x + j, &v, sizeof(v));
  }
  for (; j < n; ++j) x[j] = exp_approx(x[j] * scale - max);
}

// acc[r] += x[r][j] (y null) or x[r][j] * y[r][j] for j in [from, to), rows of x and y S apart,
// each row's chain in order of j. The R chains advance side by side in registers: one at a time,
// or kept in memory, each add waited on the one before it.
template <int R>
void add_rows_in_order(const float* x, const float* y, int64_t S, int64_t from, int64_t to, float* acc) {
  float a[R];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) a[r] = acc[r];
  for (int64_t j = from; j < to; ++j)
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) a[r] += y ? x[r * S + j] * y[r * S + j] : x[r * S + j];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) acc[r] = a[r];
}

// The same for any number of rows up to kBlock; then row r alone over (i0, i0 + r], the positions
// the rows before it do not see.
void add_causal_rows(const float* x, const float* y, int64_t S, int64_t i0, int64_t rows, float* acc) {
  if (rows == kBlock)
    add_rows_in_order<kBlock>(x, y, S, 0, i0 + 1, acc);
  else
    for (int64_t r = 0; r < rows; ++r)
      add_rows_in_order<1>(x + r * S, y ? y + r * S : nullptr, S, 0, i0 + 1, acc + r);
  for (int64_t r = 1; r < rows; ++r)
    add_rows_in_order<1>(x + r * S, y ? y + r * S : nullptr, S, i0 + 1, i0 + r + 1, acc + r);
}

// The causal softmax of a block's rows of scores (row r is position i0 + r, rows S apart): row i
// over positions 0..i, zeros after them, each row's sum over its positions in order.
void softmax_block(float* p, int64_t S, int64_t i0, int64_t rows, float scale) {
  float sum[kBlock] = {};
  for (int64_t r = 0; r < rows; ++r) {
    float* row = p + r * S;
    const int64_t n = i0 + r + 1;
    scaled_exps(row, n, scale, scaled_max(row, n, scale));
  }
  add_causal_rows(p, nullptr, S, i0, rows, sum);
  for (int64_t r = 0; r < rows; ++r) {
    float* row = p + r * S;
    const int64_t n = i0 + r + 1;
    const float inv = 1.0f / sum[r];
    for (int64_t j = 0; j < n; ++j) row[j] *= inv;
    std::fill(row + n, row + S, 0.0f);  // causal: no looking ahead
  }
}

// The softmax's backward over a block's rows: ds (dP on entry, rows S apart) becomes
// p (ds - <p, ds>) scale over positions 0..i, zeros from i + 1 to `end` (what the block's products
// read), each inner product over the row's positions in order.
void softmax_backward_block(const float* p, float* ds, int64_t S, int64_t i0, int64_t rows, int64_t end, float scale) {
  float inner[kBlock] = {};
  add_causal_rows(p, ds, S, i0, rows, inner);
  for (int64_t r = 0; r < rows; ++r) {
    const float* pr = p + r * S;
    float* row = ds + r * S;
    const int64_t n = i0 + r + 1;
    for (int64_t j = 0; j < n; ++j) row[j] = pr[j] * (row[j] - inner[r]) * scale;
    std::fill(row + n, row + end, 0.0f);
  }
}

}  // namespace

// Per (sequence, head), block by block of query rows: scores against the positions the block sees,
// its softmax, then its rows of P V over those positions (chain_product: gemm's chains, the
// positions past a row's own, zeros, adding nothing). Query head h reads key/value head h / group.
void attention_forward(const float* qkv, int64_t B, int64_t S, int64_t heads, int64_t kv_heads, int64_t hd,
                       float* probs, float* out) {
  const int64_t D = heads * hd, Dkv = kv_heads * hd, ld = D + 2 * Dkv, group = heads / kv_heads;
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  thread_local std::vector<float> keys_t;  // [hd, S]: this key head's keys
  keys_t.resize(hd * S);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < heads; ++h) {
      const float* q = qkv + b * S * ld + h * hd;
      const float* k = qkv + b * S * ld + D + (h / group) * hd;
      const float* v = k + Dkv;
      float* p = probs + (b * heads + h) * S * S;
      if (h % group == 0) transpose_head(k, ld, S, hd, keys_t.data());
      for (int64_t i0 = 0; i0 < S; i0 += kBlock) {
        const int64_t rows = std::min(kBlock, S - i0), end = i0 + rows;
        float* block = p + i0 * S;
        chain_product(rows, end, hd, {q + i0 * ld, ld, 1}, keys_t.data(), S, block, S, false);  // scores
        softmax_block(block, S, i0, rows, scale);
        chain_product(rows, hd, end, {block, S, 1}, v, ld, out + (b * S + i0) * D + h * hd, D, false);  // P V
      }
    }
}

void attention_decode(const float* qkv, float* k_cache, float* v_cache, const int64_t* pos, const int64_t* rows,
                      int64_t B, int64_t S_max, int64_t heads, int64_t kv_heads, int64_t hd, float* out) {
  const int64_t D = heads * hd, Dkv = kv_heads * hd, ld = D + 2 * Dkv, group = heads / kv_heads;
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  std::vector<float> row(S_max), acc(hd);
  for (int64_t b = 0; b < B; ++b) {
    const int64_t t = pos[b];
    const int64_t cache_row = rows ? rows[b] : b;
    float* kc = k_cache + cache_row * S_max * Dkv;
    float* vc = v_cache + cache_row * S_max * Dkv;
    for (int64_t i = 0; i < Dkv; ++i)
      kc[i * S_max + t] = qkv[b * ld + D + i], vc[t * Dkv + i] = qkv[b * ld + D + Dkv + i];
    for (int64_t h = 0; h < heads; ++h) {
      const float* q = qkv + b * ld + h * hd;
      const float* kh = kc + (h / group) * hd * S_max;  // this head's keys, [hd, S_max]
      // scores: the GEMM's chain, one fused multiply-add per k in order from zero. The keys are kept
      // transposed, so that consecutive positions lie side by side: 32, then 8 positions at a time
      // advance together in vector lanes, each lane its own chain
      int64_t j = 0;
      for (; j + 32 <= t + 1; j += 32) {
        float c[32] = {};
        for (int64_t k = 0; k < hd; ++k)
          for (int u = 0; u < 32; ++u) c[u] = std::fma(q[k], kh[k * S_max + j + u], c[u]);
        for (int u = 0; u < 32; ++u) row[j + u] = c[u];
      }
      for (; j + 8 <= t + 1; j += 8) {
        float c[8] = {};
        for (int64_t k = 0; k < hd; ++k)
          for (int u = 0; u < 8; ++u) c[u] = std::fma(q[k], kh[k * S_max + j + u], c[u]);
        for (int u = 0; u < 8; ++u) row[j + u] = c[u];
      }
      for (; j <= t; ++j) {
        float c = 0.0f;
        for (int64_t k = 0; k < hd; ++k) c = std::fma(q[k], kh[k * S_max + j], c);
        row[j] = c;
      }
      // the forward's softmax of row t (softmax_block): its maximum, exps, then their sum in order
      scaled_exps(row.data(), t + 1, scale, scaled_max(row.data(), t + 1, scale));
      float sum = 0;
      for (int64_t j = 0; j <= t; ++j) sum += row[j];
      const float inv = 1.0f / sum;
      for (int64_t j = 0; j <= t; ++j) row[j] *= inv;
      // out = P V: the GEMM's chain over positions in order (the causal zeros after t add nothing),
      // every output element's chain advanced one position at a time (vectorised over d)
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (int64_t p = 0; p <= t; ++p) {
        const float w = row[p], *v = vc + p * Dkv + (h / group) * hd;
        for (int64_t d = 0; d < hd; ++d) acc[d] = std::fma(w, v[d], acc[d]);
      }
      std::copy(acc.begin(), acc.end(), out + b * D + h * hd);
    }
  }
}

// The products of the forward's blocks in turn: dV = P^T dO and dK = dS^T Q by blocks of their
// rows (a position's gradient gathers the queries at and after it: depths from the block's first
// row on), dP = dO V^T and dQ = dS K by blocks of query rows (positions before the block's end).
void attention_backward(const float* qkv, const float* probs, const float* dout, int64_t B, int64_t S,
                        int64_t heads, int64_t kv_heads, int64_t hd, float* dqkv) {
  const int64_t D = heads * hd, Dkv = kv_heads * hd, ld = D + 2 * Dkv, group = heads / kv_heads;
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  thread_local std::vector<float> ds, values_t;  // [S, S] dS; [hd, S] this value head's values
  ds.resize(S * S);
  values_t.resize(hd * S);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < heads; ++h) {
      const float* q = qkv + b * S * ld + h * hd;
      const float* k = qkv + b * S * ld + D + (h / group) * hd;
      const float* v = k + Dkv;
      const float* p = probs + (b * heads + h) * S * S;
      const float* dO = dout + b * S * D + h * hd;
      float* dq = dqkv + b * S * ld + h * hd;
      float* dk = dqkv + b * S * ld + D + (h / group) * hd;
      float* dv = dk + Dkv;
      // a key/value head's gradients: the sum over its group's query heads, in head order
      const bool into = h % group != 0;
      if (!into) transpose_head(v, ld, S, hd, values_t.data());
      for (int64_t j0 = 0; j0 < S; j0 += kBlock) {  // dV = P^T dO
        const int64_t rows = std::min(kBlock, S - j0);
        chain_product(rows, hd, S - j0, {p + j0 * S + j0, 1, S}, dO + j0 * D, D, dv + j0 * ld, ld, into);
      }
      for (int64_t i0 = 0; i0 < S; i0 += kBlock) {
        const int64_t rows = std::min(kBlock, S - i0), end = i0 + rows;
        float* block = ds.data() + i0 * S;
        chain_product(rows, end, hd, {dO + i0 * D, D, 1}, values_t.data(), S, block, S, false);  // dP = dO V^T
        softmax_backward_block(p + i0 * S, block, S, i0, rows, end, scale);
        chain_product(rows, hd, end, {block, S, 1}, k, ld, dq + i0 * ld, ld, false);  // dQ = dS K
      }
      for (int64_t j0 = 0; j0 < S; j0 += kBlock) {  // dK = dS^T Q
        const int64_t rows = std::min(kBlock, S - j0);
        chain_product(rows, hd, S - j0, {ds.data() + j0 * S + j0, 1, S}, q + j0 * ld, ld, dk + j0 * ld, ld, into);
      }
    }
}

}  // namespace pm
