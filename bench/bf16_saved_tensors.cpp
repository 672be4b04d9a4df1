// What keeping a bf16 GeLU expert's saved tensors in bf16 would buy (docs/BENCHMARKS.md, "Fewer
// bytes around the expert GEMMs: measured, not kept"). The engine keeps GeLU's derivative
// (written by the forward, read by the input gradient) and the pre-activation gradient dhpre (written
// by the input gradient, read by its second product and the weight gradients) in fp32, 4 bytes a
// value. Alternatives, written here with the library's own GEMMs and epilogues of the same
// shape as its own, against the library's steps, N experts taking turns (as a layer's local
// experts run: each one's data cold when its turn comes):
//   "GeLU' in bf16":  the forward's first product into a 192-row fp32 scratch, its epilogue writing
//                     the activation and GeLU' in bf16; the input gradient multiplying by the bf16
//                     GeLU' (dhpre fp32 as today);
//   "dhpre in bf16":  the input gradient's first product into a 192-row scratch, its epilogue
//                     writing dhpre = dact * GeLU' (fp32, as kept today) in bf16; the second
//                     product and the weight gradients reading it;
//   "both in bf16":   the same from the bf16 GeLU'.
// With `swiglu` first, SwiGLU experts (a DeepSeek-style layer's, default 32 of 512 rows, M 512,
// H 128), whose forward keeps the pre-activation [rows, 2H] for the backward:
//   "hpre, dhpre in bf16": the forward's first product into a 192-row scratch, the activation made
//                     from it and the pre-activation kept rounded to bf16; the input gradient's
//                     first product into a scratch, SwiGLU's backward from the bf16 pre-activation
//                     writing dhpre in bf16; the second product and the weight gradients reading it.
// Each changes the numerics (an extra bf16 rounding of GeLU', or the bias gradient summed from the
// rounded dhpre), which is why they are measured before being built. Medians of 15 rounds, one
// thread.
//
//   (built with the tree: build/bench/bf16_saved_tensors)
//   build/bench/bf16_saved_tensors [N ROWS M H]          (default 4 1025 512 1024: the PyTorch
//                                                         comparison's experts on one rank)
//   build/bench/bf16_saved_tensors swiglu [N ROWS M H]   (default 32 512 512 128)
#include <immintrin.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <vector>

#include "bench_expert.h"
#include "core/bf16_lanes.h"
#include "core/tensor.h"
#include "kernels/cpu/elementwise.h"
#include "kernels/cpu/expert_ffn.h"
#include "kernels/cpu/fast_math.h"
using namespace pm;

namespace {

int64_t R = 1025, M = 512, H = 1024;  // main's arguments may change them
constexpr int64_t kBlock = 192;       // rows per scratch block, as expert_ffn.cpp's forward
typedef float Lanes __attribute__((vector_size(16 * sizeof(float))));

Activation kind = Activation::gelu;
int64_t H1 = 1024;  // fc1_width(kind, H)

// The library's buffers and, for the variants, a 192-row fp32 scratch, GeLU' (or SwiGLU's
// pre-activation) and dhpre in bf16, with their rows as pointers.
struct Expert : bench::BenchExpert {
  std::vector<float> scratch;
  std::vector<uint16_t> grad16, dh16;
  std::vector<const uint16_t*> grad16_rows, dh16_rows;
  // (the shape from this file's globals: inside the class R, M, H and kind name the base's members)
  explicit Expert(int e) : BenchExpert(e, ::R, ::M, ::H, ::kind), scratch(kBlock * H1), grad16(R * H1), dh16(R * H1) {
    for (int64_t i = 0; i < R; ++i)
      grad16_rows.push_back(grad16.data() + i * H1), dh16_rows.push_back(dh16.data() + i * H1);
  }
};

__m512 as_m512(const Lanes& v) {
  __m512 x;
  std::memcpy(&x, &v, sizeof(x));
  return x;
}
void store_bf16(uint16_t* p, __m512 v) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), floats16_to_bf16(v)); }
__m512 load_bf16(const uint16_t* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  // (the masked forms: the plain ones start from an undefined register, which GCC warns about)
  return _mm512_castsi512_ps(_mm512_maskz_slli_epi32(0xffff, _mm512_maskz_cvtepu16_epi32(0xffff, h), 16));
}

