#include "kernels/cpu/rope.h"

namespace pm {

void rope_rotate(float* x, int64_t rows, int64_t ld, int64_t width, int64_t hd, const int64_t* pos, int64_t S,
                 const float* cos, const float* sin, bool inverse) {
  const int64_t half = hd / 2;
  for (int64_t t = 0; t < rows; ++t) {
    const int64_t p = pos ? pos[t] : t % S;
    const float* c = cos + p * half;
    const float* s = sin + p * half;
    float* row = x + t * ld;
    for (int64_t at = 0; at < width; at += hd) {  // every head
      float* head = row + at;
      for (int64_t i = 0; i < half; ++i) {
        const float a = head[i], b = head[i + half];
        const float sn = inverse ? -s[i] : s[i];
        head[i] = a * c[i] - b * sn;
        head[i + half] = b * c[i] + a * sn;
      }
    }
  }
}

}  // namespace pm
