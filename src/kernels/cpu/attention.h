// Causal multi-head self-attention core: for each sequence and head,
// O = softmax(Q K^T / sqrt(hd) + causal mask) V, with Q, K, V taken from a packed qkv buffer.
//
// Layouts: qkv[B*S, 3*D] holds [q | k | v] per token, each D = heads * hd wide, head h at
// columns [h*hd, (h+1)*hd). out[B*S, D] has the same head layout. probs[B, heads, S, S] keeps the
// attention weights for backward (upper triangle zero).
#pragma once

#include <cstdint>

namespace pm {

void attention_forward(const float* qkv, int64_t B, int64_t S, int64_t heads, int64_t hd, float* probs, float* out);

// One new token per sequence against a key/value cache (inference). qkv[B, 3D] holds each
// sequence's new token; its key and value are written into k_cache [B, D, S_max] (transposed: a
// key element's positions side by side) and v_cache [B, S_max, D] at position pos[b], then out[B, D] = softmax(q K^T / sqrt(hd)) V over positions 0..pos[b]. Every
// element is computed by the same operations in the same order as row pos[b] of
// attention_forward: the same bits as re-running the whole sequence.
void attention_decode(const float* qkv, float* k_cache, float* v_cache, const int64_t* pos, int64_t B, int64_t S_max,
                      int64_t heads, int64_t hd, float* out);

// dout[B*S, D] -> dqkv[B*S, 3D] (overwritten).
void attention_backward(const float* qkv, const float* probs, const float* dout, int64_t B, int64_t S,
                        int64_t heads, int64_t hd, float* dqkv);

}  // namespace pm