// The forward with GeLU' kept in bf16: GeLU and GeLU' of each finished tile (16-wide vectors,
// three side by side, as elementwise.cpp's gelu_tile_lanes) from the fp32 scratch.
void forward_grad_bf16(Expert& x) {
  for (int64_t r0 = 0; r0 < R; r0 += kBlock) {
    const int64_t n = std::min(kBlock, R - r0);
    float* C = x.scratch.data();
    uint16_t* act = x.act.data() + r0 * H;
    uint16_t* grad = x.grad16.data() + r0 * H;
    TileEpilogue gelu_tile = [&](int64_t r, int64_t c, int64_t rows, int64_t cols) {
      const int64_t vectors = rows * (cols / 16);
      int64_t row = r, col = c;
      for (int64_t v = 0; v < vectors; v += 3) {
        const int m = static_cast<int>(std::min<int64_t>(3, vectors - v));
        std::array<int64_t, 3> at{};
        std::array<Lanes, 3> in{}, g{}, d{};
        for (int k = 0; k < m; ++k) {
          at[k] = row * H + col;
          std::memcpy(&in[k], C + at[k], sizeof(Lanes));
          col += 16;
          if (col == c + cols) col = c, ++row;
        }
        for (int k = 0; k < m; ++k) g[k] = gelu(in[k]);
        for (int k = 0; k < m; ++k) d[k] = gelu_grad(in[k]);
        for (int k = 0; k < m; ++k) store_bf16(act + at[k], as_m512(g[k])), store_bf16(grad + at[k], as_m512(d[k]));
      }
    };
    gemm_packed(Trans::no, n, x.u.data() + r0 * M, M, x.w.w1, 0.0f, C, H, {x.b1.data(), &gelu_tile});
    gemm_packed(Trans::no, n, act, H, x.w.w2, 0.0f, x.y.data() + r0 * M, M, {x.b2.data(), nullptr});
  }
}

__m512 load16(const float* p) { return _mm512_loadu_ps(p); }
__m512 load16(const uint16_t* p) { return load_bf16(p); }

// dhpre[i][c..c+cols) = dact * GeLU' (float or bf16 rows), the next tile's GeLU' rows prefetched
// (as the library's epilogue does), two vectors at a time; into floats or bf16.
template <typename Grad, typename Out>
void times_grad(const float* dact, int64_t ld, const Grad* const* grad, int64_t r, int64_t c, int64_t rows,
                int64_t cols, Out* out, int64_t ld_out) {
  for (int64_t i = r; i < r + rows; ++i) {
    if (i + rows < R)
      for (int64_t j = 0; j < cols; j += 32) __builtin_prefetch(grad[i + rows] + c + j);
    for (int64_t j = 0; j + 32 <= cols; j += 32) {
      const __m512 p0 = _mm512_mul_ps(_mm512_loadu_ps(dact + i * ld + c + j), load16(grad[i] + c + j));
      const __m512 p1 = _mm512_mul_ps(_mm512_loadu_ps(dact + i * ld + c + j + 16), load16(grad[i] + c + j + 16));
      if constexpr (sizeof(Out) == sizeof(float)) {
        _mm512_storeu_ps(out + i * ld_out + c + j, p0);
        _mm512_storeu_ps(out + i * ld_out + c + j + 16, p1);
      } else {
        store_bf16(out + i * ld_out + c + j, p0);
        store_bf16(out + i * ld_out + c + j + 16, p1);
      }
    }
  }
}

void input_grad_grad_bf16(Expert& x) {
  TileEpilogue times = [&](int64_t r, int64_t c, int64_t rows, int64_t cols) {
    times_grad(x.dh.data(), H, x.grad16_rows.data(), r, c, rows, cols, x.dh.data(), H);
  };
  gemm_packed(Trans::no, R, x.dy.data(), M, x.w.w2_t, 0.0f, x.dh.data(), H, {nullptr, &times});
  gemm_packed(Trans::no, R, x.dh.data(), H, x.w.w1_t, 0.0f, x.du.data(), M);
}

// dhpre in bf16 from GeLU' in fp32 (as the forward keeps it today) or in bf16
template <bool GradBf16>
void input_grad_dhpre_bf16(Expert& x) {
  for (int64_t r0 = 0; r0 < R; r0 += kBlock) {
    const int64_t n = std::min(kBlock, R - r0);
    float* C = x.scratch.data();
    TileEpilogue times = [&](int64_t r, int64_t c, int64_t rows, int64_t cols) {
      if constexpr (GradBf16)
        times_grad(C, H, x.grad16_rows.data() + r0, r, c, rows, cols, x.dh16.data() + r0 * H, H);
      else
        times_grad(C, H, x.saved_rows.data() + r0, r, c, rows, cols, x.dh16.data() + r0 * H, H);
    };
    gemm_packed(Trans::no, n, x.dy.data() + r0 * M, M, x.w.w2_t, 0.0f, C, H, {nullptr, &times});
    gemm_packed(Trans::no, n, x.dh16.data() + r0 * H, H, x.w.w1_t, 0.0f, x.du.data() + r0 * M, M);
  }
}

// SwiGLU with the pre-activation kept in bf16 (grad16 holds it here) and dhpre written in bf16.
void swiglu_forward_bf16(Expert& x) {
  for (int64_t r0 = 0; r0 < R; r0 += kBlock) {
    const int64_t n = std::min(kBlock, R - r0);
    float* C = x.scratch.data();
    gemm_packed(Trans::no, n, x.u.data() + r0 * M, M, x.w.w1, 0.0f, C, H1, {x.b1.data(), nullptr});
    for (int64_t i = 0; i < n; ++i) {
      swiglu_forward(C + i * H1, x.act.data() + (r0 + i) * H, H);
      floats_to_bf16(C + i * H1, x.grad16.data() + (r0 + i) * H1, H1);
    }
    gemm_packed(Trans::no, n, x.act.data() + r0 * H, H, x.w.w2, 0.0f, x.y.data() + r0 * M, M, {x.b2.data(), nullptr});
  }
}

