#include "core/tensor.h"

#include <cstdlib>
#include <cstring>
#include <numeric>

#include "core/aligned.h"
#include "core/bf16_lanes.h"

namespace pm {

namespace {
std::atomic<uint64_t> next_version{1};
}  // namespace

void Tensor::mark_changed() {
  if (version_) version_->store(next_version.fetch_add(1, std::memory_order_relaxed), std::memory_order_relaxed);
}

std::size_t dtype_size(DType dtype) {
  switch (dtype) {
    case DType::f32: return 4;
    case DType::f64: return 8;
    case DType::bf16: return 2;
    case DType::i32: return 4;
    case DType::i64: return 8;
    case DType::u8: return 1;
  }
  return 0;
}

const char* dtype_name(DType dtype) {
  switch (dtype) {
    case DType::f32: return "float32";
    case DType::f64: return "float64";
    case DType::bf16: return "bfloat16";
    case DType::i32: return "int32";
    case DType::i64: return "int64";
    case DType::u8: return "uint8";
  }
  return "?";
}

int64_t shape_numel(const Shape& shape) {
  return std::accumulate(shape.begin(), shape.end(), int64_t{1}, std::multiplies<>());
}

std::string shape_str(const Shape& shape) {
  std::string s = "[";
  for (std::size_t i = 0; i < shape.size(); ++i) {
    if (i) s += ',';
    s += std::to_string(shape[i]);
  }
  return s + "]";
}

Tensor Tensor::empty(Shape shape, DType dtype) {
  for (int64_t d : shape) PM_CHECK(d >= 0, "negative dimension in shape {}", shape_str(shape));
  const std::size_t bytes = static_cast<std::size_t>(shape_numel(shape)) * dtype_size(dtype);
  void* p = allocate_aligned(bytes);
  PM_CHECK(p != nullptr, "out of memory allocating {} bytes", bytes);
  return owning(std::shared_ptr<void>(p, std::free), std::move(shape), dtype);
}

Tensor Tensor::owning(std::shared_ptr<void> storage, Shape shape, DType dtype) {
  Tensor t;
  t.shape_ = std::move(shape);
  t.dtype_ = dtype;
  t.data_ = storage.get();
  t.storage_ = std::move(storage);
  t.version_ = std::make_shared<std::atomic<uint64_t>>(next_version.fetch_add(1, std::memory_order_relaxed));
  return t;
}

Tensor Tensor::zeros(Shape shape, DType dtype) {
  for (int64_t d : shape) PM_CHECK(d >= 0, "negative dimension in shape {}", shape_str(shape));
  const std::size_t bytes = static_cast<std::size_t>(shape_numel(shape)) * dtype_size(dtype);
  if (bytes < kZeroPagesFrom) {
    Tensor t = empty(std::move(shape), dtype);
    t.zero();
    return t;
  }
  // the kernel's zero pages, backed as they are written: a gradient never written (an inference
  // model's) costs no memory, and no time clearing it
  void* p = allocate_zero_pages(bytes);
  PM_CHECK(p != nullptr, "out of memory allocating {} bytes", bytes);
  return owning(std::shared_ptr<void>(p, [bytes](void* q) { free_zero_pages(q, bytes); }), std::move(shape), dtype);
}

Tensor Tensor::view_of(void* data, Shape shape, DType dtype) {
  Tensor t;
  t.data_ = data;
  t.shape_ = std::move(shape);
  t.dtype_ = dtype;
  return t;
}

int64_t Tensor::dim(int i) const {
  PM_CHECK(i >= 0 && i < ndim(), "dimension {} of a {}-d tensor", i, ndim());
  return shape_[i];
}

Tensor Tensor::reshape(Shape shape) const {
  PM_CHECK(shape_numel(shape) == numel(), "cannot reshape {} to {}", shape_str(shape_),
           shape_str(shape));
  Tensor t = *this;
  t.shape_ = std::move(shape);
  return t;
}

Tensor Tensor::rows(int64_t begin, int64_t end) const {
  PM_CHECK(ndim() >= 1 && 0 <= begin && begin <= end && end <= shape_[0],
           "rows [{}, {}) of a tensor of shape {}", begin, end, shape_str(shape_));
  Tensor t = *this;
  int64_t row_elems = shape_[0] == 0 ? 0 : numel() / shape_[0];
  t.data_ = static_cast<char*>(data_) + begin * row_elems * dtype_size(dtype_);
  t.shape_[0] = end - begin;
  return t;
}

Tensor Tensor::clone() const {
  Tensor t = empty(shape_, dtype_);
  if (nbytes()) std::memcpy(t.data_, data_, nbytes());
  return t;
}

Tensor Tensor::to(DType dtype) const {
  if (dtype == dtype_) return clone();
  Tensor t = empty(shape_, dtype);
  int64_t n = numel();
  if (dtype_ == DType::f32 && dtype == DType::bf16) {
    floats_to_bf16(data<float>(), t.data<uint16_t>(), n);
  } else if (dtype_ == DType::bf16 && dtype == DType::f32) {
    bf16_to_floats(data<uint16_t>(), t.data<float>(), n);
  } else {
    PM_CHECK(false, "no conversion from {} to {}", dtype_name(dtype_), dtype_name(dtype));
  }
  return t;
}

void Tensor::fill(float value) {
  float* p = f32();
  for (int64_t i = 0, n = numel(); i < n; ++i) p[i] = value;
}

void Tensor::zero() {
  mark_changed();
  if (nbytes()) std::memset(data_, 0, nbytes());
}


bool VersionStamp::changed(std::initializer_list<const Tensor*> tensors) {
  bool changed = versions_.size() != tensors.size();
  versions_.resize(tensors.size());
  std::size_t i = 0;
  for (const Tensor* t : tensors) {
    const uint64_t v = t->version();
    changed = changed || v == 0 || v != versions_[i];
    versions_[i++] = v;
  }
  return changed;
}

namespace {

// dst[i] = float_to_bf16(src[i]), or of scale * src[i] (Scaled), 16 at a time where AVX-512 is.
template <bool Scaled>
void round_into_bf16(const float* src, uint16_t* dst, int64_t n, float scale) {
  int64_t i = 0;
#if defined(__AVX512F__) && !defined(__CUDACC__)
  const __m512 s = _mm512_set1_ps(scale);
  for (; i + 16 <= n; i += 16) {
    const __m512 v = Scaled ? _mm512_mul_ps(s, _mm512_loadu_ps(src + i)) : _mm512_loadu_ps(src + i);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i), floats16_to_bf16(v));
  }
#endif
  for (; i < n; ++i) dst[i] = float_to_bf16(Scaled ? scale * src[i] : src[i]);
}

}  // namespace

void floats_to_bf16(const float* src, uint16_t* dst, int64_t n) { round_into_bf16<false>(src, dst, n, 1.0f); }

void scaled_floats_to_bf16(float scale, const float* src, uint16_t* dst, int64_t n) {
  round_into_bf16<true>(src, dst, n, scale);
}

void bf16_to_floats(const uint16_t* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = bf16_to_float(src[i]);
}

}  // namespace pm
