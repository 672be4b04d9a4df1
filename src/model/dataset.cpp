#include "model/dataset.h"

#include <cstring>
#include <filesystem>
#include <utility>

#include "core/error.h"
#include "core/rng.h"
#include "model/corpus.h"

namespace pm {
namespace {

std::string ints_to_bytes(const std::vector<int32_t>& v) {
  return std::string(reinterpret_cast<const char*>(v.data()), v.size() * sizeof(int32_t));
}

std::vector<int32_t> bytes_to_ints(const std::string& s) {
  std::vector<int32_t> v(s.size() / sizeof(int32_t));
  std::memcpy(v.data(), s.data(), v.size() * sizeof(int32_t));
  return v;
}

}  // namespace

TextSplits read_text_splits(const std::string& data, std::string* description) {
  TextSplits out;
  std::error_code ec;
  PM_REQUIRE(std::filesystem::exists(data, ec),
             "no training data at '{}' (looked for {}): fetch the Brown corpus with scripts/fetch-corpus "
             "(it writes data/brown in the repository), or set 'data' to a corpus folder or a plain-text file",
             data, std::filesystem::absolute(data, ec).string());
  if (std::filesystem::is_directory(data)) {
    CorpusText corpus = read_brown_corpus(data);
    out.train = std::move(corpus.train), out.validation = std::move(corpus.validation);
    if (description) *description = fmt::format("Brown corpus ({} files) in {}", corpus.files, data);
    return out;
  }
  std::string text = read_text_file(data);
  PM_REQUIRE(!text.empty(), "data file {} is empty", data);
  std::size_t cut = text.rfind('\n', text.size() * 9 / 10);
  if (cut == std::string::npos || cut == 0) cut = text.size() * 9 / 10;
  out.train = text.substr(0, cut), out.validation = text.substr(cut);
  if (description) *description = fmt::format("text file {}", data);
  return out;
}

TokenData load_token_data(Communicator& comm, const TrainConfig& c, const std::string* tokenizer_json) {
  TokenData d;
  std::string error, tok_json, train_bytes, val_bytes, description;
  int64_t validation_bytes = 0;
  if (comm.rank() == 0) {
    try {
      auto [train, validation] = read_text_splits(c.data, &description);
      Tokenizer tokenizer = tokenizer_json ? Tokenizer::from_json(*tokenizer_json, "the checkpoint's tokenizer")
                                           : Tokenizer::train(train, c.tokenizer_vocab);
      std::vector<int32_t> train_tokens = tokenizer.encode(train), val_tokens = tokenizer.encode(validation);
      const int64_t need = int64_t{c.model.seq_len} + 1;
      PM_REQUIRE(static_cast<int64_t>(train_tokens.size()) > need && static_cast<int64_t>(val_tokens.size()) > need,
                 "{} is too short: {} training and {} validation tokens, a window needs {}", c.data,
                 train_tokens.size(), val_tokens.size(), need);
      tok_json = tokenizer.to_json();
      train_bytes = ints_to_bytes(train_tokens);
      val_bytes = ints_to_bytes(val_tokens);
      validation_bytes = static_cast<int64_t>(validation.size());
    } catch (const Error& e) {
      error = e.what();
    }
  }
  error = comm.broadcast_string(error, 0);
  PM_REQUIRE(error.empty(), "{}", error);
  d.tokenizer = Tokenizer::from_json(comm.broadcast_string(tok_json, 0), "the tokenizer");
  d.train = bytes_to_ints(comm.broadcast_string(std::move(train_bytes), 0));
  d.validation = bytes_to_ints(comm.broadcast_string(std::move(val_bytes), 0));
  d.description = comm.broadcast_string(description, 0);
  comm.broadcast(&validation_bytes, 1, DType::i64, 0);
  d.validation_bytes = validation_bytes;
  return d;
}

void sample_batch(const std::vector<int32_t>& tokens, int64_t B, int64_t S, uint64_t seed, uint64_t stream,
                  int32_t* inputs, int32_t* targets) {
  Rng rng(seed, stream);
  const int64_t windows = static_cast<int64_t>(tokens.size()) - S;
  PM_CHECK(windows > 0, "{} tokens cannot hold a window of {}", tokens.size(), S + 1);
  for (int64_t b = 0; b < B; ++b) {
    int64_t at = static_cast<int64_t>(rng.next_u64() % static_cast<uint64_t>(windows));
    std::memcpy(inputs + b * S, tokens.data() + at, S * sizeof(int32_t));
    std::memcpy(targets + b * S, tokens.data() + at + 1, S * sizeof(int32_t));
  }
}

}  // namespace pm
