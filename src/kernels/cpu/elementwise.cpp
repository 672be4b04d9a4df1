#include "kernels/cpu/elementwise.h"

#include <cmath>
#include <cstring>

#include "kernels/cpu/fast_math.h"

namespace pm {

void gelu_forward(const float* in, float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = gelu(in[i]);
}

void gelu_backward(const float* in, const float* grad_out, float* grad_in, int64_t n) {
  for (int64_t i = 0; i < n; ++i) grad_in[i] = grad_out[i] * gelu_grad(in[i]);
}

void swiglu_forward(const float* hpre, float* act, int64_t n) {
  const float* v = hpre + n;
  for (int64_t i = 0; i < n; ++i) act[i] = hpre[i] * sigmoid_approx(hpre[i]) * v[i];
}

void swiglu_backward(const float* hpre, const float* dact, float* dhpre, int64_t n) {
  const float* v = hpre + n;
  for (int64_t i = 0; i < n; ++i) {
    // dact may be dhpre + n (the expert's backward computes it there): read before writing
    const float d = dact[i], g = hpre[i], s = sigmoid_approx(g);
    dhpre[i] = d * v[i] * (s + g * s * (1.0f - s));
    dhpre[n + i] = d * (g * s);
  }
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

void topk_rows(const float* values, int64_t rows, int64_t cols, int k, int32_t* index, float* value) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* v = values + r * cols;
    for (int j = 0; j < k; ++j) {
      int32_t best = -1;
      for (int64_t c = 0; c < cols; ++c) {
        bool taken = false;
        for (int i = 0; i < j; ++i) taken |= index[r * k + i] == c;
        // strict '>' keeps the lower index on ties
        if (!taken && (best < 0 || v[c] > v[best])) best = static_cast<int32_t>(c);
      }
      index[r * k + j] = best;
      value[r * k + j] = v[best];
    }
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

void axpy(float alpha, const float* x, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += alpha * x[i];
}

float dot(const float* x, const float* y, int64_t n) {
  // 16 independent partial sums (the compiler keeps them in one vector register), then a fixed
  // pairwise order: the same bits on every instruction set.
  float partial[16] = {};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    for (int l = 0; l < 16; ++l) partial[l] += x[i + l] * y[i + l];
  for (int l = 0; i < n; ++i, ++l) partial[l] += x[i] * y[i];
  for (int width = 8; width >= 1; width /= 2)
    for (int l = 0; l < width; ++l) partial[l] += partial[l + width];
  return partial[0];
}

}  // namespace pm
