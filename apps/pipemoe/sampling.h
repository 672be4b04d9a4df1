// How the next token is drawn from a position's logits: shared by `generate` and `serve`, so that
// a served request gives the text `generate` gives for the same prompt, settings and seed.
#pragma once

#include <cstdint>

#include "core/rng.h"

namespace pm::cli {

struct Sampling {
  double temperature = 0.8;  // 0: greedy
  int top_k = 40;
  double top_p = 1.0;  // nucleus: the fewest most likely tokens whose probability reaches p
};

// Throws a usage error naming the flag (or, with `json_names`, the request field) that is out of range.
void check_sampling(const Sampling& s, bool json_names = false);

// The next token from logits[V]: greedy at temperature 0, else drawn among the top-k, then the
// top-p of those, at the temperature. The same numbers and generator state give the same token.
int32_t sample_next(const float* logits, int64_t V, const Sampling& s, Rng& rng);

// The generator of sequence `row` of a batch started with `seed` (generate's rows; serve's
// requests are row 0 of their own).
Rng sequence_rng(uint64_t seed, int64_t row);

}  // namespace pm::cli
