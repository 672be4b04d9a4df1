#include "model/corpus.h"

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <regex>
#include <sstream>

#include "core/error.h"

namespace pm {

std::string read_text_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  PM_REQUIRE(in.good(), "cannot read data file {}", path);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

std::string brown_file_to_text(const std::string& tagged) {
  std::string out;
  std::istringstream lines(tagged);
  std::string line;
  while (std::getline(lines, line)) {
    std::istringstream words(line);
    std::string token, sentence;
    while (words >> token) {
      auto slash = token.rfind('/');
      std::string w = slash == std::string::npos ? token : token.substr(0, slash);
      if (w == "``" || w == "''") w.assign(1, '"');  // (assign: GCC 12 warns falsely of w = "\"" here, -Wrestrict)
      bool closing = w == "." || w == "," || w == ";" || w == ":" || w == "!" || w == "?" || w == ")" ||
                     w == "'s" || w == "n't" || w == "'";
      if (!sentence.empty() && !closing && sentence.back() != '(') sentence += ' ';
      sentence += w;
    }
    if (!sentence.empty()) out += sentence + "\n";
  }
  return out;
}

CorpusText read_brown_corpus(const std::string& dir) {
  namespace fs = std::filesystem;
  PM_REQUIRE(fs::is_directory(dir), "corpus folder {} does not exist (run scripts/fetch-corpus)", dir);
  std::vector<std::string> files;
  std::regex name("c[a-r][0-9][0-9]");
  for (const auto& e : fs::directory_iterator(dir))
    if (e.is_regular_file() && std::regex_match(e.path().filename().string(), name)) files.push_back(e.path().string());
  std::sort(files.begin(), files.end());
  PM_REQUIRE(!files.empty(), "corpus folder {} holds no Brown corpus files (ca01 ...)", dir);
  CorpusText c;
  for (std::size_t i = 0; i < files.size(); ++i) {
    std::string text = brown_file_to_text(read_text_file(files[i]));
    (i % 10 == 9 ? c.validation : c.train) += text;
  }
  c.files = static_cast<int>(files.size());
  PM_REQUIRE(!c.train.empty() && !c.validation.empty(), "corpus folder {}: no text after stripping tags", dir);
  return c;
}

double unigram_entropy(const std::vector<int32_t>& tokens, int vocab_size) {
  std::vector<double> count(vocab_size, 0.0);
  for (int32_t t : tokens) count[t] += 1;
  double n = static_cast<double>(tokens.size()), h = 0;
  for (double c : count)
    if (c > 0) h -= c / n * std::log(c / n);
  return h;
}

}  // namespace pm
