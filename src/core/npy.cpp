#include "core/npy.h"

#include <cstring>
#include <fstream>
#include <iterator>
#include <regex>

namespace pm {
namespace {

const char* npy_descr(DType dtype) {
  switch (dtype) {
    case DType::f32: return "<f4";
    case DType::f64: return "<f8";
    case DType::i32: return "<i4";
    case DType::i64: return "<i8";
    case DType::u8: return "|u1";
    case DType::bf16: break;
  }
  throw Error(ErrorKind::usage, fmt::format("cannot write {} to .npy", dtype_name(dtype)));
}

DType dtype_from_descr(const std::string& descr, const std::string& path) {
  if (descr == "<f4") return DType::f32;
  if (descr == "<f8") return DType::f64;
  if (descr == "<i4") return DType::i32;
  if (descr == "<i8") return DType::i64;
  if (descr == "|u1" || descr == "<u1") return DType::u8;
  throw Error(ErrorKind::io, fmt::format("{}: unsupported .npy dtype '{}'", path, descr));
}

}  // namespace

void write_npy(const std::string& path, const Tensor& tensor) {
  std::string shape;
  for (int64_t d : tensor.shape()) shape += std::to_string(d) + ",";
  if (tensor.ndim() > 1) shape.pop_back();  // (3,) for 1-d, (3,4) otherwise
  std::string header = fmt::format("{{'descr': '{}', 'fortran_order': False, 'shape': ({}), }}",
                                   npy_descr(tensor.dtype()), shape);
  // magic(6) + version(2) + length(2) + header + '\n', padded to a multiple of 64 bytes
  std::size_t total = 10 + header.size() + 1;
  header.append((64 - total % 64) % 64, ' ');
  header.push_back('\n');

  std::ofstream out(path, std::ios::binary);
  PM_IO_CHECK(out.good(), "cannot write {}: {}", path, std::strerror(errno));
  const char magic[8] = {'\x93', 'N', 'U', 'M', 'P', 'Y', 1, 0};
  out.write(magic, 8);
  uint16_t len = static_cast<uint16_t>(header.size());
  out.write(reinterpret_cast<const char*>(&len), 2);
  out.write(header.data(), static_cast<std::streamsize>(header.size()));
  out.write(static_cast<const char*>(tensor.raw()), static_cast<std::streamsize>(tensor.nbytes()));
  out.close();
  PM_IO_CHECK(!out.fail(), "writing {} failed: {}", path, std::strerror(errno));
}

Tensor decode_npy(const std::string& bytes, const std::string& source) {
  PM_IO_CHECK(bytes.size() >= 10 && std::memcmp(bytes.data(), "\x93NUMPY", 6) == 0, "{}: not a .npy file", source);
  const bool v1 = bytes[6] == 1;
  const std::size_t prefix = v1 ? 10 : 12;
  PM_IO_CHECK(bytes.size() >= prefix, "{}: truncated .npy header", source);
  std::size_t header_len = 0;
  if (v1) {
    uint16_t len;
    std::memcpy(&len, bytes.data() + 8, 2);
    header_len = len;
  } else {
    uint32_t len;
    std::memcpy(&len, bytes.data() + 8, 4);
    header_len = len;
  }
  PM_IO_CHECK(header_len <= bytes.size() - prefix, "{}: truncated .npy header", source);
  const std::string header = bytes.substr(prefix, header_len);
  const std::size_t data_bytes = bytes.size() - prefix - header_len;

  std::smatch m;
  PM_IO_CHECK(std::regex_search(header, m, std::regex("'descr':\\s*'([^']+)'")), "{}: .npy header has no descr", source);
  DType dtype = dtype_from_descr(m[1], source);
  PM_IO_CHECK(!std::regex_search(header, std::regex("'fortran_order':\\s*True")),
              "{}: Fortran-ordered .npy is not supported", source);
  PM_IO_CHECK(std::regex_search(header, m, std::regex("'shape':\\s*\\(([^)]*)\\)")), "{}: .npy header has no shape",
              source);
  Shape shape;
  std::string dims = m[1];
  std::regex number("[0-9]+");
  // every dimension, and their product, bounded by the data the file has (no overflow, no
  // allocation the file cannot fill)
  const std::size_t item = dtype_size(dtype);
  std::size_t elements = 1;
  for (auto it = std::sregex_iterator(dims.begin(), dims.end(), number); it != std::sregex_iterator(); ++it) {
    const std::string digits = it->str();
    PM_IO_CHECK(digits.size() <= 18, "{}: .npy dimension {} is too large", source, digits.substr(0, 24));
    const int64_t d = std::stoll(digits);
    PM_IO_CHECK(d == 0 || elements <= data_bytes / item / static_cast<std::size_t>(d),
                "{}: truncated .npy data (shape needs more than the {} bytes there)", source, data_bytes);
    elements *= static_cast<std::size_t>(d);
    shape.push_back(d);
  }
  Tensor t = Tensor::empty(shape, dtype);
  PM_IO_CHECK(data_bytes >= t.nbytes(), "{}: truncated .npy data ({} of {} bytes)", source, data_bytes, t.nbytes());
  std::memcpy(t.raw(), bytes.data() + prefix + header_len, t.nbytes());
  return t;
}

Tensor read_npy(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  PM_IO_CHECK(in.good(), "cannot open {}: {}", path, std::strerror(errno));
  std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  return decode_npy(bytes, path);
}

}  // namespace pm
