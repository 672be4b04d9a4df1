#include "model/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>

#include <cstring>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/json_input.h"

namespace pm {

std::string safetensors_header(const TensorListing& listing, const std::map<std::string, std::string>& metadata) {
  nlohmann::json header = nlohmann::json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  uint64_t offset = 0;
  for (const auto& [name, shape] : listing) {
    const uint64_t bytes = static_cast<uint64_t>(shape_numel(shape)) * sizeof(float);
    header[name] = {{"dtype", "F32"}, {"shape", shape}, {"data_offsets", {offset, offset + bytes}}};
    offset += bytes;
  }
  std::string h = header.dump();
  h.append((8 - h.size() % 8) % 8, ' ');  // data starts 8-byte aligned
  const uint64_t len = h.size();
  std::string out(8, '\0');
  std::memcpy(out.data(), &len, 8);
  return out + h;
}

std::string encode_safetensors(const std::vector<NamedTensor>& tensors,
                               const std::map<std::string, std::string>& metadata) {
  TensorListing listing;
  uint64_t data_bytes = 0;
  for (const NamedTensor& t : tensors) {
    PM_CHECK(t.tensor.dtype() == DType::f32, "safetensors writer: {} is not float32", t.name);
    listing.emplace_back(t.name, t.tensor.shape());
    data_bytes += t.tensor.nbytes();
  }
  std::string out = safetensors_header(listing, metadata);
  out.reserve(out.size() + data_bytes);  // one allocation: appending grew it (and faulted pages in) again and again
  for (const NamedTensor& t : tensors) out.append(static_cast<const char*>(t.tensor.raw()), t.tensor.nbytes());
  return out;
}

namespace {

// Where each float32 tensor of a safetensors file lies: parsed and checked from its first bytes.
struct TensorIndex {
  std::map<std::string, std::pair<Shape, uint64_t>> tensors;  // name -> (shape, offset from the file's start)
  std::map<std::string, std::string> metadata;
};

TensorIndex index_safetensors(const char* bytes, uint64_t size, const std::string& source) {
  PM_REQUIRE(size >= 8, "{} is not a safetensors file (only {} bytes)", source, size);
  uint64_t len;
  std::memcpy(&len, bytes, 8);
  PM_REQUIRE(len > 0 && len <= size - 8, "{} is corrupt: its header length {} runs past the file ({} bytes)", source,
             len, size);
  PM_REQUIRE(len <= (uint64_t{100} << 20), "{} is corrupt: a header of {} bytes (safetensors allows 100 MB)", source, len);
  nlohmann::json header = parse_json_input(std::string(bytes + 8, len), source, "is corrupt: its header is not JSON");
  PM_REQUIRE(header.is_object(), "{} is corrupt: its header is not a JSON object", source);
  const uint64_t data_size = size - 8 - len;
  TensorIndex index;
  try {
    for (auto& [name, info] : header.items()) {
      if (name == "__metadata__") {
        index.metadata = info.get<std::map<std::string, std::string>>();
        continue;
      }
      PM_REQUIRE(info.at("dtype") == "F32", "{}: tensor {} is {}, only F32 is read", source, name, info.at("dtype").dump());
      const std::string what = fmt::format("{}: tensor {}'s", source, brief(nlohmann::json(name)));
      PM_REQUIRE(info.at("shape").is_array() && info.at("shape").size() <= 8, "{} shape must be a list of at most 8 sizes",
                 what);
      Shape shape;
      for (const auto& d : info.at("shape")) shape.push_back(json_int(d, 0, INT64_MAX, what + " sizes"));
      const auto& offsets = info.at("data_offsets");
      PM_REQUIRE(offsets.is_array() && offsets.size() == 2, "{} data_offsets must be [begin, end]", what);
      const uint64_t begin = static_cast<uint64_t>(json_int(offsets[0], 0, INT64_MAX, what + " data_offsets"));
      const uint64_t end = static_cast<uint64_t>(json_int(offsets[1], 0, INT64_MAX, what + " data_offsets"));
      // the element count, refusing negative dimensions and products past the file (no overflow)
      uint64_t elements = 1;
      for (int64_t d : shape) {
        PM_REQUIRE(d >= 0 && (d == 0 || elements <= data_size / 4 / static_cast<uint64_t>(d)),
                   "{} is corrupt: tensor {} has shape {}, more than the file holds", source, name, shape_str(shape));
        elements *= static_cast<uint64_t>(d);
      }
      PM_REQUIRE(begin <= end && end <= data_size && end - begin == elements * 4,
                 "{} is corrupt: tensor {} of shape {} claims bytes [{}, {}) of {}", source, name, shape_str(shape), begin,
                 end, data_size);
      index.tensors[name] = {shape, 8 + len + begin};
    }
  } catch (const nlohmann::json::exception& e) {
    throw Error(ErrorKind::usage, fmt::format("{} is corrupt: {}", source, e.what()));
  }
  return index;
}

}  // namespace

std::vector<NamedTensor> decode_safetensors(const std::string& bytes, const std::string& source,
                                            std::map<std::string, std::string>* metadata) {
  TensorIndex index = index_safetensors(bytes.data(), bytes.size(), source);
  if (metadata) *metadata = index.metadata;
  std::vector<NamedTensor> out;
  for (const auto& [name, where] : index.tensors) {
    Tensor t = Tensor::empty(where.first);
    std::memcpy(t.raw(), bytes.data() + where.second, t.nbytes());
    out.push_back({name, std::move(t)});
  }
  return out;
}

MappedSafetensors::MappedSafetensors(const std::string& path) : path_(path) {
  int fd = ::open(path.c_str(), O_RDONLY);
  PM_REQUIRE(fd >= 0, "cannot read {}: {}", path, std::strerror(errno));
  struct stat st {};
  const bool stat_ok = ::fstat(fd, &st) == 0;
  size_ = stat_ok ? static_cast<uint64_t>(st.st_size) : 0;
  if (stat_ok && size_ < 8) {  // (nothing to map: the same error as reading it)
    ::close(fd);
    index_safetensors("", size_, path);
  }
  void* p = stat_ok && size_ > 0 ? ::mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd, 0) : MAP_FAILED;
  ::close(fd);
  PM_REQUIRE(p != MAP_FAILED, "cannot map {} into memory ({} bytes)", path, size_);
  data_ = static_cast<const char*>(p);
  try {
    TensorIndex index = index_safetensors(data_, size_, path);
    tensors_ = std::move(index.tensors);
    metadata_ = std::move(index.metadata);
  } catch (...) {
    ::munmap(const_cast<char*>(data_), size_);
    throw;
  }
}

