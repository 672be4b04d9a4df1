// What each row's key/value cache holds, as rank 0 of `pipemoe serve` tracks it: the tokens at
// positions 0..n-1 of every decoded row and of the rows kept aside as a store of finished
// sequences. A new prompt that begins with tokens some row holds starts from a copy of them
// (GptModel::copy_inference_prefix, then extend): a shared system prompt, or a chat's next turn
// whose prompt is the last turn's prompt and answer, runs only its new tokens. The keys and values
// of positions 0..n-1 depend on those n tokens only, so the copy gives the bits a whole prefill
// gives (tests/inprocess: APromptContinuingACachedPrefixGivesTheBitsOfTheWholePrompt).
#pragma once

#include <cstdint>
#include <vector>

namespace pm::cli {

class PrefixStore {
 public:
  // Decoded rows are 0..decoded_rows-1, the store's rows the store_rows after them.
  PrefixStore(int64_t decoded_rows, int64_t store_rows);

  // A decoded row's cache now holds `tokens` (a prompt prefilled, a window slid), one token more
  // (decoded), or row `from`'s (moved: rows stay packed at the front).
  void set_row(int64_t row, std::vector<int32_t> tokens);
  void append(int64_t row, int32_t token);
  void move(int64_t from, int64_t to);

  struct Match {
    int64_t row = -1;    // a decoded row or a store row; -1: none
    int64_t length = 0;  // positions to copy from it
  };
  // The row among the first `decoded` decoded rows and the store whose cache holds the longest
  // prefix of `prompt`, at most prompt.size() - 1 tokens of it (its last token runs, to give the
  // logits to sample from).
  Match longest_prefix(const std::vector<int32_t>& prompt, int64_t decoded);

  // A finished sequence in decoded row `row`: the store row to copy its cache to before the row is
  // reused, or -1 when it is not worth a row (fewer than 2 tokens, or a store row holds them, or
  // more, already). The least recently matched store row makes room; one that holds a prefix of
  // these tokens is replaced first.
  int64_t keep(int64_t row);
  int64_t positions_of(int64_t row) const { return static_cast<int64_t>(tokens_of(row).size()); }

 private:
  std::vector<int32_t>& tokens_of(int64_t row);
  const std::vector<int32_t>& tokens_of(int64_t row) const;

  int64_t decoded_rows_;
  std::vector<std::vector<int32_t>> rows_;  // decoded rows, then store rows
  std::vector<uint64_t> last_used_;         // store rows: when last kept or matched (0: empty)
  uint64_t clock_ = 0;
};

}  // namespace pm::cli
