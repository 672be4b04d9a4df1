// Where a bf16 GEMM of the layer's shape loses against its own inner loop: the AVX512_BF16 6 x 64
// loop (kernel_avx512_bf16's, copied here) run over the same product with what the library's GEMM
// adds to it put back one at a time, then the library's gemm_packed itself, one thread, medians of
// 12 interleaved rounds, against vdpbf16ps's ceiling (independent chains, no memory) measured in the
// same rounds (docs/BENCHMARKS.md, "The bf16 GEMM against its own loop"):
//
//   loop: B's words in one stream, A packed   the kernel's arithmetic and loads, B from L2
//   + B as packed                             B's words laid out as pack_b_bf16 lays them out
//   + A's rows in place                       A's bf16 rows read by six pointers, not packed
//   + C into the matrix                       each tile stored into C (rows N apart), not a scratch tile
//   + C fetched ahead                         C's tile two tiles down, and this tile's rows in the
//                                             next panel, fetched as gemm.cpp's tile loop does
//   gemm_packed                               the library (A packed or in place as it chooses)
//
// Build with the tree (build/bench/gemm_loop_parts) or by hand:
//   g++ -O3 -march=native -std=c++20 -ffp-contract=off -Isrc bench/gemm_loop_parts.cpp -o /tmp/gemm_loop_parts
//       -Lbuild/src -lpipemoe_kernels -lpipemoe_core -lfmt -lpthread -lopenblas   (one line)
//   build/bench/gemm_loop_parts [ROWS N K]   (default 1025 1024 512: an expert's
//       first forward product in the PyTorch comparison's layer; 1025 512 1024 its second)
#include <immintrin.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "bench_timing.h"
#include "kernels/cpu/fetch_ahead.h"
#include "kernels/cpu/gemm.h"
#include "kernels/cpu/thread_pool.h"
using namespace pm;

namespace {

struct PackedWords {  // A packed: [pairs][6] words per micro-panel
  const uint32_t* words;
  uint32_t at(int64_t q, int i) const { return words[q * 6 + i]; }
};
struct SixRows {  // A's bf16 rows in place: row i's pair q is its word q
  const uint16_t* row[6];
  uint32_t at(int64_t q, int i) const {
    uint32_t word;
    std::memcpy(&word, row[i] + 2 * q, sizeof(word));
    return word;
  }
};

// kernel_avx512_bf16<6, 4> (gemm_bf16.cpp) with a zero start
template <typename ARead>
__attribute__((target("avx512f,avx512bf16"), noinline)) void loop_6x64(int64_t pairs, const ARead A, const uint32_t* Bp,
                                                                       int64_t pair_step, int64_t group_step, float* C,
                                                                       int64_t ldc) {
  __m512 c[6][4];
  for (int i = 0; i < 6; ++i)
    for (int v = 0; v < 4; ++v) c[i][v] = _mm512_setzero_ps();
  for (int64_t q0 = 0; q0 < pairs; q0 += 16) {
    const uint32_t* block = Bp + q0 * 64;
    const int64_t n = std::min<int64_t>(16, pairs - q0);
    for (int64_t l = 0; l < n; ++l, block += pair_step) {
      __m512bh b[4];
      for (int v = 0; v < 4; ++v) b[v] = (__m512bh)_mm512_loadu_si512(block + group_step * v);
      for (int i = 0; i < 6; ++i) {
        const __m512bh a = (__m512bh)_mm512_set1_epi32(static_cast<int>(A.at(q0 + l, i)));
        for (int v = 0; v < 4; ++v) c[i][v] = _mm512_dpbf16_ps(c[i][v], a, b[v]);
      }
    }
  }
  for (int i = 0; i < 6; ++i)
    for (int v = 0; v < 4; ++v) _mm512_storeu_ps(C + i * ldc + 16 * v, c[i][v]);
}

// vdpbf16ps's ceiling: 24 independent chains, operands in registers; GFLOP/s
__attribute__((target("avx512f,avx512bf16"), noinline)) double dot_ceiling() {
  constexpr long kSteps = 20'000'000;
  __m512 c[24];
  for (auto& x : c) x = _mm512_setzero_ps();
  __m512bh a = (__m512bh)_mm512_set1_epi32(0x3f803f80), b = a;
  const auto start = std::chrono::steady_clock::now();
  for (long s = 0; s < kSteps; ++s) {
#pragma GCC unroll 24
    for (int i = 0; i < 24; ++i) c[i] = _mm512_dpbf16_ps(c[i], a, b);
    asm volatile("" : "+v"(a), "+v"(b));
  }
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  for (auto& x : c) asm volatile("" : : "v"(x));  // the chains' results used
  return kSteps * 24.0 * 64 / seconds / 1e9;
}

struct Part {
  std::string name;
  std::function<void()> fn;
};

}  // namespace

