// How the next token is drawn from a position's logits: shared by `generate` and `serve`, so that
// a served request gives the text `generate` gives for the same prompt, settings and seed.
#pragma once

#include <cstdint>
#include <utility>
#include <vector>

#include "core/rng.h"

namespace pm::cli {

struct Sampling {
  double temperature = 0.8;  // 0: greedy
  int top_k = 40;
  double top_p = 1.0;  // nucleus: the fewest most likely tokens whose probability reaches p
  double min_p = 0;    // only the tokens at least min_p times as likely as the most likely one
  // OpenAI's penalties: a token generated c times so far has c * frequency_penalty + (c > 0) *
  // presence_penalty taken from its logit (the prompt's tokens do not count)
  double presence_penalty = 0, frequency_penalty = 0;
  std::vector<std::pair<int32_t, double>> logit_bias;  // added to these tokens' logits
  bool adjusts_logits() const { return presence_penalty != 0 || frequency_penalty != 0 || !logit_bias.empty(); }
};

// Throws a usage error naming the flag (or, with `json_names`, the request field) that is out of
// range; V: the vocabulary the logit_bias ids must fall in.
void check_sampling(const Sampling& s, bool json_names = false, int64_t V = 0);

// The next token from logits[V], after the penalties for the tokens `generated` so far and the
// logit bias: greedy at temperature 0, else drawn among the top-k, then those min_p allows, then
// the top-p of those, at the temperature. The same numbers and generator state give the same token.
int32_t sample_next(const float* logits, int64_t V, const Sampling& s, Rng& rng, const std::vector<int32_t>& generated = {});

// The model's log-probability of `token` at a position (the log-softmax of the raw logits: no
// temperature, top-k or top-p, whatever the sampling) and the `top` most likely tokens with
// theirs, most likely first (ties: the smaller id).
struct TokenLogprobs {
  double logprob = 0;
  std::vector<std::pair<int32_t, double>> top;
};
TokenLogprobs token_logprobs(const float* logits, int64_t V, int32_t token, int top);

// The generator of sequence `row` of a batch started with `seed` (generate's rows; serve's
// requests are row 0 of their own).
Rng sequence_rng(uint64_t seed, int64_t row);

}  // namespace pm::cli
