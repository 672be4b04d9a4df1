// How fast AMX's tile products run in the loop shapes a GEMM kernel can take, every operand in L1
// (a few KB, loaded over and over): no loads at all (the ceiling), C as 2 x 2 tiles with A and B
// reloaded into the same four registers each depth step (kernels/cpu/gemm_amx.cpp's loop), C as
// 1 x 2 or 2 x 1 tiles with two sets of operand registers used in turn, and C as 2 x 2 tiles with
// only A reloaded. Prints GFLOP/s and the share of the ceiling, medians of 7 rounds, one thread
// (docs/BENCHMARKS.md, "AMX's tile loop, looked at").
//
// What it showed on this project's Emerald Rapids Xeon (2026-12-06, 05:25-05:31 UTC): the ceiling
// itself moved between 1.2 and 2.8 TFLOP/s per thread from one minute to the next (the host's AMX
// unit, not ours), and the loops with it. At times every loop ran at the ceiling; at others the
// 2 x 2 loop ran at 58-60% of it, 2 x 2 reloading only A at 73-78%, and the double-buffered loops at
// 51-54%: each tile load then cost about 10 cycles that the products did not hide, and fewer loads
// per product, not more registers, was what helped.
//
//   (built with the tree: build/bench/amx_loops; exits 0 with a note on a CPU without AMX)
#include <immintrin.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <vector>

#include "kernels/cpu/gemm_internal.h"

using pm::gemm_detail::configure_tiles_on_this_thread;
using pm::gemm_detail::cpu_has_amx;

namespace {

constexpr int kSteps = 32;          // depth steps per pass: 32 KB of A and B tiles, in L1
constexpr long kProducts = 1 << 22;  // tile products per timing

// Operand tiles of 1 KB: two A and two B tiles per depth step, zeros (no overflow however long).
alignas(64) uint32_t A[2][kSteps][256], B[2][kSteps][256];
alignas(64) float sink[1024];

enum Shape { ceiling, two_by_two, one_by_two_double, two_by_one_double, two_by_two_a_only, kShapes };
const char* kNames[kShapes] = {"no loads (ceiling)", "2x2 C, A and B reloaded", "1x2 C, operands double-buffered",
                               "2x1 C, operands double-buffered", "2x2 C, only A reloaded"};
const int kProductsPerPass[kShapes] = {4 * kSteps, 4 * kSteps, 2 * kSteps, 2 * kSteps, 4 * kSteps};

__attribute__((target("amx-tile,amx-bf16"))) void pass(Shape shape) {
  _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
  switch (shape) {
    case ceiling:
      for (int q = 0; q < kSteps; ++q) {
        _tile_dpbf16ps(0, 4, 6); _tile_dpbf16ps(1, 4, 7); _tile_dpbf16ps(2, 5, 6); _tile_dpbf16ps(3, 5, 7);
      }
      break;
    case two_by_two:
      for (int q = 0; q < kSteps; ++q) {
        _tile_loadd(4, A[0][q], 64); _tile_loadd(5, A[1][q], 64); _tile_loadd(6, B[0][q], 64);
        _tile_dpbf16ps(0, 4, 6); _tile_dpbf16ps(2, 5, 6);
        _tile_loadd(7, B[1][q], 64);
        _tile_dpbf16ps(1, 4, 7); _tile_dpbf16ps(3, 5, 7);
      }
      break;
    case one_by_two_double:  // C tmm0-1; A tmm2 / tmm3, B tmm4-5 / tmm6-7 in turn
      for (int q = 0; q < kSteps; q += 2) {
        _tile_loadd(2, A[0][q], 64); _tile_loadd(4, B[0][q], 64); _tile_loadd(5, B[1][q], 64);
        _tile_dpbf16ps(0, 2, 4); _tile_dpbf16ps(1, 2, 5);
        _tile_loadd(3, A[0][q + 1], 64); _tile_loadd(6, B[0][q + 1], 64); _tile_loadd(7, B[1][q + 1], 64);
        _tile_dpbf16ps(0, 3, 6); _tile_dpbf16ps(1, 3, 7);
      }
      break;
    case two_by_one_double:  // C tmm0-1; A tmm2-3 / tmm5-6, B tmm4 / tmm7 in turn
      for (int q = 0; q < kSteps; q += 2) {
        _tile_loadd(2, A[0][q], 64); _tile_loadd(4, B[0][q], 64); _tile_loadd(3, A[1][q], 64);
        _tile_dpbf16ps(0, 2, 4); _tile_dpbf16ps(1, 3, 4);
        _tile_loadd(5, A[0][q + 1], 64); _tile_loadd(7, B[0][q + 1], 64); _tile_loadd(6, A[1][q + 1], 64);
        _tile_dpbf16ps(0, 5, 7); _tile_dpbf16ps(1, 6, 7);
      }
      break;
    case two_by_two_a_only:
      for (int q = 0; q < kSteps; ++q) {
        _tile_loadd(4, A[0][q], 64); _tile_loadd(5, A[1][q], 64);
        _tile_dpbf16ps(0, 4, 6); _tile_dpbf16ps(1, 4, 7); _tile_dpbf16ps(2, 5, 6); _tile_dpbf16ps(3, 5, 7);
      }
      break;
    default: break;
  }
  _tile_stored(0, sink, 64);  // the products are used
}

__attribute__((target("amx-tile"))) void load_operands() {
  _tile_loadd(4, A[0][0], 64); _tile_loadd(5, A[1][0], 64); _tile_loadd(6, B[0][0], 64); _tile_loadd(7, B[1][0], 64);
}

double gflops(Shape shape) {
  load_operands();  // the ceiling's operands
  const long passes = kProducts / kProductsPerPass[shape];
  const auto start = std::chrono::steady_clock::now();
  for (long p = 0; p < passes; ++p) pass(shape);
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return passes * kProductsPerPass[shape] * (16.0 * 16 * 32 * 2) / seconds / 1e9;  // 16 x 16 x 32 per product
}

}  // namespace

int main() {
  if (!cpu_has_amx()) {
    std::printf("amx_loops: this CPU has no AMX-BF16 (or Linux did not grant the tile state): nothing to time\n");
    return 0;
  }
  configure_tiles_on_this_thread();
  std::vector<double> runs[kShapes];
  for (int round = 0; round < 7; ++round)  // shapes interleaved, so the host's drift falls on all
    for (int s = 0; s < kShapes; ++s) runs[s].push_back(gflops(static_cast<Shape>(s)));
  double median[kShapes];
  for (int s = 0; s < kShapes; ++s) {
    std::sort(runs[s].begin(), runs[s].end());
    median[s] = runs[s][3];
  }
  std::printf("AMX tile products, operands in L1, one thread, medians of 7 rounds\n");
  std::printf("%-36s %10s %10s\n", "loop", "GFLOP/s", "of ceiling");
  for (int s = 0; s < kShapes; ++s)
    std::printf("%-36s %10.1f %9.0f%%\n", kNames[s], median[s], 100.0 * median[s] / median[ceiling]);
}
