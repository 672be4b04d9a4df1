// The safetensors format (what the field uses for weights): an 8-byte little-endian header length,
// a JSON header {name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}, then
// the raw little-endian data. We write and read float32 tensors; reading checks every offset.
#pragma once

#include <map>
#include <string>
#include <vector>

#include "core/tensor.h"

namespace pm {

struct NamedTensor {
  std::string name;
  Tensor tensor;
};

// The file's bytes.
std::string encode_safetensors(const std::vector<NamedTensor>& tensors, const std::map<std::string, std::string>& metadata);

// Parses bytes; `source` names them in errors (usage errors: a corrupt file is bad input).
std::vector<NamedTensor> decode_safetensors(const std::string& bytes, const std::string& source,
                                            std::map<std::string, std::string>* metadata = nullptr);

}  // namespace pm
