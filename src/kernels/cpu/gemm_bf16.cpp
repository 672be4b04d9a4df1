// bf16 GEMMs (gemm.h): the AVX512_BF16 kernel (and its scalar model for tests), its first-use
// check against the fp32 kernels, and the bf16 entry points. Packing operands into bf16 form is
// gemm_bf16_pack.cpp's; the GEMM loop itself gemm.cpp's (gemm_internal.h).
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <vector>

#include "core/error.h"
#include "core/tensor.h"
#include "kernels/cpu/gemm.h"
#include "kernels/cpu/gemm_internal.h"

namespace pm {
using namespace gemm_detail;
namespace {

// Tests on CPUs without AVX512_BF16 (emulate_bf16_dot_for_testing): the AVX512_BF16 path runs
// with a scalar model of vdpbf16ps in place of the instruction.
std::atomic<bool> g_emulate_dot{false};
std::atomic<int64_t> g_emulated_tiles{0};

float high_half(uint32_t word) {
  const uint32_t bits = word & 0xffff0000u;
  float v;
  std::memcpy(&v, &bits, 4);
  return v;
}
float low_half(uint32_t word) { return high_half(word << 16); }

// vdpbf16ps as Intel's SDM defines it, lane by lane: c += odd product, then c += even product
// (the product of two bf16 values is exact in fp32, so each add rounds as the fp32 kernels' FMA
// does). What it leaves out: the instruction also treats denormal inputs and results as zero
// (DAZ, FTZ), which the fp32 kernels do not; the first-use check's values stay clear of them.
template <int MR>
void tile_bf16_model(int64_t width, int64_t pairs, const uint32_t* Ap, const uint32_t* Bp, const PackedB& B, float* C,
                     int64_t ldc, bool zero_start, const float* bias) {
  for (int i = 0; i < MR; ++i)
    for (int64_t j = 0; j < width; ++j) {
      float c = !zero_start ? C[i * ldc + j] : (bias ? bias[j] : 0.0f);
      for (int64_t q = 0; q < pairs; ++q) {
        const uint32_t a = Ap[q * MR + i], b = Bp[B.pair_word_offset(width, q, j)];
        c = std::fma(high_half(a), high_half(b), c);
        c = std::fma(low_half(a), low_half(b), c);
      }
      C[i * ldc + j] = c;
    }
}

// Rows per micro-tile; A is packed in micro-panels of this many rows.

// bf16 pairs: C[MR][16 NV] (+)= sum over depth pairs q of the pair products, c = dpbf16(c, a, b):
// per lane, fma(a_odd, b_odd) then fma(a_even, b_even). Ap: [pairs][MR] words of A's pairs (the
// even depth in the low half); Bp: B's words in a panel `width` wide, a pair's next pair_step
// words on within a block of 16 pairs, its next 16 columns group_step on (PackedB::pair_word_offset).
// Where the kernel reads A's pair words: packed ([pairs][MR], PackedPairsA) or bf16 rows in place,
// each by its own pointer (RowPairsA), as the fp32 kernel reads rows (gemm.cpp RowPointersA).
template <int MR>
struct PackedPairsA {
  const uint32_t* words;
  uint32_t at(int64_t q, int i) const { return words[q * MR + i]; }
};
template <int MR>
struct RowPairsA {
  const uint16_t* row[MR];
  uint32_t at(int64_t q, int i) const {
    uint32_t word;
    std::memcpy(&word, row[i] + 2 * q, sizeof(word));
    return word;
  }
};

template <int MR, int NV, typename ARead>
__attribute__((target("avx512f,avx512bf16"))) void kernel_avx512_bf16(int64_t pairs, const ARead A,
                                                                     const uint32_t* Bp, int64_t width,
                                                                     int64_t pair_step, int64_t group_step, float* C,
                                                                     int64_t ldc, bool zero_start, const float* bias) {
  __m512 c[MR][NV];
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < NV; ++v)
      c[i][v] = !zero_start ? _mm512_loadu_ps(C + i * ldc + 16 * v)
                            : (bias ? _mm512_loadu_ps(bias + 16 * v) : _mm512_setzero_ps());
  for (int64_t q0 = 0; q0 < pairs; q0 += 16) {
    const uint32_t* block = Bp + q0 * width;  // pairs q0..
    const int64_t n = std::min<int64_t>(16, pairs - q0);
    for (int64_t l = 0; l < n; ++l, block += pair_step) {
      __m512bh b[NV];
      for (int v = 0; v < NV; ++v) b[v] = (__m512bh)_mm512_loadu_si512(block + group_step * v);
      for (int i = 0; i < MR; ++i) {
        __m512bh a = (__m512bh)_mm512_set1_epi32(static_cast<int>(A.at(q0 + l, i)));
        for (int v = 0; v < NV; ++v) c[i][v] = _mm512_dpbf16_ps(c[i][v], a, b[v]);
      }
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(C + i * ldc + 16 * v, c[i][v]);
}

template <typename ARead>
void tile_bf16(int64_t width, int64_t pairs, const ARead A, const uint32_t* Bp, const PackedB& B, float* C,
               int64_t ldc, bool zero_start, const float* bias) {
  const int64_t ps = B.pair_step(width), gs = B.group_step();
  switch (width / 16) {
    case 1: return kernel_avx512_bf16<6, 1>(pairs, A, Bp, width, ps, gs, C, ldc, zero_start, bias);
    case 2: return kernel_avx512_bf16<6, 2>(pairs, A, Bp, width, ps, gs, C, ldc, zero_start, bias);
    case 3: return kernel_avx512_bf16<6, 3>(pairs, A, Bp, width, ps, gs, C, ldc, zero_start, bias);
    default: return kernel_avx512_bf16<6, 4>(pairs, A, Bp, width, ps, gs, C, ldc, zero_start, bias);
  }
}

}  // namespace

bool gemm_detail::cpu_has_bf16_dot() {
  if (g_emulate_dot.load(std::memory_order_relaxed)) return true;
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bf16");
}

void gemm_detail::run_tile_bf16(int64_t width, int64_t pairs, const uint32_t* Ap, const uint32_t* Bp, const PackedB& B,
                                float* C, int64_t ldc, bool zero_start, const float* bias) {
  if (g_emulate_dot.load(std::memory_order_relaxed)) {
    g_emulated_tiles.fetch_add(1, std::memory_order_relaxed);
    return tile_bf16_model<6>(width, pairs, Ap, Bp, B, C, ldc, zero_start, bias);
  }
  tile_bf16(width, pairs, PackedPairsA<6>{Ap}, Bp, B, C, ldc, zero_start, bias);
}

void gemm_detail::run_tile_bf16(int64_t width, int64_t pairs, const uint16_t* const (&a_rows)[6], const uint32_t* Bp,
                                const PackedB& B, float* C, int64_t ldc, bool zero_start, const float* bias) {
  PM_CHECK(!g_emulate_dot.load(std::memory_order_relaxed), "an emulated AVX512_BF16 kernel reads A packed");
  tile_bf16(width, pairs, RowPairsA<6>{{a_rows[0], a_rows[1], a_rows[2], a_rows[3], a_rows[4], a_rows[5]}}, Bp, B, C,
            ldc, zero_start, bias);
}

bool gemm_detail::bf16_dot_reads_rows_in_place() { return !g_emulate_dot.load(std::memory_order_relaxed); }


void gemm_bf16(Trans trans_a, Trans trans_b, int64_t M, int64_t N, int64_t K, const float* A, int64_t lda,
               const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  if (M == 0 || N == 0) return;
  pack_b_bf16(trans_b, K, N, B, ldb, scratch_packed_b());
  gemm_packed(trans_a, M, A, lda, scratch_packed_b(), beta, C, ldc);
}

namespace {

// gemm_bias's bf16 product, A's rows floats or bf16
template <typename AValue>
void bf16_from_bias(int64_t M, int64_t N, int64_t K, const AValue* A, int64_t lda, const float* B, int64_t ldb,
                    const float* bias, float* C, int64_t ldc) {
  if (M == 0 || N == 0) return;
  pack_b_bf16(Trans::no, K, N, B, ldb, scratch_packed_b());
  gemm_packed(Trans::no, M, A, lda, scratch_packed_b(), 0.0f, C, ldc, {bias, nullptr});
}

}  // namespace

void gemm_bf16_bias(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb,
                    const float* bias, float* C, int64_t ldc) {
  bf16_from_bias(M, N, K, A, lda, B, ldb, bias, C, ldc);
}

void gemm_bf16_bias(int64_t M, int64_t N, int64_t K, const uint16_t* A, int64_t lda, const float* B, int64_t ldb,
                    const float* bias, float* C, int64_t ldc) {
  bf16_from_bias(M, N, K, A, lda, B, ldb, bias, C, ldc);
}

namespace {

// Whether bf16 GEMMs packed now run the AVX512_BF16 kernel (use_bf16_dot, before B exists).
bool bf16_dot_ready();

void tn_rows_bf16(int64_t M, int64_t N, int64_t K, RowSource A, RowSource B, float beta, float* C, int64_t ldc,
                  float* b_column_sums) {
  const bool pair_words = bf16_dot_ready() || bf16_order_is_amx();
  if (B.scale && (!pair_words || M == 0 || N == 0)) {
    // scaled rows where the pair words' packing does not round them itself: a bf16 copy first
    thread_local std::vector<uint16_t> copy;
    copy.resize(K * N);
    std::vector<const uint16_t*> rows(K);
    for (int64_t k = 0; k < K; ++k) {
      scaled_floats_to_bf16(B.scale[k], B.row(k), &copy[k * N], N);
      rows[k] = &copy[k * N];
    }
    return tn_rows_bf16(M, N, K, A, RowSource{nullptr, 0, nullptr, nullptr, rows.data()}, beta, C, ldc, b_column_sums);
  }
  if (M == 0 || N == 0) return add_rows_in_order(K, N, B, b_column_sums);
  PackedB& packed = scratch_packed_b();
  if (pair_words) {
    // B packed here for this one product: only the kernel's words (the rows of activation
    // gradients, packed on every call: a float copy would double the packing)
    packed.K = K + (K & 1), packed.N = N, packed.bf16 = true, packed.source_depth = K;
    packed.data.clear();
    pack_b_pair_words(K, N, B, packed, b_column_sums);
    return gemm_packed_impl(Trans::yes, M, A, packed, beta, C, ldc, {}, true);
  }
  pack_b_rows_bf16(K, N, B, packed);
  add_rows_in_order(K, N, B, b_column_sums);  // that packing reads the rows in pair order
  gemm_packed_impl(Trans::yes, M, A, packed, beta, C, ldc, {}, false);
}

RowSource rows_of(const float* const* rows) { return RowSource{nullptr, 0, rows}; }
RowSource rows_of(const uint16_t* const* rows) { return RowSource{nullptr, 0, nullptr, nullptr, rows}; }

}  // namespace

void gemm_tn_rows_bf16(int64_t M, int64_t N, int64_t K, const float* const* a_rows, const float* const* b_rows,
                       float beta, float* C, int64_t ldc, float* b_column_sums, const float* b_row_scale) {
  RowSource B = rows_of(b_rows);
  B.scale = b_row_scale;
  tn_rows_bf16(M, N, K, rows_of(a_rows), B, beta, C, ldc, b_column_sums);
}

void gemm_tn_rows_bf16(int64_t M, int64_t N, int64_t K, const uint16_t* const* a_rows, const float* const* b_rows,
                       float beta, float* C, int64_t ldc, float* b_column_sums, const float* b_row_scale) {
  RowSource B = rows_of(b_rows);
  B.scale = b_row_scale;
  tn_rows_bf16(M, N, K, rows_of(a_rows), B, beta, C, ldc, b_column_sums);
}

void gemm_tn_rows_bf16(int64_t M, int64_t N, int64_t K, const float* const* a_rows, const uint16_t* const* b_rows,
                       float beta, float* C, int64_t ldc, float* b_column_sums) {
  tn_rows_bf16(M, N, K, rows_of(a_rows), rows_of(b_rows), beta, C, ldc, b_column_sums);
}

void gemm_tn_rows_bf16(int64_t M, int64_t N, int64_t K, const uint16_t* const* a_rows, const uint16_t* const* b_rows,
                       float beta, float* C, int64_t ldc, float* b_column_sums) {
  tn_rows_bf16(M, N, K, rows_of(a_rows), rows_of(b_rows), beta, C, ldc, b_column_sums);
}

void gemm_bf16(Trans trans_a, Trans trans_b, int64_t M, int64_t N, int64_t K, const uint16_t* A, int64_t lda,
               const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  if (M == 0 || N == 0) return;
  pack_b_bf16(trans_b, K, N, B, ldb, scratch_packed_b());
  gemm_packed(trans_a, M, A, lda, scratch_packed_b(), beta, C, ldc);
}

void gemm_packed(Trans trans_a, int64_t M, const uint16_t* A, int64_t lda, const PackedB& B, float beta, float* C,
                 int64_t ldc, const GemmExtras& extras) {
  PM_CHECK(B.bf16, "a GEMM with a bf16 A needs B packed by pack_b_bf16");
  gemm_packed_impl(trans_a, M, RowSource{nullptr, lda, nullptr, A, nullptr}, B, beta, C, ldc, extras,
                   use_bf16_dot(B));
}

void gemm_packed_rows(int64_t M, const uint16_t* const* a_rows, const PackedB& B, float beta, float* C, int64_t ldc,
                      const GemmExtras& extras) {
  PM_CHECK(B.bf16, "a GEMM with a bf16 A needs B packed by pack_b_bf16");
  gemm_packed_impl(Trans::no, M, RowSource{nullptr, 0, nullptr, nullptr, a_rows}, B, beta, C, ldc, extras,
                   use_bf16_dot(B));
}

namespace {

// The AVX512_BF16 kernel against the fp32 kernels on the same rounded operands, once: every edge
// case of the tiling (partial micro-panels and panels, an odd depth, two depth blocks, a bias).
bool bf16_dot_agrees() {
  const int64_t M = 13, N = 83, K = 2403;
  std::vector<float> A(M * K), B(K * N), bias(N);
  fill_check_values(12345, 1.0f, {&A, &B, &bias});
  PackedB packed;
  pack_b_bf16_forms(Trans::no, K, N, B.data(), N, packed, true, true);  // (pack_b_bf16 asks whether this passed)
  std::vector<float> dot(M * N), fp32(M * N);
  GemmExtras extras{bias.data(), nullptr};
  gemm_packed_impl(Trans::no, M, RowSource{A.data(), K, nullptr}, packed, 0.0f, dot.data(), N, extras, true);
  gemm_packed_impl(Trans::no, M, RowSource{A.data(), K, nullptr}, packed, 0.0f, fp32.data(), N, extras, false);
  return std::memcmp(dot.data(), fp32.data(), dot.size() * sizeof(float)) == 0;
}

bool bf16_dot_usable() {
  if (g_emulate_dot.load(std::memory_order_relaxed)) {  // the model's own first-use check
    static const bool model_agrees = bf16_dot_agrees();
    return model_agrees;
  }
  static const bool usable = [] {
    if (!cpu_has_bf16_dot()) return false;
    if (bf16_dot_agrees()) return true;
    std::fprintf(stderr,
                 "pipemoe: warning: the AVX512_BF16 GEMM kernel disagrees with the exact fp32 chain on this CPU; "
                 "bf16 GEMMs use the fp32 kernels\n");
    return false;
  }();
  return usable;
}

bool bf16_dot_ready() { return (isa_is_avx512() || g_emulate_dot.load()) && cpu_has_bf16_dot() && bf16_dot_usable(); }

}  // namespace

bool gemm_detail::use_bf16_dot(const PackedB& B) { return B.bf16 && !B.pairs.empty() && bf16_dot_ready(); }

bool gemm_detail::bf16_pair_words_wanted() { return cpu_has_bf16_dot() || bf16_order_is_amx(); }

bool gemm_detail::bf16_words_run_here() { return bf16_order_is_amx() || bf16_dot_ready(); }

std::string gemm_bf16_path() {
  if (bf16_order_is_amx()) return bf16_amx_path();
  if (g_emulate_dot.load()) return bf16_dot_usable() ? "avx512_bf16 (emulated)" : "fp32 kernels";
  return isa_is_avx512() && cpu_has_bf16_dot() && bf16_dot_usable() ? "avx512_bf16" : "fp32 kernels";
}

std::string gemm_bf16_note() {
  const std::string path = gemm_bf16_path();
  if (path == "amx") return "";
  if (path == "avx512_bf16")
    return cpu_has_amx() ? "this CPU has AMX: --bf16-order amx runs bf16 GEMMs several times faster, in AMX's order" : "";
  if (bf16_order_is_amx()) return "this CPU has no AMX: the amx order's bits on the fp32 kernels, slower than --bf16-order dot";
  return "this CPU has no AVX512_BF16: the same bits as with it, without its speed-up";
}

void emulate_bf16_dot_for_testing(bool on) { g_emulate_dot.store(on); }

int64_t bf16_dot_tiles_emulated() { return g_emulated_tiles.load(); }

}  // namespace pm
