#include "moe/row_buffer.h"

namespace pm {
namespace {

template <typename Vector>
void give_back(Vector& buffer) {
  Vector(buffer.get_allocator()).swap(buffer);
}

}  // namespace

void RowBuffer::resize(int64_t rows, int64_t width, Precision precision) {
  precision_ = precision;
  width_ = width;
  // only the type in use holds memory
  if (precision == Precision::bf16) {
    give_back(f32_);
    bf16_.resize(rows * width);
  } else {
    give_back(bf16_);
    f32_.resize(rows * width);
  }
}

RowsIn RowBuffer::in(int64_t i) const {
  if (precision_ == Precision::bf16) return bf16_.data() + i * width_;
  return f32_.data() + i * width_;
}

RowsOut RowBuffer::out(int64_t i) {
  if (precision_ == Precision::bf16) return bf16_.data() + i * width_;
  return f32_.data() + i * width_;
}

void RowBuffer::copy_rows_from(Backend& backend, RowsIn src, const std::vector<RowRun>& runs) {
  backend.copy_rows(src, out(0), width_, runs);
}

void RowBuffer::copy_scaled_rows_from(Backend& backend, const float* src, const std::vector<RowRun>& runs,
                                      const float* scale) {
  backend.copy_rows_scaled(src, out(0), width_, runs, scale);
}

void RowBuffer::release() {
  give_back(f32_);
  give_back(bf16_);
}

void RowBuffer::add_rows(const std::vector<int64_t>& positions, std::vector<const float*>& f32,
                         std::vector<const uint16_t*>& bf16) const {
  for (int64_t p : positions) {
    if (precision_ == Precision::bf16)
      bf16.push_back(bf16_.data() + p * width_);
    else
      f32.push_back(f32_.data() + p * width_);
  }
}

int64_t RowBuffer::bytes() const {
  return static_cast<int64_t>(f32_.size() * sizeof(float) + bf16_.size() * sizeof(uint16_t));
}

}  // namespace pm
