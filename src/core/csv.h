// A tiny CSV writer: a header once, then rows; values are written as given.
#pragma once

#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "core/error.h"

namespace pm {

class CsvWriter {
 public:
  // Creates (or truncates) path, and its folder if needed, and writes the header.
  CsvWriter(const std::string& path, const std::vector<std::string>& header) : out_(open(path)) {
    PM_IO_CHECK(out_.good(), "cannot write CSV file {}", path);
    row(header);
  }
  void row(const std::vector<std::string>& values) {
    for (std::size_t i = 0; i < values.size(); ++i) out_ << (i ? "," : "") << values[i];
    out_ << "\n";
    out_.flush();
  }

 private:
  static std::ofstream open(const std::string& path) {
    std::error_code ec;
    if (std::filesystem::path(path).has_parent_path()) std::filesystem::create_directories(std::filesystem::path(path).parent_path(), ec);
    return std::ofstream(path);
  }
  std::ofstream out_;
};

}  // namespace pm
