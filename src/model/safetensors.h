// The safetensors format (what the field uses for weights): an 8-byte little-endian header length,
// a JSON header {name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}, then
// the raw little-endian data. We write and read float32 tensors; reading checks every offset.
#pragma once

#include <map>
#include <string>
#include <utility>
#include <vector>

#include "core/tensor.h"

namespace pm {

struct NamedTensor {
  std::string name;
  Tensor tensor;
};

// The header of a file of float32 tensors whose data follows in this order: the 8-byte length and
// the JSON, padded so that the data starts 8-byte aligned. (A checkpoint's save writes it, then
// each tensor as it is gathered: model/checkpoint.cpp.)
using TensorListing = std::vector<std::pair<std::string, Shape>>;
std::string safetensors_header(const TensorListing& listing, const std::map<std::string, std::string>& metadata);

// The file's bytes.
std::string encode_safetensors(const std::vector<NamedTensor>& tensors, const std::map<std::string, std::string>& metadata);

// Parses bytes; `source` names them in errors (usage errors: a corrupt file is bad input).
std::vector<NamedTensor> decode_safetensors(const std::string& bytes, const std::string& source,
                                            std::map<std::string, std::string>* metadata = nullptr);

// A safetensors file mapped into memory, read in place: what expert offloading to disk reads
// experts from. The OS brings pages in as they are read; release() lets them go again.
class MappedSafetensors {
 public:
  explicit MappedSafetensors(const std::string& path);  // usage error: missing, unreadable or corrupt
  ~MappedSafetensors();
  MappedSafetensors(const MappedSafetensors&) = delete;
  MappedSafetensors& operator=(const MappedSafetensors&) = delete;
  // The tensor's float32 data; usage error if it is absent or of another shape.
  const float* tensor(const std::string& name, const Shape& shape) const;
  // Every tensor's name and shape, in name order; the header's "__metadata__".
  TensorListing listing() const;
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  void release(const void* data, uint64_t bytes) const;
  const std::string& path() const { return path_; }

 private:
  std::string path_;
  const char* data_ = nullptr;
  uint64_t size_ = 0;
  std::map<std::string, std::pair<Shape, uint64_t>> tensors_;  // name -> (shape, offset)
  std::map<std::string, std::string> metadata_;
};

}  // namespace pm
