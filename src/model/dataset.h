// Token data for training: text read and tokenized once (on rank 0, sent to every rank), and
// batches drawn from (seed, step, rank) alone, so a resumed run sees exactly the same batches.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "comm/communicator.h"
#include "model/tokenizer.h"
#include "model/train_config.h"

namespace pm {

struct TokenData {
  Tokenizer tokenizer;
  std::vector<int32_t> train, validation;
  int64_t validation_bytes = 0;  // bytes of validation text: for bits per byte
  std::string description;
};

// The text at `data` (a Brown corpus folder: split by file; a plain-text file: its last 10% is the
// validation split, cut at a line end), with a line saying what it is. Throws a usage error when
// it is missing or empty.
struct TextSplits {
  std::string train, validation;
};
TextSplits read_text_splits(const std::string& data, std::string* description = nullptr);

// config.data: a Brown corpus folder (split by file) or a plain-text file (its last 10% is the
// validation split, cut at a line end). tokenizer_json: a tokenizer to reuse (resume,
// generation); without one, a BPE of config.tokenizer_vocab is trained on the training split.
// Collective; a missing, empty or too short corpus is the same usage error on every rank.
TokenData load_token_data(Communicator& comm, const TrainConfig& config, const std::string* tokenizer_json);

// B windows of S + 1 tokens at offsets drawn from (seed, stream): inputs = window[0:S],
// targets = window[1:S+1]. inputs, targets: [B, S].
void sample_batch(const std::vector<int32_t>& tokens, int64_t B, int64_t S, uint64_t seed, uint64_t stream,
                  int32_t* inputs, int32_t* targets);

}  // namespace pm
