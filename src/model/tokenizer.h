// Byte-level BPE tokenizer: 256 byte tokens plus merges learned from training text.
//
// Training splits text into words (a word keeps its leading space, as GPT-2 does, so merges never
// cross word boundaries), counts each distinct word once, and repeatedly merges the most frequent
// adjacent pair (ties: the smaller pair of ids), until the vocabulary has the size asked for.
// Encoding applies the merges in the order they were learned. Every byte string round-trips.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace pm {

class Tokenizer {
 public:
  // vocab_size >= 256: 256 byte tokens, then merges.
  static Tokenizer train(const std::string& text, int vocab_size);
  static Tokenizer from_json(const std::string& json, const std::string& source);
  std::string to_json() const;

  std::vector<int32_t> encode(const std::string& text) const;
  std::string decode(const std::vector<int32_t>& tokens) const;
  int vocab_size() const { return 256 + static_cast<int>(merges_.size()); }

 private:
  void rebuild();  // token bytes and merge ranks from merges_
  std::vector<std::pair<int32_t, int32_t>> merges_;  // merge i creates token 256 + i
  std::vector<std::string> bytes_;                   // [vocab] the bytes each token stands for
  std::vector<std::vector<std::pair<int32_t, int32_t>>> rank_by_first_;  // first id -> (second, rank)
};

// Words as training and encoding see them: a run of letters/digits/other bytes with its leading
// space, or a run of whitespace; at most kMaxWordBytes (longer runs are cut: English words are far
// shorter, and a run of megabytes without a space would make encoding quadratic).
inline constexpr std::size_t kMaxWordBytes = 64;
std::vector<std::string_view> split_words(const std::string& text);  // views into text
std::vector<std::string_view> split_words(std::string&& text) = delete;  // (views into a temporary)

}  // namespace pm
