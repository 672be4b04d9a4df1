// Rounding floats to bf16 (docs/BENCHMARKS.md, "bf16 rounding in one instruction where the CPU
// has it"): a row through floats_to_bf16 (core/bf16_lanes.h: vcvtneps2bf16 where the build has
// AVX512_BF16) against the integer rounding one value at a time (float_to_bf16 in a loop, which
// GCC vectorises: what floats_to_bf16 was), in cache and from memory; then GeLU on a tile in L2
// with float and with bf16 output, with and without GeLU'. Medians of 31 calls, one thread. Build
// against a built tree and run (link against an older tree's libraries for its GeLU figures):
//
//   g++ -O3 -march=native -std=c++20 -ffp-contract=off -Isrc bench/bf16_rounding.cpp -o /tmp/bf16_rounding
//       -Lbuild/src -lpipemoe_kernels -lpipemoe_core -lfmt -lpthread   (one line)
//   taskset -c 0 /tmp/bf16_rounding   (or build/bench/bf16_rounding, built with the tree)
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <vector>

#include "core/bf16_lanes.h"
#include "core/tensor.h"
#include "kernels/cpu/elementwise.h"

using namespace pm;

namespace {

template <typename Fn>
void time_per_value(const char* name, int64_t n, Fn&& fn) {
  std::vector<double> ns;
  for (int i = 0; i < 31; ++i) {
    const auto start = std::chrono::steady_clock::now();
    fn();
    ns.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() * 1e9 / n);
  }
  std::sort(ns.begin(), ns.end());
  std::printf("%-44s %.3f ns a value\n", name, ns[15]);
}

__attribute__((noinline)) void integer_rounding(const float* src, uint16_t* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = float_to_bf16(src[i]);
}

}  // namespace

int main() {
  std::printf("floats_to_bf16 in this build: %s\n", kBf16RoundingInstruction ? "vcvtneps2bf16 (integer rounding for vectors with a NaN or denormal)" : "integer rounding");
  for (int64_t n : {int64_t{1} << 16, int64_t{4} << 20}) {  // in cache; from memory
    std::vector<float> x(n);
    for (int64_t i = 0; i < n; ++i) {  // normal values of every exponent from 2^-15 to 2^16
      uint32_t bits = (static_cast<uint32_t>(i * 2654435761u) & 0x007fffffu) | ((112u + i % 32) << 23);
      std::memcpy(&x[i], &bits, 4);
    }
    std::vector<uint16_t> a(n), b(n);
    const char* where = n < (1 << 20) ? "in cache" : "from memory";
    char label[64];
    std::snprintf(label, sizeof label, "integer rounding, %s", where);
    time_per_value(label, n, [&] { integer_rounding(x.data(), a.data(), n); });
    std::snprintf(label, sizeof label, "floats_to_bf16, %s", where);
    time_per_value(label, n, [&] { floats_to_bf16(x.data(), b.data(), n); });
    if (a != b) std::printf("the two roundings differ\n");
  }
  const int64_t rows = 64, H = 1024;  // 256 KB of pre-activations: in L2
  std::vector<float> x0(rows * H), x(rows * H), out(rows * H);
  std::vector<uint16_t> out16(rows * H);
  for (size_t i = 0; i < x0.size(); ++i) x0[i] = static_cast<float>((i * 7919) % 2000) * 0.004f - 4.0f;
  for (bool grad : {false, true})
    for (bool bf16 : {false, true}) {
      char label[64];
      std::snprintf(label, sizeof label, "GeLU%s of a 64 x 1024 tile, %s out", grad ? " and GeLU'" : "",
                    bf16 ? "bf16" : "float");
      time_per_value(label, rows * H, [&] {
        x = x0;  // (GeLU' overwrites it)
        gelu_forward_tile(x.data(), H, rows, H, bf16 ? nullptr : out.data(), bf16 ? out16.data() : nullptr, H, grad);
      });
    }
}
