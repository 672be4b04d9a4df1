// One TDPBF16PS per trial on random bf16 operands: prints, per element of the 16 x 16 result, C's
// value before, after, and the depth pairs' operands (bf16 bit patterns), for orders.py to model.
// Usage: dump PAIRS TRIALS (PAIRS of the tile row's 16 depth pairs non-zero, the rest zero).
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>

namespace {

struct TileConfig {
  uint8_t palette = 1, start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t bytes_per_row[16] = {};
  uint8_t rows[16] = {};
};

uint16_t to_bf16(float f) {  // nearest even
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

alignas(64) uint16_t A[16][32];
alignas(64) uint16_t B[16][16][2];  // [depth pair][column][even, odd]
alignas(64) float C[16][16];

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) return std::fprintf(stderr, "usage: dump PAIRS TRIALS\n"), 2;
  const int pairs = std::atoi(argv[1]), trials = std::atoi(argv[2]);
  if (syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XFEATURE_XTILEDATA */) != 0)
    return std::fprintf(stderr, "dump: Linux did not grant the AMX tile state\n"), 1;
  TileConfig config;
  for (int t = 0; t < 3; ++t) config.rows[t] = 16, config.bytes_per_row[t] = 64;
  asm volatile("" ::: "memory");  // GCC 12 thinks ldtilecfg reads 8 bytes (kernels/cpu/gemm_amx.cpp)
  _tile_loadconfig(&config);
  std::mt19937 rng(3);
  std::normal_distribution<float> normal;
  auto value = [&] { return to_bf16(normal(rng) * std::exp2(static_cast<float>(static_cast<int>(rng() % 16) - 8))); };
  for (int trial = 0; trial < trials; ++trial) {
    std::memset(A, 0, sizeof A);
    std::memset(B, 0, sizeof B);
    for (int i = 0; i < 16; ++i)
      for (int k = 0; k < 2 * pairs; ++k) A[i][k] = value();
    for (int q = 0; q < pairs; ++q)
      for (int j = 0; j < 16; ++j) B[q][j][0] = value(), B[q][j][1] = value();
    for (auto& row : C)
      for (float& c : row) c = normal(rng) * 8;
    float before[16][16];
    std::memcpy(before, C, sizeof C);
    _tile_loadd(0, C, 64);
    _tile_loadd(1, A, 64);
    _tile_loadd(2, B, 64);
    _tile_dpbf16ps(0, 1, 2);
    _tile_stored(0, C, 64);
    for (int i = 0; i < 16; ++i)
      for (int j = 0; j < 16; ++j) {
        std::printf("%a %a", before[i][j], C[i][j]);
        for (int q = 0; q < pairs; ++q) std::printf(" %d %d %d %d", A[i][2 * q], A[i][2 * q + 1], B[q][j][0], B[q][j][1]);
        std::printf("\n");
      }
  }
  _tile_release();
}
