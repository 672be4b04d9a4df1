// A row-major matrix transposed into another, in square blocks.
#pragma once

#include <algorithm>
#include <cstdint>

namespace pm {

// dst[c * ldd + r] = src[r * lds + c] for r < rows, c < cols: src's rows lds apart, dst's ldd. In
// blocks of 16 x 16: a plain loop writes one column of dst per step, ldd*4 bytes apart, and where
// that stride is a multiple of 2 KB (a router's 512 model values) the lines it keeps open share two
// of L1's 64 sets and evict each other (a router's [512, 64] weights: 0.27 ms a pass plain).
inline void transpose(const float* src, int64_t lds, int64_t rows, int64_t cols, float* dst, int64_t ldd) {
  constexpr int64_t kBlock = 16;
  for (int64_t r0 = 0; r0 < rows; r0 += kBlock)
    for (int64_t c0 = 0; c0 < cols; c0 += kBlock) {
      const int64_t r1 = std::min(rows, r0 + kBlock), c1 = std::min(cols, c0 + kBlock);
      for (int64_t c = c0; c < c1; ++c)
        for (int64_t r = r0; r < r1; ++r) dst[c * ldd + r] = src[r * lds + c];
    }
}

// dst[c, r] = src[r, c] for src [rows, cols] (dst [cols, rows]).
inline void transpose(const float* src, int64_t rows, int64_t cols, float* dst) {
  transpose(src, cols, rows, cols, dst, rows);
}

}  // namespace pm
