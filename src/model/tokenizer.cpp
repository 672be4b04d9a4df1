#include "model/tokenizer.h"

#include <algorithm>
#include <map>
#include <queue>
#include <string_view>
#include <nlohmann/json.hpp>
#include <unordered_map>

#include "core/error.h"
#include "core/json_input.h"

namespace pm {
namespace {

enum class CharClass { space, alnum, other };

CharClass class_of(unsigned char c) {
  if (c == ' ' || c == '\n' || c == '\t' || c == '\r') return CharClass::space;
  if (std::isalnum(c) || c >= 0x80) return CharClass::alnum;  // UTF-8 continuation stays in words
  return CharClass::other;
}

uint64_t pair_key(int32_t a, int32_t b) { return (static_cast<uint64_t>(a) << 32) | static_cast<uint32_t>(b); }

// fn(word) for each word of text in order (split_words), each a view into text: the corpus is ~2M
// words, and a string for each (then a vector of them) took ~0.4 s of the demo's ~1.9 s start.
template <typename Fn>
void for_each_word(std::string_view text, Fn&& fn) {
  const std::size_t n = text.size();
  // the end of a run of class c from j, looking no further than a word can reach
  auto run_end = [&](std::size_t j, CharClass c) {
    const std::size_t limit = std::min(n, j + kMaxWordBytes + 1);
    while (j < limit && class_of(text[j]) == c) ++j;
    return j;
  };
  std::size_t i = 0;
  while (i < n) {
    std::size_t j;
    CharClass c = class_of(text[i]);
    if (text[i] == ' ' && i + 1 < n && class_of(text[i + 1]) != CharClass::space) {
      j = run_end(i + 1, class_of(text[i + 1]));  // " word": the space joins the word
    } else if (c == CharClass::space) {
      j = run_end(i, c);
      if (j < n && j - i > 1 && text[j - 1] == ' ') --j;  // leave the last space to the next word
    } else {
      j = run_end(i, c);
    }
    j = std::min(j, i + kMaxWordBytes);  // a run longer than any word is cut (see tokenizer.h)
    fn(text.substr(i, j - i));
    i = j;
  }
}

}  // namespace

std::vector<std::string_view> split_words(const std::string& text) {
  std::vector<std::string_view> words;
  for_each_word(text, [&](std::string_view w) { words.push_back(w); });
  return words;
}

Tokenizer Tokenizer::train(const std::string& text, int vocab_size) {
  PM_REQUIRE(vocab_size >= 256, "vocabulary size must be at least 256 (the bytes), got {}", vocab_size);
  std::unordered_map<std::string_view, int64_t> counts;  // (views into text)
  for_each_word(text, [&](std::string_view w) { ++counts[w]; });
  // each distinct word as a sequence of token ids, with its count
  std::vector<std::vector<int32_t>> words;
  std::vector<int64_t> freq;
  for (auto& [w, c] : counts) {
    words.emplace_back(w.begin(), w.end());
    for (auto& id : words.back()) id = static_cast<unsigned char>(id);
    freq.push_back(c);
  }
  Tokenizer t;
  std::unordered_map<uint64_t, int64_t> pairs;
  // the words in which each pair occurs (or did: checked when used), so that a merge touches only
  // those words and training stays near linear in the text
  std::unordered_map<uint64_t, std::vector<int32_t>> where;
  for (std::size_t w = 0; w < words.size(); ++w)
    for (std::size_t i = 0; i + 1 < words[w].size(); ++i) {
      const uint64_t k = pair_key(words[w][i], words[w][i + 1]);
      pairs[k] += freq[w];
      auto& list = where[k];
      if (list.empty() || list.back() != static_cast<int32_t>(w)) list.push_back(static_cast<int32_t>(w));
    }
  // The next merge is the most frequent pair, ties to the smaller key. A heap of (count, key)
  // entries finds it without scanning every pair each merge (which took ~2 s of the demo's start);
  // an entry is pushed whenever a pair's count changes, and stale ones (a count since changed, a
  // pair gone) are dropped when they come to the top.
  auto later = [](const std::pair<int64_t, uint64_t>& x, const std::pair<int64_t, uint64_t>& y) {
    return x.first < y.first || (x.first == y.first && x.second > y.second);
  };
  std::priority_queue<std::pair<int64_t, uint64_t>, std::vector<std::pair<int64_t, uint64_t>>, decltype(later)> heap(
      later);
  for (const auto& [k, c] : pairs) heap.push({c, k});
  std::vector<uint64_t> changed;
  while (t.vocab_size() < vocab_size && !heap.empty()) {
    const auto [best_count, best] = heap.top();
    heap.pop();
    const auto current = pairs.find(best);
    if (current == pairs.end() || current->second != best_count) continue;  // stale
    if (best_count < 2) break;
    int32_t a = static_cast<int32_t>(best >> 32), b = static_cast<int32_t>(best & 0xffffffffu);
    int32_t id = t.vocab_size();
    t.merges_.push_back({a, b});
    // apply the merge and update the pair counts of the words it touched (in word order, as a
    // scan of every word would)
    std::vector<int32_t> touched = std::move(where[best]);
    where.erase(best);
    std::sort(touched.begin(), touched.end());
    touched.erase(std::unique(touched.begin(), touched.end()), touched.end());
    for (int32_t w : touched) {
      auto& s = words[w];
      bool has = false;
      for (std::size_t i = 0; i + 1 < s.size() && !has; ++i) has = s[i] == a && s[i + 1] == b;
      if (!has) continue;
      for (std::size_t i = 0; i + 1 < s.size(); ++i) {
        auto& c = pairs[pair_key(s[i], s[i + 1])];
        if ((c -= freq[w]) <= 0) pairs.erase(pair_key(s[i], s[i + 1]));
        changed.push_back(pair_key(s[i], s[i + 1]));
      }
      std::vector<int32_t> merged;
      for (std::size_t i = 0; i < s.size(); ++i) {
        if (i + 1 < s.size() && s[i] == a && s[i + 1] == b) {
          merged.push_back(id);
          ++i;
        } else {
          merged.push_back(s[i]);
        }
      }
      s = std::move(merged);
      for (std::size_t i = 0; i + 1 < s.size(); ++i) {
        const uint64_t k = pair_key(s[i], s[i + 1]);
        pairs[k] += freq[w];
        changed.push_back(k);
        auto& list = where[k];
        if (list.empty() || list.back() != w) list.push_back(w);
      }
    }
    changed.push_back(best);  // (if any of it is left, as the full scan would see it)
    std::sort(changed.begin(), changed.end());
    changed.erase(std::unique(changed.begin(), changed.end()), changed.end());
    for (uint64_t k : changed)
      if (const auto it = pairs.find(k); it != pairs.end()) heap.push({it->second, k});
    changed.clear();
  }
  t.rebuild();
  return t;
}

void Tokenizer::rebuild() {
  bytes_.assign(256, "");
  for (int i = 0; i < 256; ++i) bytes_[i] = std::string(1, static_cast<char>(i));
  rank_by_first_.assign(256 + merges_.size(), {});
  for (std::size_t r = 0; r < merges_.size(); ++r) {
    auto [a, b] = merges_[r];
    PM_CHECK(a >= 0 && b >= 0 && a < 256 + static_cast<int32_t>(r) && b < 256 + static_cast<int32_t>(r),
             "merge {} uses tokens not made yet", r);
    bytes_.push_back(bytes_[a] + bytes_[b]);
    rank_by_first_[a].push_back({b, static_cast<int32_t>(r)});
  }
}

std::vector<int32_t> Tokenizer::encode(const std::string& text) const {
  std::vector<int32_t> out;
  std::unordered_map<std::string_view, std::vector<int32_t>> cache;  // (views into text)
  for_each_word(text, [&](std::string_view w) {
    auto it = cache.find(w);
    if (it == cache.end()) {
      std::vector<int32_t> s;
      for (unsigned char c : w) s.push_back(c);
      // merge the adjacent pair with the lowest rank until none applies
      while (s.size() > 1) {
        int32_t best_rank = INT32_MAX;
        std::size_t at = 0;
        for (std::size_t i = 0; i + 1 < s.size(); ++i)
          for (auto [second, rank] : rank_by_first_[s[i]])
            if (second == s[i + 1] && rank < best_rank) best_rank = rank, at = i;
        if (best_rank == INT32_MAX) break;
        s[at] = 256 + best_rank;
        s.erase(s.begin() + static_cast<std::ptrdiff_t>(at) + 1);
      }
      it = cache.emplace(w, std::move(s)).first;
    }
    out.insert(out.end(), it->second.begin(), it->second.end());
  });
  return out;
}

std::string Tokenizer::decode(const std::vector<int32_t>& tokens) const {
  std::string out;
  for (int32_t t : tokens) {
    PM_CHECK(t >= 0 && t < vocab_size(), "token {} outside the vocabulary of {}", t, vocab_size());
    out += bytes_[t];
  }
  return out;
}

std::string Tokenizer::to_json() const {
  nlohmann::json merges = nlohmann::json::array();
  for (auto [a, b] : merges_) merges.push_back({a, b});
  return nlohmann::json{{"type", "byte-bpe"}, {"vocab_size", vocab_size()}, {"merges", merges}}.dump();
}

Tokenizer Tokenizer::from_json(const std::string& text, const std::string& source) {
  Tokenizer t;
  try {
    auto j = parse_json_input(text, source, "is not valid JSON", std::size_t{16} << 20);
    PM_REQUIRE(j.at("type") == "byte-bpe", "{}: not a byte-level BPE tokenizer", source);
    const auto& merges = j.at("merges");
    PM_REQUIRE(merges.is_array() && merges.size() <= 65536 - 256, "{}: 'merges' must be a list of at most {} pairs",
               source, 65536 - 256);
    for (const auto& m : merges) {
      // merge i makes token 256 + i from two tokens that exist before it
      const int64_t next = 256 + t.merges_.size();
      PM_REQUIRE(m.is_array() && m.size() == 2, "{}: merge {} must be a pair of token ids", source, t.merges_.size());
      const std::string what = fmt::format("{}: merge {}'s tokens (made before it)", source, t.merges_.size());
      const int64_t a = json_int(m[0], 0, next - 1, what), b = json_int(m[1], 0, next - 1, what);
      t.merges_.push_back({static_cast<int32_t>(a), static_cast<int32_t>(b)});
    }
    t.rebuild();
    PM_REQUIRE(t.vocab_size() == json_int(j.at("vocab_size"), 0, 1 << 20, source + ": vocab_size"),
               "{}: vocabulary size does not match its merges", source);
  } catch (const nlohmann::json::exception& e) {
    throw Error(ErrorKind::usage, fmt::format("{}: not a valid tokenizer: {}", source, e.what()));
  } catch (const Error& e) {
    throw Error(ErrorKind::usage, fmt::format("{}: not a valid tokenizer: {}", source, e.what()));
  }
  return t;
}

}  // namespace pm
