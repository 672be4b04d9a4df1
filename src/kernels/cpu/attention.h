// Causal multi-head self-attention core: for each sequence and head,
// O = softmax(Q K^T / sqrt(hd) + causal mask) V, with Q, K, V taken from a packed qkv buffer.
// Grouped-query attention (Ainslie et al. 2023; Llama 2 70B, Mixtral, Qwen): kv_heads key/value
// heads, each shared by heads / kv_heads consecutive query heads; kv_heads == heads: multi-head.
//
// Layouts: qkv[B*S, D + 2 Dkv] holds [q | k | v] per token, q D = heads * hd wide, k and v each
// Dkv = kv_heads * hd, head h at columns [h*hd, (h+1)*hd) of its part. out[B*S, D] has q's head
// layout. probs[B, heads, S, S] keeps the attention weights for backward (upper triangle zero).
#pragma once

#include <cstdint>

namespace pm {

void attention_forward(const float* qkv, int64_t B, int64_t S, int64_t heads, int64_t kv_heads, int64_t hd, float* probs,
                       float* out);

// New tokens against a key/value cache (inference). qkv[B, D + 2 Dkv] holds B new tokens, token b
// of the sequence in cache row rows[b] (null: row b, one token per sequence) at position pos[b];
// its key and value are written into k_cache [rows, Dkv, S_max] (transposed: a key element's
// positions side by side) and v_cache [rows, S_max, Dkv] at pos[b], then out[b] = softmax(q K^T / sqrt(hd)) V
// over positions 0..pos[b]. Tokens run in order, each writing before it reads: several tokens of one
// row (a prompt continuing a cached prefix) come in position order and see the ones before them.
// Every element is computed by the same operations in the same order as row pos[b] of
// attention_forward: the same bits as re-running the whole sequence.
void attention_decode(const float* qkv, float* k_cache, float* v_cache, const int64_t* pos, const int64_t* rows,
                      int64_t B, int64_t S_max, int64_t heads, int64_t kv_heads, int64_t hd, float* out);

// dout[B*S, D] -> dqkv[B*S, D + 2 Dkv] (overwritten; a shared key/value head's gradient is the sum
// over its query heads, in head order).
void attention_backward(const float* qkv, const float* probs, const float* dout, int64_t B, int64_t S,
                        int64_t heads, int64_t kv_heads, int64_t hd, float* dqkv);

}  // namespace pm
