#include "model/safetensors.h"

#include <cstring>
#include <nlohmann/json.hpp>

#include "core/error.h"

namespace pm {

std::string encode_safetensors(const std::vector<NamedTensor>& tensors, const std::map<std::string, std::string>& metadata) {
  nlohmann::json header = nlohmann::json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  uint64_t offset = 0;
  for (const NamedTensor& t : tensors) {
    PM_CHECK(t.tensor.dtype() == DType::f32, "safetensors writer: {} is not float32", t.name);
    header[t.name] = {{"dtype", "F32"}, {"shape", t.tensor.shape()}, {"data_offsets", {offset, offset + t.tensor.nbytes()}}};
    offset += t.tensor.nbytes();
  }
  std::string h = header.dump();
  h.append((8 - h.size() % 8) % 8, ' ');  // data starts 8-byte aligned
  uint64_t len = h.size();
  std::string out(8, '\0');
  std::memcpy(out.data(), &len, 8);
  out += h;
  for (const NamedTensor& t : tensors) out.append(static_cast<const char*>(t.tensor.raw()), t.tensor.nbytes());
  return out;
}

std::vector<NamedTensor> decode_safetensors(const std::string& bytes, const std::string& source,
                                            std::map<std::string, std::string>* metadata) {
  PM_REQUIRE(bytes.size() >= 8, "{} is not a safetensors file (only {} bytes)", source, bytes.size());
  uint64_t len;
  std::memcpy(&len, bytes.data(), 8);
  PM_REQUIRE(len > 0 && len <= bytes.size() - 8, "{} is corrupt: its header length {} runs past the file ({} bytes)",
             source, len, bytes.size());
  nlohmann::json header;
  try {
    header = nlohmann::json::parse(bytes.substr(8, len));
  } catch (const std::exception& e) {
    throw Error(ErrorKind::usage, fmt::format("{} is corrupt: its header is not JSON", source));
  }
  const uint64_t data_size = bytes.size() - 8 - len;
  std::vector<NamedTensor> out;
  try {
    for (auto& [name, info] : header.items()) {
      if (name == "__metadata__") {
        if (metadata) *metadata = info.get<std::map<std::string, std::string>>();
        continue;
      }
      PM_REQUIRE(info.at("dtype") == "F32", "{}: tensor {} is {}, only F32 is read", source, name, info.at("dtype").dump());
      Shape shape = info.at("shape").get<Shape>();
      uint64_t begin = info.at("data_offsets").at(0), end = info.at("data_offsets").at(1);
      Tensor t = Tensor::empty(shape);
      PM_REQUIRE(begin <= end && end <= data_size && end - begin == t.nbytes(),
                 "{} is corrupt: tensor {} of shape {} claims bytes [{}, {}) of {}", source, name, shape_str(shape), begin,
                 end, data_size);
      std::memcpy(t.raw(), bytes.data() + 8 + len + begin, t.nbytes());
      out.push_back({name, std::move(t)});
    }
  } catch (const nlohmann::json::exception& e) {
    throw Error(ErrorKind::usage, fmt::format("{} is corrupt: {}", source, e.what()));
  }
  return out;
}

}  // namespace pm
