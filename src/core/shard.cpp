#include "core/shard.h"

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "core/error.h"

namespace pm {
namespace {

// Calls f(whole offset, slice offset, floats) for every run of consecutive floats the two share.
template <typename F>
void each_run(const Shape& slice, int dim, const std::vector<int>& parts, int place, int places, F&& f) {
  PM_CHECK(dim >= 0 && dim < static_cast<int>(slice.size()), "shard dim {} of a {}-d tensor", dim, slice.size());
  const int64_t n = slice[dim];
  int64_t total = 0;
  for (int p : parts) {
    PM_CHECK(p >= 1, "a shard's part of size {}", p);
    total += p;
  }
  PM_CHECK(!parts.empty() && n % total == 0 && place >= 0 && place < places,
           "shard of {} in parts of {} in all, place {} of {}", n, total, place, places);
  int64_t outer = 1, inner = 1;
  for (int d = 0; d < dim; ++d) outer *= slice[d];
  for (std::size_t d = dim + 1; d < slice.size(); ++d) inner *= slice[d];
  const int64_t unit = n / total;  // the slice's width of a part of proportion 1
  for (int64_t o = 0; o < outer; ++o) {
    int64_t before = 0;  // the slice's columns of the parts before this one
    for (int p : parts) {
      const int64_t piece = p * unit;
      f((o * n + before) * places * inner + place * piece * inner, (o * n + before) * inner, piece * inner);
      before += piece;
    }
  }
}

}  // namespace

Shape whole_shape(const Shape& slice, int dim, int places) {
  Shape s = slice;
  s[dim] *= places;
  return s;
}

ShardSpan shard_span(const Shape& slice, int dim, const std::vector<int>& parts, int place, int places) {
  ShardSpan span{INT64_MAX, 0};
  each_run(slice, dim, parts, place, places, [&](int64_t at_whole, int64_t, int64_t n) {
    span.first = std::min(span.first, at_whole), span.end = std::max(span.end, at_whole + n);
  });
  return span.end > 0 ? span : ShardSpan{};
}

void take_shard_from(const float* window, int64_t first, Tensor& slice, int dim, const std::vector<int>& parts,
                     int place, int places) {
  float* s = slice.f32();
  each_run(slice.shape(), dim, parts, place, places, [&](int64_t at_whole, int64_t at_slice, int64_t n) {
    PM_CHECK(at_whole >= first, "a slice's run at {} before its window at {}", at_whole, first);
    std::memcpy(s + at_slice, window + (at_whole - first), n * sizeof(float));
  });
}

void take_shard(const Tensor& whole, Tensor& slice, int dim, const std::vector<int>& parts, int place, int places) {
  PM_CHECK(whole.shape() == whole_shape(slice.shape(), dim, places), "a slice of {} from {}", shape_str(slice.shape()),
           shape_str(whole.shape()));
  take_shard_from(whole.f32(), 0, slice, dim, parts, place, places);
}

void put_shard(const Tensor& slice, Tensor& whole, int dim, const std::vector<int>& parts, int place, int places) {
  PM_CHECK(whole.shape() == whole_shape(slice.shape(), dim, places), "a slice of {} into {}", shape_str(slice.shape()),
           shape_str(whole.shape()));
  const float* s = slice.f32();
  float* w = whole.f32();
  each_run(slice.shape(), dim, parts, place, places,
           [&](int64_t at_whole, int64_t at_slice, int64_t n) { std::memcpy(w + at_whole, s + at_slice, n * sizeof(float)); });
}

}  // namespace pm
