// Tensor: a shape, a dtype, a device and a pointer into a shared buffer (owning) or into memory
// the caller keeps alive (a view). Contiguous row-major only: every kernel here is written for it.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <memory>
#include <string>
#include <vector>

#include "core/error.h"

namespace pm {

enum class DType : uint8_t { f32, f64, bf16, i32, i64, u8 };
enum class Device : uint8_t { cpu, cuda };

std::size_t dtype_size(DType dtype);
const char* dtype_name(DType dtype);

using Shape = std::vector<int64_t>;
int64_t shape_numel(const Shape& shape);
std::string shape_str(const Shape& shape);

template <typename T>
constexpr DType dtype_of();
template <> constexpr DType dtype_of<float>() { return DType::f32; }
template <> constexpr DType dtype_of<double>() { return DType::f64; }
template <> constexpr DType dtype_of<int32_t>() { return DType::i32; }
template <> constexpr DType dtype_of<int64_t>() { return DType::i64; }
template <> constexpr DType dtype_of<uint8_t>() { return DType::u8; }
template <> constexpr DType dtype_of<uint16_t>() { return DType::bf16; }  // bf16 storage

class Tensor {
 public:
  Tensor() = default;
  static Tensor empty(Shape shape, DType dtype = DType::f32);
  static Tensor zeros(Shape shape, DType dtype = DType::f32);
  // Wraps memory owned by the caller; no copy. The caller keeps it alive while the view is used.
  static Tensor view_of(void* data, Shape shape, DType dtype = DType::f32);

  bool defined() const { return data_ != nullptr || numel() == 0; }
  const Shape& shape() const { return shape_; }
  int ndim() const { return static_cast<int>(shape_.size()); }
  int64_t dim(int i) const;
  int64_t numel() const { return shape_numel(shape_); }
  std::size_t nbytes() const { return static_cast<std::size_t>(numel()) * dtype_size(dtype_); }
  DType dtype() const { return dtype_; }
  Device device() const { return device_; }
  bool owns_memory() const { return storage_ != nullptr; }

  // Every mutable access (raw(), data(), f32(), fill(), zero(), mark_changed()) counts as a
  // change of the values: it gives the memory a new version. Const access does not.
  void* raw() {
    mark_changed();
    return data_;
  }
  const void* raw() const { return data_; }
  template <typename T>
  T* data() {
    PM_CHECK(dtype_ == dtype_of<T>(), "tensor holds {}, not the requested type", dtype_name(dtype_));
    mark_changed();
    return static_cast<T*>(data_);
  }
  template <typename T>
  const T* data() const {
    PM_CHECK(dtype_ == dtype_of<T>(), "tensor holds {}, not the requested type", dtype_name(dtype_));
    return static_cast<const T*>(data_);
  }
  float* f32() { return data<float>(); }
  const float* f32() const { return data<float>(); }

  Tensor reshape(Shape shape) const;             // same buffer, same numel
  Tensor rows(int64_t begin, int64_t end) const;  // view of [begin, end) along dim 0
  Tensor clone() const;                          // owning deep copy
  Tensor to(DType dtype) const;                  // f32 <-> bf16 (round to nearest even)
  void fill(float value);
  void zero();

  // The version of the values (PyTorch's _version, for the same purpose): anything derived from
  // them, such as weights packed for the GEMMs, stays valid while the version is the one it was
  // derived from. Unique in the process (a new number per change and per tensor, so that another
  // tensor never shows a version seen before), shared by every copy and view of the same memory.
  // 0 for views of caller memory, whose changes nobody sees: derive again every time.
  uint64_t version() const { return version_ ? version_->load(std::memory_order_relaxed) : 0; }
  void mark_changed();

 private:
  // A tensor owning `storage` (its first byte the data), with a version of its own.
  static Tensor owning(std::shared_ptr<void> storage, Shape shape, DType dtype);

  std::shared_ptr<void> storage_;  // null for views of caller memory
  std::shared_ptr<std::atomic<uint64_t>> version_;  // with storage_
  void* data_ = nullptr;
  Shape shape_;
  DType dtype_ = DType::f32;
  Device device_ = Device::cpu;
};

// The versions of a few tensors at one moment, for whatever was derived from their values then:
//   if (stamp.changed({&w1, &w2})) repack();   // the first time, and after any change since
// A view of caller memory (version 0) always counts as changed.
class VersionStamp {
 public:
  // Whether any of `tensors` changed since the last call (true on the first call, or when the
  // list differs); remembers their versions now.
  bool changed(std::initializer_list<const Tensor*> tensors);
  void clear() { versions_.clear(); }

 private:
  std::vector<uint64_t> versions_;
};

// bfloat16: the upper half of a float32, rounded to nearest even; NaN stays NaN. Inline, so that
// loops over rows of them vectorise.
inline uint16_t float_to_bf16(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, 4);
  if ((bits & 0x7f800000u) == 0x7f800000u && (bits & 0x007fffffu)) return 0x7fc0;  // NaN
  uint32_t rounding = 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>((bits + rounding) >> 16);
}

inline float bf16_to_float(uint16_t value) {
  uint32_t bits = static_cast<uint32_t>(value) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// The float32 nearest to `value` that bf16 can hold (the value a bf16 round trip gives).
inline float round_to_bf16(float value) { return bf16_to_float(float_to_bf16(value)); }

// n values at a time (loops the compiler vectorises).
void floats_to_bf16(const float* src, uint16_t* dst, int64_t n);
// dst[i] = float_to_bf16(scale * src[i]): the bits of scaling into floats, then rounding.
void scaled_floats_to_bf16(float scale, const float* src, uint16_t* dst, int64_t n);
void bf16_to_floats(const uint16_t* src, float* dst, int64_t n);

}  // namespace pm
