// Row and element kernels used by the MoE layer and the model: GeLU, softmax, top-k, bias, row
// gather/scatter. Plain loops over contiguous row-major data; shapes in the comments.
#pragma once

#include <cstdint>

namespace pm {

// out[n] = GeLU(in[n]), exact erf form.
void gelu_forward(const float* in, float* out, int64_t n);
// grad_in[n] = grad_out[n] * GeLU'(in[n]).
void gelu_backward(const float* in, const float* grad_out, float* grad_in, int64_t n);
// gelu_forward on a tile of rows x n values of x (rows ld apart), the GeLU into out (floats) or
// out_bf16 (rounded to nearest even, as float_to_bf16), rows ld_out apart: the bits of the
// row-by-row calls. With save_grad, x is overwritten by GeLU'(x) (what the backward multiplies
// by; the erf both need is computed once); then grad_in = grad_out * that saved GeLU'(x) gives
// the bits of gelu_backward.
void gelu_forward_tile(float* x, int64_t ld, int64_t rows, int64_t n, float* out, uint16_t* out_bf16, int64_t ld_out,
                       bool save_grad);
void gelu_backward_by_saved_grad(const float* saved_grad, const float* grad_out, float* grad_in, int64_t n);

// SwiGLU on one row of a pre-activation [g | v] (2n values): act[n] = SiLU(g) * v, SiLU(g) = g sigmoid(g).
void swiglu_forward(const float* hpre, float* act, int64_t n);
// The same rounded into bf16 (to nearest even, as float_to_bf16).
void swiglu_forward(const float* hpre, uint16_t* act_bf16, int64_t n);
// From dact[n]: dhpre[2n] = [dact * v * SiLU'(g) | dact * SiLU(g)], SiLU'(g) = s + g s (1 - s).
// dact may be dhpre + n.
void swiglu_backward(const float* hpre, const float* dact, float* dhpre, int64_t n);
// The same on n columns of the halves wherever they sit: g and v the pre-activation's, dg and dv
// the gradient's (dact may be dv). A GEMM's tile epilogue runs it on a tile's columns of each row.
void swiglu_backward(const float* g, const float* v, const float* dact, float* dg, float* dv, int64_t n);

// probs[rows, cols] = softmax(logits) along each row (max-subtracted).
void softmax_rows(const float* logits, float* probs, int64_t rows, int64_t cols);
// dlogits = probs * (dprobs - sum(probs * dprobs)) along each row.
void softmax_rows_backward(const float* probs, const float* dprobs, float* dlogits, int64_t rows,
                           int64_t cols);

// For each row of values[rows, cols]: the k largest, largest first, ties to the lower index.
// index[rows, k], value[rows, k].
void topk_rows(const float* values, int64_t rows, int64_t cols, int k, int32_t* index, float* value);

// rows[n, width] = bias[width] in every row.
void fill_rows(float* rows, int64_t n, int64_t width, const float* bias);
// sums[width] += sum over the n rows of rows[n, width], in row order.
void add_column_sums(const float* rows, int64_t n, int64_t width, float* sums);

// dst[i, :] = src[index[i], :] for i < count.
void gather_rows(const float* src, int64_t width, const int32_t* index, int64_t count, float* dst);

// y[n] += alpha * x[n]
void axpy(float alpha, const float* x, float* y, int64_t n);
// The same with x's values bf16, widened as they are read (the bits of widening them first).
void axpy(float alpha, const uint16_t* x, float* y, int64_t n);
// sum_i x[i] * y[i] in a fixed order (16 lanes, then pairwise).
float dot(const float* x, const float* y, int64_t n);
float dot(const float* x, const uint16_t* y, int64_t n);  // y bf16, widened as it is read

}  // namespace pm
