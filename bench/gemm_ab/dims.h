// The expert shape bench/gemm_ab.sh times: GEMM_AB_SHAPE=ROWS,M,H (environment), default the
// layer's 1025,512,1024. A fine-grained SwiGLU expert, e.g. 520,512,256 (u W1 is M x 2H) and
// 520,512,128 (a W2 is H x M), covers DeepSeek-style experts' products.
#pragma once
#include <cstdint>
#include <cstdio>
#include <cstdlib>

struct GemmAbDims {
  int64_t R = 1025, M = 512, H = 1024;
};

inline GemmAbDims gemm_ab_dims() {
  GemmAbDims d;
  if (const char* s = std::getenv("GEMM_AB_SHAPE")) {
    long long r, m, h;
    if (std::sscanf(s, "%lld,%lld,%lld", &r, &m, &h) != 3 || r <= 0 || m <= 0 || h <= 0) {
      std::fprintf(stderr, "gemm_ab: GEMM_AB_SHAPE must be ROWS,M,H (positive), got '%s'\n", s);
      std::exit(2);
    }
    d = {r, m, h};
  }
  return d;
}