void swiglu_input_grad_bf16(Expert& x) {
  std::vector<float> hpre(H1), dhpre(H1);  // one row widened and one made, in L1
  for (int64_t r0 = 0; r0 < R; r0 += kBlock) {
    const int64_t n = std::min(kBlock, R - r0);
    float* C = x.scratch.data();  // dact [n, H]
    gemm_packed(Trans::no, n, x.dy.data() + r0 * M, M, x.w.w2_t, 0.0f, C, H);
    for (int64_t i = 0; i < n; ++i) {
      bf16_to_floats(x.grad16.data() + (r0 + i) * H1, hpre.data(), H1);
      swiglu_backward(hpre.data(), C + i * H, dhpre.data(), H);
      floats_to_bf16(dhpre.data(), x.dh16.data() + (r0 + i) * H1, H1);
    }
    gemm_packed(Trans::no, n, x.dh16.data() + r0 * H1, H1, x.w.w1_t, 0.0f, x.du.data() + r0 * M, M);
  }
}

void weight_grads_dhpre_bf16(Expert& x) {
  gemm_tn_rows_bf16(H, M, R, x.act_rows.data(), x.dy_rows.data(), 1.0f, x.gw2.data(), M, x.gb2.data());
  gemm_tn_rows_bf16(M, H1, R, x.u_rows.data(), x.dh16_rows.data(), 1.0f, x.gw1.data(), H1, x.gb1.data());
}

}  // namespace

int main(int argc, char** argv) {
  int n = 4;
  int arg = 1;
  if (argc > 1 && std::strcmp(argv[1], "swiglu") == 0) kind = Activation::swiglu, n = 32, R = 512, H = 128, arg = 2;
  if (argc - arg == 4)
    n = std::atoi(argv[arg]), R = std::atoll(argv[arg + 1]), M = std::atoll(argv[arg + 2]), H = std::atoll(argv[arg + 3]);
  if ((argc - arg != 0 && argc - arg != 4) || n < 1 || R < 1 || M < 32 || H < 32 || M % 32 || H % 32) {
    std::fprintf(stderr, "usage: %s [swiglu] [N ROWS M H]  (M, H multiples of 32)\n", argv[0]);
    return 2;
  }
  H1 = fc1_width(kind, H);
  std::vector<std::unique_ptr<Expert>> experts;
  for (int e = 0; e < n; ++e) experts.push_back(std::make_unique<Expert>(e));
  auto forward = [](Expert& x) { x.forward(); };
  auto input_grad = [](Expert& x) { x.input_gradient(); };
  auto weight_grads = [](Expert& x) { x.weight_gradients(); };
  const bool swiglu = kind == Activation::swiglu;
  for (auto& x : experts) {
    forward(*x), input_grad(*x);
    if (swiglu)
      swiglu_forward_bf16(*x), swiglu_input_grad_bf16(*x);
    else
      forward_grad_bf16(*x), input_grad_dhpre_bf16<true>(*x);
  }
  auto time = [&](auto step) {
    const auto start = std::chrono::steady_clock::now();
    for (auto& x : experts) step(*x);
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() * 1e3 / n;
  };
  std::printf("%d bf16 %s experts of %lld rows, M %lld, H %lld, in turn, one thread: ms per expert\n", n,
              swiglu ? "SwiGLU" : "GeLU", static_cast<long long>(R), static_cast<long long>(M),
              static_cast<long long>(H));
  std::printf("%-18s %9s %20s %9s %7s\n", "step", "today", "variant", "ms", "ratio");
  auto row = [&](const char* step, auto today, const char* variant, auto other) {
    std::vector<double> a, b;
    for (int round = 0; round < 15; ++round) a.push_back(time(today)), b.push_back(time(other));
    std::sort(a.begin(), a.end());
    std::sort(b.begin(), b.end());
    std::printf("%-18s %9.3f %20s %9.3f %6.3fx\n", step, a[7], variant, b[7], b[7] / a[7]);
  };
  if (swiglu) {
    row("forward", forward, "hpre, dhpre in bf16", swiglu_forward_bf16);
    row("input gradient", input_grad, "hpre, dhpre in bf16", swiglu_input_grad_bf16);
    row("weight gradients", weight_grads, "hpre, dhpre in bf16", weight_grads_dhpre_bf16);
    return 0;
  }
  row("forward", forward, "GeLU' in bf16", forward_grad_bf16);
  row("input gradient", input_grad, "GeLU' in bf16", input_grad_grad_bf16);
  row("input gradient", input_grad, "dhpre in bf16", input_grad_dhpre_bf16<false>);
  row("input gradient", input_grad, "both in bf16", input_grad_dhpre_bf16<true>);
  row("weight gradients", weight_grads, "dhpre in bf16", weight_grads_dhpre_bf16);
  return 0;
}
