#include "apps/pipemoe/prefix_store.h"

#include <algorithm>

#include "core/error.h"

namespace pm::cli {
namespace {

// How many leading tokens a and b share.
int64_t common_prefix(const std::vector<int32_t>& a, const std::vector<int32_t>& b) {
  const auto [ia, ib] = std::mismatch(a.begin(), a.end(), b.begin(), b.end());
  return ia - a.begin();
}

bool starts_with(const std::vector<int32_t>& whole, const std::vector<int32_t>& prefix) {
  return prefix.size() <= whole.size() && std::equal(prefix.begin(), prefix.end(), whole.begin());
}

}  // namespace

PrefixStore::PrefixStore(int64_t decoded_rows, int64_t store_rows)
    : decoded_rows_(decoded_rows), rows_(decoded_rows + store_rows), last_used_(store_rows, 0) {}

std::vector<int32_t>& PrefixStore::tokens_of(int64_t row) {
  PM_CHECK(row >= 0 && row < static_cast<int64_t>(rows_.size()), "row {} of {}", row, rows_.size());
  return rows_[row];
}

const std::vector<int32_t>& PrefixStore::tokens_of(int64_t row) const {
  PM_CHECK(row >= 0 && row < static_cast<int64_t>(rows_.size()), "row {} of {}", row, rows_.size());
  return rows_[row];
}

void PrefixStore::set_row(int64_t row, std::vector<int32_t> tokens) { tokens_of(row) = std::move(tokens); }

void PrefixStore::append(int64_t row, int32_t token) { tokens_of(row).push_back(token); }

void PrefixStore::move(int64_t from, int64_t to) {
  if (from != to) tokens_of(to) = tokens_of(from);
}

PrefixStore::Match PrefixStore::longest_prefix(const std::vector<int32_t>& prompt, int64_t decoded) {
  Match best;
  const int64_t most = static_cast<int64_t>(prompt.size()) - 1;
  auto consider = [&](int64_t row) {
    const int64_t n = std::min(most, common_prefix(prompt, rows_[row]));
    if (n > best.length) best = {row, n};
  };
  for (int64_t r = 0; r < std::min(decoded, decoded_rows_); ++r) consider(r);
  for (int64_t r = decoded_rows_; r < static_cast<int64_t>(rows_.size()); ++r) consider(r);
  if (best.row >= decoded_rows_) last_used_[best.row - decoded_rows_] = ++clock_;
  return best;
}

int64_t PrefixStore::keep(int64_t row) {
  const std::vector<int32_t>& tokens = tokens_of(row);
  if (last_used_.empty() || tokens.size() < 2) return -1;
  int64_t slot = -1;
  for (std::size_t s = 0; s < last_used_.size(); ++s) {
    const std::vector<int32_t>& held = rows_[decoded_rows_ + s];
    if (last_used_[s] != 0 && starts_with(held, tokens)) {  // held already
      last_used_[s] = ++clock_;
      return -1;
    }
    if (last_used_[s] != 0 && starts_with(tokens, held) && slot < 0) slot = static_cast<int64_t>(s);
  }
  if (slot < 0)  // an empty row (0), else the least recently used
    slot = std::min_element(last_used_.begin(), last_used_.end()) - last_used_.begin();
  last_used_[slot] = ++clock_;
  rows_[decoded_rows_ + slot] = tokens;
  return decoded_rows_ + slot;
}

}  // namespace pm::cli
