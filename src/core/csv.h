// A tiny CSV writer: a header once, then rows; values are written as given.
#pragma once

#include <fstream>
#include <string>
#include <vector>

#include "core/error.h"

namespace pm {

class CsvWriter {
 public:
  // Creates (or truncates) path and writes the header.
  CsvWriter(const std::string& path, const std::vector<std::string>& header) : out_(path) {
    PM_IO_CHECK(out_.good(), "cannot write CSV file {}", path);
    row(header);
  }
  void row(const std::vector<std::string>& values) {
    for (std::size_t i = 0; i < values.size(); ++i) out_ << (i ? "," : "") << values[i];
    out_ << "\n";
    out_.flush();
  }

 private:
  std::ofstream out_;
};

}  // namespace pm
