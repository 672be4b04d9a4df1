// Rotary position embedding (RoFormer, Su et al. 2021) in the rotate-half pairing of Llama and
// Hugging Face transformers: in each head of hd values, element i < hd/2 and element i + hd/2 turn
// together by the angle pos * theta^(-2i / hd):
//   y[i] = x[i] cos - x[i + hd/2] sin,   y[i + hd/2] = x[i + hd/2] cos + x[i] sin
// The backward turns the gradient back by the same angle (the rotation's transpose).
#pragma once

#include <cstdint>

namespace pm {

// Every head of hd values in columns [0, width) of x's rows (stride ld), in place: the queries and
// keys of a qkv buffer [q | k | v] (width: q's and k's, v untouched). Row t at position pos[t]
// (pos null: t % S), its angles' cosines and sines from cos, sin [positions, hd / 2]. inverse:
// turned back instead.
void rope_rotate(float* x, int64_t rows, int64_t ld, int64_t width, int64_t hd, const int64_t* pos, int64_t S,
                 const float* cos, const float* sin, bool inverse);

}  // namespace pm
