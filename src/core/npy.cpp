#include "core/npy.h"

#include <cstring>
#include <fstream>
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

Tensor read_npy(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  PM_IO_CHECK(in.good(), "cannot open {}: {}", path, std::strerror(errno));
  char magic[8];
  in.read(magic, 8);
  PM_IO_CHECK(in.good() && std::memcmp(magic, "\x93NUMPY", 6) == 0, "{}: not a .npy file", path);
  std::size_t header_len = 0;
  if (magic[6] == 1) {
    uint16_t len;
    in.read(reinterpret_cast<char*>(&len), 2);
    header_len = len;
  } else {
    uint32_t len;
    in.read(reinterpret_cast<char*>(&len), 4);
    header_len = len;
  }
  std::string header(header_len, '\0');
  in.read(header.data(), static_cast<std::streamsize>(header_len));
  PM_IO_CHECK(in.good(), "{}: truncated .npy header", path);

  std::smatch m;
  PM_IO_CHECK(std::regex_search(header, m, std::regex("'descr':\\s*'([^']+)'")),
              "{}: .npy header has no descr", path);
  DType dtype = dtype_from_descr(m[1], path);
  PM_IO_CHECK(!std::regex_search(header, std::regex("'fortran_order':\\s*True")),
              "{}: Fortran-ordered .npy is not supported", path);
  PM_IO_CHECK(std::regex_search(header, m, std::regex("'shape':\\s*\\(([^)]*)\\)")),
              "{}: .npy header has no shape", path);
  Shape shape;
  std::string dims = m[1];
  std::regex number("[0-9]+");
  for (auto it = std::sregex_iterator(dims.begin(), dims.end(), number); it != std::sregex_iterator(); ++it)
    shape.push_back(std::stoll(it->str()));

  Tensor t = Tensor::empty(shape, dtype);
  in.read(static_cast<char*>(t.raw()), static_cast<std::streamsize>(t.nbytes()));
  PM_IO_CHECK(static_cast<std::size_t>(in.gcount()) == t.nbytes(),
              "{}: truncated .npy data ({} of {} bytes)", path, in.gcount(), t.nbytes());
  return t;
}

}  // namespace pm