MappedSafetensors::~MappedSafetensors() { ::munmap(const_cast<char*>(data_), size_); }

const float* MappedSafetensors::tensor(const std::string& name, const Shape& shape) const {
  auto it = tensors_.find(name);
  PM_REQUIRE(it != tensors_.end(), "{} has no tensor {}: it was written for another model", path_, name);
  PM_REQUIRE(it->second.first == shape, "{}: {} has shape {}, this model needs {}", path_, name,
             shape_str(it->second.first), shape_str(shape));
  return reinterpret_cast<const float*>(data_ + it->second.second);
}

TensorListing MappedSafetensors::listing() const {
  TensorListing out;
  for (const auto& [name, where] : tensors_) out.emplace_back(name, where.first);
  return out;
}

void MappedSafetensors::release(const void* p, uint64_t bytes) const {
  // whole pages inside the range only: a neighbour's data stays
  const uint64_t page = static_cast<uint64_t>(::sysconf(_SC_PAGESIZE));
  uint64_t begin = (reinterpret_cast<uint64_t>(p) + page - 1) / page * page;
  uint64_t end = (reinterpret_cast<uint64_t>(p) + bytes) / page * page;
  if (end > begin) ::madvise(reinterpret_cast<void*>(begin), end - begin, MADV_DONTNEED);
}

}  // namespace pm
