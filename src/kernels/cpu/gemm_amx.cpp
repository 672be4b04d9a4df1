// bf16 GEMMs in AMX's order (gemm.h, Bf16Order::amx): Intel AMX's tile product where the CPU has
// it, and an exact fp32 model of it everywhere else, so that the order, not the machine, fixes the
// bits.
//
// What TDPBF16PS computes, per element of C and per instruction (a block of 32 depths), found by
// running it on this project's Xeon (Emerald Rapids, family 6 model 207) against exact rational
// arithmetic (docs/BENCHMARKS.md, "AMX"): the even depths' products summed in depth order, each add
// rounded to nearest even in fp32 (the first product taken as it is); the odd depths' likewise;
// then c = c + (even sum + odd sum), each add rounded. Sequential fmas in either pair order,
// the exact sum rounded once, and pairwise trees all disagreed in 10-70% of the elements. The two
// rounded lanes are what the model below computes, and the first-use check holds the instruction to
// it: on a CPU where it disagrees the model runs instead, with a warning.
//
// Tiles: C as 2 x 2 tiles of 16 x 16 floats (tmm0-3: rows 0-15 and 16-31, columns 0-15 and 16-31
// of a 32 x 32 block), A as two tiles of 16 rows x 16 depth pairs (tmm4-5), B as two tiles of
// 16 depth pairs x 16 columns (tmm6-7). A is packed row-major as pair words ([rows][pairs], zero
// rows and pairs up to whole tiles); B's pair words (PackedB::pairs) are what a B tile reads: packed
// in the amx order as contiguous 1 KB tiles, in the dot order as rows of pairs (a tile 16 of them,
// 256 bytes apart), both zero-padded to whole blocks of 16 pairs.
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cpuid.h>
#include <cstdio>
#include <cstring>
#include <vector>

#include "core/aligned.h"
#include "core/error.h"
#include "kernels/cpu/fma_ceiling.h"
#include "kernels/cpu/gemm.h"
#include "kernels/cpu/gemm_internal.h"
#include "kernels/cpu/thread_pool.h"

