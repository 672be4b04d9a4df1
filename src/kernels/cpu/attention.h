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

// New tokens against a key/value cache (inference). qkv[B, 3D] holds B new tokens, token b of
// the sequence in cache row rows[b] (null: row b, one token per sequence) at position pos[b]; its
// key and value are written into k_cache [rows, D, S_max] (transposed: a key element's positions
// side by side) and v_cache [rows, S_max, D] at pos[b], then out[b] = softmax(q K^T / sqrt(hd)) V
// over positions 0..pos[b]. Tokens run in order, each writing before it reads: several tokens of one
// row (a prompt continuing a cached prefix) come in position order and see the ones before them.
// Every element is computed by the same operations in the same order as row pos[b] of
// attention_forward: the same bits as re-running the whole sequence.
void attention_decode(const float* qkv, float* k_cache, float* v_cache, const int64_t* pos, const int64_t* rows,
                      int64_t B, int64_t S_max, int64_t heads, int64_t hd, float* out);

// dout[B*S, D] -> dqkv[B*S, 3D] (overwritten).
void attention_backward(const float* qkv, const float* probs, const float* dout, int64_t B, int64_t S,
                        int64_t heads, int64_t hd, float* dqkv);

}  // namespace pm
