// NumPy .npy files (format 1.0), so that anyone can check our tensors with NumPy or PyTorch.
// Reads and writes little-endian float32, float64, int32, int64 and uint8, C order.
#pragma once

#include <string>

#include "core/tensor.h"

namespace pm {

void write_npy(const std::string& path, const Tensor& tensor);
Tensor read_npy(const std::string& path);
// The bytes of a .npy file (source names it in errors): an io Error for anything malformed.
Tensor decode_npy(const std::string& bytes, const std::string& source);

}  // namespace pm