namespace pm {
using namespace gemm_detail;
namespace {

std::atomic<Bf16Order> g_order{Bf16Order::dot};
std::atomic<bool> g_model_only{false};  // tests: the model even where AMX runs

constexpr int64_t kTile = 16;        // rows (and pair columns) of a tile
constexpr int64_t kBlockRows = 32;   // rows of C per 2 x 2 block of tiles
constexpr int64_t kMBlockAmx = 256;  // rows of A packed per pass over B's panels (1 MB of words at 1024 pairs)

float low_bf16(uint32_t word) {
  const uint32_t bits = word << 16;
  float v;
  std::memcpy(&v, &bits, 4);
  return v;
}
float high_bf16(uint32_t word) {
  const uint32_t bits = word & 0xffff0000u;
  float v;
  std::memcpy(&v, &bits, 4);
  return v;
}

// ---- the CPU and the kernel's permission to use the tiles ---------------------------------------

bool cpu_has_amx_bf16() {
  unsigned a, b, c, d;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
  const bool tile = d & (1u << 24), bf16 = d & (1u << 22);
  if (!tile || !bf16) return false;
  // Linux hands out the tile data state on request only (ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA),
  // once per process; a kernel without it, or one that refuses, leaves AMX off.
  constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
}

struct TileConfig {
  uint8_t palette = 1, start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t bytes_per_row[16] = {};
  uint8_t rows[16] = {};
};

}  // namespace

// The tile configuration is per thread (it lives in the thread's register state): set once on each
// thread that runs the kernel, every tile 16 rows of 64 bytes.
__attribute__((target("amx-tile"))) void gemm_detail::configure_tiles_on_this_thread() {
  thread_local bool configured = false;
  if (configured) return;
  alignas(64) TileConfig config;
  for (int t = 0; t < 8; ++t) config.bytes_per_row[t] = 64, config.rows[t] = kTile;
  // GCC 12's _tile_loadconfig tells the compiler it reads 8 bytes of the 64: without this barrier
  // the stores above may sink past it (bench/amx_loops.cpp, inlined, then loaded an unconfigured
  // tile: SIGILL).
  asm volatile("" ::: "memory");
  _tile_loadconfig(&config);
  configured = true;
}

namespace {

// ---- one panel of B against a packed block of A ---------------------------------------------------

// What both kernels take: A's block as pair words [padded_rows][a_pairs] (a_pairs a multiple of 16,
// zero past the depth), B's panel from this depth block on ([b_pairs][width] words, b_pairs <=
// a_pairs; the rest read as zero), C's block (rows x cols valid of padded_rows x width).
struct PanelJob {
  const uint32_t* A;
  int64_t a_pairs, rows, padded_rows;
  const uint32_t* B;
  int64_t b_pairs, width, cols;
  float* C;
  int64_t ldc;
  bool zero_start;
  const float* bias;  // [width] (zero-padded), or null
  const TileEpilogue* epilogue;
  int64_t row0, col0;  // where C's block sits, for the epilogue
  const PackedB* packed;  // B's layout (PackedB::pair_word_offset)
};

// The model element by element (CPUs without AVX-512).
void panel_model_scalar(const PanelJob& job) {
  float even[kPanel], odd[kPanel], c[kPanel];
  for (int64_t i = 0; i < job.rows; ++i) {
    float* Crow = job.C + i * job.ldc;
    for (int64_t j = 0; j < job.width; ++j)
      c[j] = !job.zero_start ? (j < job.cols ? Crow[j] : 0.0f) : (job.bias ? job.bias[j] : 0.0f);
    for (int64_t qb = 0; qb < job.a_pairs; qb += kTile) {
      std::fill(even, even + job.width, 0.0f);
      std::fill(odd, odd + job.width, 0.0f);
      for (int64_t q = qb; q < std::min(qb + kTile, job.b_pairs); ++q) {
        const uint32_t a = job.A[i * job.a_pairs + q];
        const float a_even = low_bf16(a), a_odd = high_bf16(a);
        for (int64_t j = 0; j < job.width; ++j) {
          const uint32_t b = job.B[job.packed->pair_word_offset(job.width, q, j)];
          even[j] = std::fma(a_even, low_bf16(b), even[j]);
          odd[j] = std::fma(a_odd, high_bf16(b), odd[j]);
        }
      }
      for (int64_t j = 0; j < job.width; ++j) c[j] = c[j] + (even[j] + odd[j]);
    }
    std::memcpy(Crow, c, job.cols * sizeof(float));
  }
}

// The exact model with AVX-512, MR rows from row i0, 16 NV columns from column v: the two lanes of
// each element in registers (fmas on the bf16 values widened from B's words), c += their sum per
// block. a_even / a_odd: the rows' A values widened ([MR][b_pairs]), broadcast from memory.
template <int MR, int NV>
__attribute__((target("avx512f"))) void model_tile_avx512(const PanelJob& job, int64_t i0, int64_t v,
                                                          const float* a_even, const float* a_odd) {
  const __mmask16 all = 0xffff;  // (masked forms: GCC 12 warns of the plain ones' undefined source)
  const __m512i high_half = _mm512_set1_epi32(static_cast<int>(0xffff0000u));
  __mmask16 keep[NV];
  for (int n = 0; n < NV; ++n)
    keep[n] = static_cast<__mmask16>((1u << std::clamp<int64_t>(job.cols - v - 16 * n, 0, 16)) - 1);
  __m512 c[MR][NV];
  for (int i = 0; i < MR; ++i)
    for (int n = 0; n < NV; ++n)
      c[i][n] = !job.zero_start ? _mm512_maskz_loadu_ps(keep[n], job.C + (i0 + i) * job.ldc + v + 16 * n)
                                : (job.bias ? _mm512_loadu_ps(job.bias + v + 16 * n) : _mm512_setzero_ps());
  for (int64_t qb = 0; qb < job.a_pairs; qb += kTile) {
    __m512 even[MR][NV], odd[MR][NV];
    for (int i = 0; i < MR; ++i)
      for (int n = 0; n < NV; ++n) even[i][n] = odd[i][n] = _mm512_setzero_ps();
    for (int64_t q = qb; q < std::min(qb + kTile, job.b_pairs); ++q) {
      __m512 b_even[NV], b_odd[NV];
      for (int n = 0; n < NV; ++n) {
        const __m512i b = _mm512_loadu_si512(job.B + job.packed->pair_word_offset(job.width, q, v + 16 * n));
        b_even[n] = _mm512_castsi512_ps(_mm512_maskz_slli_epi32(all, b, 16));
        b_odd[n] = _mm512_castsi512_ps(_mm512_maskz_and_epi32(all, b, high_half));
      }
      for (int i = 0; i < MR; ++i) {
        const __m512 ae = _mm512_set1_ps(a_even[i * job.b_pairs + q]), ao = _mm512_set1_ps(a_odd[i * job.b_pairs + q]);
        for (int n = 0; n < NV; ++n) {
          even[i][n] = _mm512_fmadd_ps(ae, b_even[n], even[i][n]);
          odd[i][n] = _mm512_fmadd_ps(ao, b_odd[n], odd[i][n]);
        }
      }
    }
    for (int i = 0; i < MR; ++i)
      for (int n = 0; n < NV; ++n) c[i][n] = _mm512_add_ps(c[i][n], _mm512_add_ps(even[i][n], odd[i][n]));
  }
  for (int i = 0; i < MR; ++i)
    for (int n = 0; n < NV; ++n) _mm512_mask_storeu_ps(job.C + (i0 + i) * job.ldc + v + 16 * n, keep[n], c[i][n]);
}

// MR rows of the panel from row i0 with model_tile_avx512, 32 columns at a time.
template <int MR>
void model_rows_avx512(const PanelJob& job, int64_t i0) {
  thread_local std::vector<float> widened;
  widened.resize(2 * MR * job.b_pairs);
  float* a_even = widened.data();
  float* a_odd = a_even + MR * job.b_pairs;
  for (int i = 0; i < MR; ++i)
    for (int64_t q = 0; q < job.b_pairs; ++q) {
      const uint32_t a = job.A[(i0 + i) * job.a_pairs + q];
      a_even[i * job.b_pairs + q] = low_bf16(a), a_odd[i * job.b_pairs + q] = high_bf16(a);
    }
  int64_t v = 0;
  for (; v + 32 <= job.width; v += 32) model_tile_avx512<MR, 2>(job, i0, v, a_even, a_odd);
  if (v < job.width) model_tile_avx512<MR, 1>(job, i0, v, a_even, a_odd);
}

// The exact model: for each element, blocks of 16 pairs, two rounded lanes, then c += their sum.
// AVX-512 four rows at a time where the fp32 kernels run AVX-512 (the same operations: the same
// bits), else element by element.
void panel_model(const PanelJob& job) {
  if (isa_is_avx512()) {
    int64_t i = 0;
    for (; i + 4 <= job.rows; i += 4) model_rows_avx512<4>(job, i);
    switch (job.rows - i) {
      case 3: model_rows_avx512<3>(job, i); break;
      case 2: model_rows_avx512<2>(job, i); break;
      case 1: model_rows_avx512<1>(job, i); break;
      default: break;
    }
  } else {
    panel_model_scalar(job);
  }
  if (job.epilogue)
    for (int64_t r = 0; r < job.rows; r += kBlockRows)
      (*job.epilogue)(job.row0 + r, job.col0, std::min(kBlockRows, job.rows - r), job.cols);
}

// The same with the tiles: 32 x 32 blocks of C (32 x 16 at a panel's odd last 16 columns).
__attribute__((target("amx-tile,amx-bf16"))) void panel_amx(const PanelJob& job) {
  configure_tiles_on_this_thread();
  const int64_t width = job.width, a_stride = job.a_pairs * 4;
  const int64_t b_stride = job.packed->pair_step(width) * 4, next_group = job.packed->group_step();
  alignas(64) float edge[kBlockRows * kBlockRows];
  for (int64_t rt = 0; rt < job.padded_rows; rt += kBlockRows) {
    const int64_t valid_rows = std::min(kBlockRows, job.rows - rt);
    const uint32_t* A0 = job.A + rt * job.a_pairs;
    const uint32_t* A1 = A0 + kTile * job.a_pairs;
    for (int64_t ct = 0; ct < width; ct += kBlockRows) {
      const bool two = width - ct >= 2 * kTile;
      const int64_t block_cols = two ? 2 * kTile : kTile;
      const int64_t valid_cols = std::clamp<int64_t>(job.cols - ct, 0, block_cols);
      float* Ct = job.C + rt * job.ldc + ct;
      const bool direct = valid_rows == kBlockRows && valid_cols == block_cols;
      float* Cd = direct ? Ct : edge;
      const int64_t ldd = direct ? job.ldc : kBlockRows;
      if (job.zero_start) {
        if (job.bias) {  // every row starts from the bias: a row stride of 0
          _tile_loadd(0, job.bias + ct, 0);
          _tile_loadd(2, job.bias + ct, 0);
          if (two) _tile_loadd(1, job.bias + ct + kTile, 0);
          if (two) _tile_loadd(3, job.bias + ct + kTile, 0);
        } else {
          _tile_zero(0);
          _tile_zero(2);
          if (two) _tile_zero(1);
          if (two) _tile_zero(3);
        }
      } else {
        if (!direct)
          for (int64_t i = 0; i < kBlockRows; ++i)
            for (int64_t j = 0; j < block_cols; ++j)
              edge[i * kBlockRows + j] = i < valid_rows && j < valid_cols ? Ct[i * job.ldc + j] : 0.0f;
        _tile_loadd(0, Cd, ldd * 4);
        _tile_loadd(2, Cd + kTile * ldd, ldd * 4);
        if (two) _tile_loadd(1, Cd + kTile, ldd * 4);
        if (two) _tile_loadd(3, Cd + kTile * ldd + kTile, ldd * 4);
      }
      for (int64_t qb = 0; qb < job.a_pairs; qb += kTile) {
        // B's tile of pairs qb.. and columns ct.. (the last block's pairs past b_pairs are zero)
        const uint32_t* b = job.B + job.packed->pair_word_offset(width, qb, ct);
        _tile_loadd(4, A0 + qb, a_stride);
        _tile_loadd(5, A1 + qb, a_stride);
        _tile_loadd(6, b, b_stride);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(2, 5, 6);
        if (two) {
          _tile_loadd(7, b + next_group, b_stride);
          _tile_dpbf16ps(1, 4, 7);
          _tile_dpbf16ps(3, 5, 7);
        }
      }
      _tile_stored(0, Cd, ldd * 4);
      _tile_stored(2, Cd + kTile * ldd, ldd * 4);
      if (two) _tile_stored(1, Cd + kTile, ldd * 4);
      if (two) _tile_stored(3, Cd + kTile * ldd + kTile, ldd * 4);
      if (!direct)
        for (int64_t i = 0; i < valid_rows; ++i)
          std::memcpy(Ct + i * job.ldc, edge + i * kBlockRows, valid_cols * sizeof(float));
    }
    if (job.epilogue) (*job.epilogue)(job.row0 + rt, job.col0, valid_rows, job.cols);
  }
}

void amx_gemm(Trans trans_a, int64_t M, RowSource A, const PackedB& B, float beta, float* C, int64_t ldc,
              const GemmExtras& extras, bool use_tiles);

// The tiles against the model on the same operands, once: partial row blocks and panels, an odd
// depth, two depth blocks, a bias, and a second call accumulating into C. Small enough (13 MFLOP)
// to run on the calling thread: the first GEMM may itself run on a pool thread.
bool amx_agrees() {
  const int64_t M = 33, N = 83, K = 2403;
  std::vector<float> A(M * K), B(K * N), bias(N);
  fill_check_values(2026, 8.0f, {&A, &B, &bias});
  PackedB packed;
  pack_b_bf16(Trans::no, K, N, B.data(), N, packed);
  std::vector<float> tiles(M * N), model(M * N);
  const GemmExtras extras{bias.data(), nullptr};
  const RowSource rows{A.data(), K, nullptr};
  for (bool use_tiles : {true, false}) {
    float* out = use_tiles ? tiles.data() : model.data();
    amx_gemm(Trans::no, M, rows, packed, 0.0f, out, N, extras, use_tiles);
    amx_gemm(Trans::no, M, rows, packed, 1.0f, out, N, {}, use_tiles);
  }
  return std::memcmp(tiles.data(), model.data(), tiles.size() * sizeof(float)) == 0;
}

bool amx_usable() {
  static const bool usable = [] {
    if (!cpu_has_amx()) return false;
    if (amx_agrees()) return true;
    std::fprintf(stderr,
                 "pipemoe: warning: this CPU's AMX tile product disagrees with the model of its order; bf16 GEMMs "
                 "in the amx order run on the model (the same bits, slower)\n");
    return false;
  }();
  return usable;
}

void amx_gemm(Trans trans_a, int64_t M, RowSource A, const PackedB& B, float beta, float* C, int64_t ldc,
              const GemmExtras& extras, bool use_tiles) {
  const int64_t N = B.N, K = B.K;
  PM_CHECK(B.bf16 && !B.pairs.empty(), "a GEMM in the amx order needs B's pair words");
  thread_local FloatBuffer padded_bias;
  if (extras.bias) {
    padded_bias.assign(B.panels() * kPanel, 0.0f);
    std::memcpy(padded_bias.data(), extras.bias, N * sizeof(float));
  }
  const float* bias_base = extras.bias ? padded_bias.data() : nullptr;
  const int64_t k_block = kKBlockBf16Dot, k_block_deepest = k_block_max(k_block);
  thread_local std::vector<uint32_t, AlignedAllocator<uint32_t>> packed_a;
  const bool parallel = worth_threads(2.0 * M * N * K);
  for (int64_t row0 = 0; row0 < M; row0 += kMBlockAmx) {
    const int64_t rows = std::min(kMBlockAmx, M - row0);
    const int64_t padded_rows = (rows + kBlockRows - 1) / kBlockRows * kBlockRows;
    for (int64_t k0 = 0, kc = 0; k0 < K; k0 += kc) {
      kc = K - k0 <= k_block_deepest ? K - k0 : k_block;  // k_block is a multiple of 32: blocks stay aligned
      const int64_t b_pairs = kc / 2, a_pairs = (b_pairs + kTile - 1) / kTile * kTile;
      packed_a.resize(padded_rows * a_pairs);
      pack_a_row_words(trans_a, A, row0, rows, k0, 2 * a_pairs, B.source_depth, padded_rows, packed_a.data());
      const uint32_t* Aw = packed_a.data();
      const bool zero_start = beta == 0.0f && k0 == 0, last_depth = k0 + kc == K;
      auto panels = [&](int64_t p_begin, int64_t p_end) {
        for (int64_t p = p_begin; p < p_end; ++p) {
          const int64_t width = B.panel_width(p), col0 = p * kPanel;
          const PanelJob job{Aw,
                             a_pairs,
                             rows,
                             padded_rows,
                             B.pair_panel(p) + k0 / 2 * width,
                             b_pairs,
                             width,
                             std::min(kPanel, N - col0),
                             C + row0 * ldc + col0,
                             ldc,
                             zero_start,
                             bias_base ? bias_base + col0 : nullptr,
                             last_depth ? extras.epilogue : nullptr,
                             row0,
                             col0,
                             &B};
          use_tiles ? panel_amx(job) : panel_model(job);
        }
      };
      if (parallel)
        parallel_for(B.panels(), panels);
      else
        panels(0, B.panels());
    }
  }
}

}  // namespace

bool gemm_detail::cpu_has_amx() {
  static const bool has = cpu_has_amx_bf16();
  return has;
}

bool gemm_detail::bf16_order_is_amx() { return g_order.load(std::memory_order_relaxed) == Bf16Order::amx; }

void gemm_detail::gemm_amx_order(Trans trans_a, int64_t M, RowSource A, const PackedB& B, float beta, float* C,
                                 int64_t ldc, const GemmExtras& extras) {
  amx_gemm(trans_a, M, A, B, beta, C, ldc, extras, !g_model_only.load(std::memory_order_relaxed) && amx_usable());
}

void set_bf16_order(Bf16Order order) { g_order.store(order); }

Bf16Order bf16_order() { return g_order.load(); }

std::string bf16_order_name() { return bf16_order() == Bf16Order::amx ? "amx" : "dot"; }

std::string bf16_amx_path() { return amx_usable() ? "amx" : "amx order on fp32 (no AMX here)"; }

bool amx_runs_here() { return amx_usable(); }

namespace {

// Seconds of `iterations` rounds of four independent tile products (kernels/cpu/fma_ceiling.h).
__attribute__((target("amx-tile,amx-bf16"))) double amx_ceiling_seconds(int64_t iterations) {
  configure_tiles_on_this_thread();
  alignas(64) static const uint32_t zeros[kTile * kTile] = {};  // no overflow however long it runs
  _tile_loadd(4, zeros, 64);
  _tile_loadd(5, zeros, 64);
  _tile_loadd(6, zeros, 64);
  _tile_loadd(7, zeros, 64);
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  const auto start = std::chrono::steady_clock::now();
  for (int64_t k = 0; k < iterations; ++k) {
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    _tile_dpbf16ps(2, 5, 6);
    _tile_dpbf16ps(3, 5, 7);
  }
  alignas(64) float sink[kTile * kTile];
  _tile_stored(0, sink, 64);  // the products are used
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

}  // namespace

double amx_ceiling_gflops(double seconds) {
  if (!amx_usable()) return 0.0;
  constexpr double kFlops = 4.0 * kTile * kTile * 32 * 2;  // per round: four 16 x 16 x 32 products
  int64_t iterations = 1 << 12;
  double s = amx_ceiling_seconds(iterations);
  while (s < 0.01) s = amx_ceiling_seconds(iterations *= 4);
  iterations = static_cast<int64_t>(iterations * (seconds / s)) + 1;
  return iterations * kFlops / amx_ceiling_seconds(iterations) / 1e9;
}

void use_amx_model_for_testing(bool on) { g_model_only.store(on); }

}  // namespace pm