int main(int argc, char** argv) {
  if (!__builtin_cpu_supports("avx512bf16")) {
    std::printf("this CPU has no AVX512_BF16: nothing to time\n");
    return 0;
  }
  set_compute_threads(1);  // the loops run on one thread
  const int64_t R = argc > 3 ? std::atol(argv[1]) : 1025, N = argc > 3 ? std::atol(argv[2]) : 1024,
                K = argc > 3 ? std::atol(argv[3]) : 512;
  if (R < 6 || N % 64 != 0 || K % 32 != 0) {
    std::fprintf(stderr, "usage: gemm_loop_parts [ROWS N K] (ROWS >= 6, N a multiple of 64, K of 32)\n");
    return 2;
  }
  const int64_t pairs = K / 2, tiles = R / 6 * 6, panels = N / 64;  // the loops run the whole 6-row tiles
  std::vector<uint16_t> a16(R * K);
  std::vector<float> b(K * N), c(R * N);
  for (size_t i = 0; i < a16.size(); ++i) a16[i] = static_cast<uint16_t>(0x3c00 + i % 97);
  for (size_t i = 0; i < b.size(); ++i) b[i] = 0.01f * static_cast<float>(i % 13) - 0.06f;
  PackedB packed;
  pack_b_bf16(Trans::no, K, N, b.data(), N, packed);
  if (packed.pairs.empty()) {
    std::printf("bf16 GEMMs here do not run the AVX512_BF16 kernel (%s): nothing to compare\n", gemm_bf16_path().c_str());
    return 0;
  }
  std::vector<uint32_t> a_words(tiles * pairs), b_stream(panels * pairs * 64);
  for (int64_t r = 0; r < tiles; r += 6)  // A packed as the library packs it: [pairs][6] per micro-panel
    for (int64_t q = 0; q < pairs; ++q)
      for (int i = 0; i < 6; ++i) std::memcpy(&a_words[r * pairs + q * 6 + i], &a16[(r + i) * K + 2 * q], 4);
  for (int64_t p = 0; p < panels; ++p)  // B's words in one stream per panel: [pairs][64]
    for (int64_t q = 0; q < pairs; ++q)
      for (int64_t j = 0; j < 64; ++j)
        b_stream[(p * pairs + q) * 64 + j] = packed.pair_panel(p)[packed.pair_word_offset(64, q, j)];
  alignas(64) static float scratch[6 * 64];
  const int64_t ps = packed.pair_step(64), gs = packed.group_step();
  auto six_rows = [&](int64_t r) {
    SixRows a;
    for (int i = 0; i < 6; ++i) a.row[i] = &a16[(r + i) * K];
    return a;
  };
  // step: 0 the loop, 1 + B as packed, 2 + A in place, 3 + C into the matrix, 4 + C fetched ahead
  auto loop = [&](int step) {
    for (int64_t p = 0; p < panels; ++p)
      for (int64_t r = 0; r < tiles; r += 6) {
        float* ct = step >= 3 ? &c[r * N + p * 64] : scratch;
        const int64_t ldc = step >= 3 ? N : 64;
        if (step >= 4) {
          if (r + 12 < tiles)
            for (int i = 0; i < 6; ++i)
              for (int j = 0; j < 64; j += 16) fetch_into_l1(&c[(r + 12 + i) * N + p * 64 + j]);
          if (p + 1 < panels)
            for (int i = 0; i < 6; ++i)
              for (int j = 0; j < 64; j += 16) fetch_into_l2(&c[(r + i) * N + (p + 1) * 64 + j]);
        }
        if (step == 0)
          loop_6x64(pairs, PackedWords{&a_words[r * pairs]}, &b_stream[p * pairs * 64], 64, 16, ct, ldc);
        else if (step == 1)
          loop_6x64(pairs, PackedWords{&a_words[r * pairs]}, packed.pair_panel(p), ps, gs, ct, ldc);
        else
          loop_6x64(pairs, six_rows(r), packed.pair_panel(p), ps, gs, ct, ldc);
      }
  };
  const std::vector<Part> parts = {
      {"loop (B one stream, A packed)", [&] { loop(0); }},
      {"+ B as packed", [&] { loop(1); }},
      {"+ A's rows in place", [&] { loop(2); }},
      {"+ C into the matrix", [&] { loop(3); }},
      {"+ C fetched ahead", [&] { loop(4); }},
      {"gemm_packed", [&] { gemm_packed(Trans::no, R, a16.data(), K, packed, 0.0f, c.data(), N); }},
  };
  constexpr int kRounds = 12, kCalls = 10;
  std::vector<std::vector<double>> rate(parts.size());
  std::vector<double> ceiling;
  for (int round = 0; round < kRounds; ++round) {
    ceiling.push_back(dot_ceiling());
    for (size_t i = 0; i < parts.size(); ++i) {
      // the loops compute the whole tiles only; gemm_packed every row
      const double flops = 2.0 * (i + 1 == parts.size() ? R : tiles) * N * K * kCalls;
      const double ms = bench::ms_of([&] {
        for (int call = 0; call < kCalls; ++call) parts[i].fn();
      });
      rate[i].push_back(flops / ms / 1e6);
    }
  }
  const double loop_rate = bench::median(rate[0]), ceiling_rate = bench::median(ceiling);
  std::printf("bf16 GEMM %lld x %lld x %lld (rows x N x K), one thread; medians of %d interleaved rounds\n",
              static_cast<long long>(R), static_cast<long long>(N), static_cast<long long>(K), kRounds);
  std::printf("%-32s %9s %9s %10s\n", "", "GFLOP/s", "of loop", "of ceiling");
  std::printf("%-32s %9.1f %9s %9.1f%%\n", "vdpbf16ps ceiling", ceiling_rate, "", 100.0);
  for (size_t i = 0; i < parts.size(); ++i) {
    const double g = bench::median(rate[i]);
    std::printf("%-32s %9.1f %8.1f%% %9.1f%%\n", parts[i].name.c_str(), g, 100 * g / loop_rate, 100 * g / ceiling_rate);
  }
  return 0;
}
