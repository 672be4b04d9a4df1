// What gemm.cpp (the fp32 GEMM) and gemm_bf16.cpp (bf16 packing and the AVX512_BF16 kernel)
// share. Internal to kernels/cpu: nothing else includes it.
#pragma once

#include <immintrin.h>

#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <vector>

#include "core/tensor.h"
#include "kernels/cpu/fetch_ahead.h"
#include "kernels/cpu/gemm.h"

namespace pm::gemm_detail {

inline constexpr int64_t kPanel = 64;    // columns per packed panel of B

using pm::fetch_into_l1;  // (kernels/cpu/fetch_ahead.h)
using pm::fetch_into_l2;
// Depths of one pass over C: the panel's slice of B (64 columns, 256 KB: 1024 floats or 2048
// bf16 values deep) stays in L2 while the A block streams past it. Every depth block beyond the
// first loads C and stores it again, so a deeper block saves passes over C: 512 floats deep, the
// bf16 layer's products of depth 1024 made two (interleaved, 2-rank layer: bf16 0.967x with one,
// fp32 0.973x; the 2048^3 product 1.02-1.05x faster in bf16 at 2048 than at 1024; AVX2 the same or
// better; docs/BENCHMARKS.md).
inline constexpr int64_t kKBlock = 1024;
inline constexpr int64_t kKBlockBf16Dot = 2048;  // the AVX512_BF16 kernel's (pairs: 1024 words deep)
// A last block of up to a block / 8 depths joins the one before it: a whole pass over C for a few
// depths (the weight gradients' depth is the expert's rows, e.g. 1025) costs more than a deeper
// block. Blocks are at most this deep.
inline constexpr int64_t k_block_max(int64_t block) { return block + block / 8; }

// Rows of a row-major matrix: contiguous (base, ld) or anywhere (one pointer per row), of floats
// or, for a bf16 GEMM's A only, of bf16 values (base16 / rows16: activations saved in bf16).
// scale (float rows, fp32 GEMMs; null: none): row i's values are scale[i] * value, made as the
// rows are packed (GemmExtras::a_row_scale, gemm_tn_rows' b_row_scale).
struct RowSource {
  const float* base = nullptr;
  int64_t ld = 0;
  const float* const* rows = nullptr;
  const uint16_t* base16 = nullptr;
  const uint16_t* const* rows16 = nullptr;
  const float* scale = nullptr;
  bool is_bf16() const { return base16 != nullptr || rows16 != nullptr; }
  const float* row(int64_t i) const { return rows ? rows[i] : base + i * ld; }
  const uint16_t* row16(int64_t i) const { return rows16 ? rows16[i] : base16 + i * ld; }
};

// An 8 x 8 block of floats transposed in registers: rows r[0..8) in, r[j] = column j out.
__attribute__((target("avx2"))) inline void transpose_8x8_in_registers(__m256 (&r)[8]) {
  __m256 t[8];
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    r[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
    r[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);
    r[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    r[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
  }
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm256_permute2f128_ps(r[i], r[i + 4], 0x20);
    t[i + 4] = _mm256_permute2f128_ps(r[i], r[i + 4], 0x31);
  }
  for (int i = 0; i < 8; ++i) r[i] = t[i];
}

// Values for the kernels' first-use checks, the same on every run: uniform in [-range, range)
// (an LCG from `seed`), so that the check of a kernel never depends on the caller's random state.
inline void fill_check_values(uint32_t seed, float range, std::initializer_list<std::vector<float>*> out) {
  uint32_t state = seed;
  for (std::vector<float>* values : out)
    for (float& v : *values) {
      state = state * 1664525u + 1013904223u;
      v = static_cast<float>(static_cast<int32_t>(state >> 8) - (1 << 23)) / (1 << 23) * range;
    }
}

// ---- gemm.cpp ---------------------------------------------------------------------------------
// The fp32 kernels run AVX-512 (not forced down to AVX2 or scalar).
bool isa_is_avx512();
// op(B) = B (row k of op(B) is row k of the source) into panels; column_sums (optional, [N]): the
// rows added into it in order as they are copied (gemm_tn_rows's b_column_sums).
void pack_b_rows(int64_t K, int64_t N, RowSource B, PackedB& out, float* column_sums = nullptr);
// sums[j] += rows[k][j] for k < K in order: the column sums where no packing reads the rows.
inline void add_rows_in_order(int64_t K, int64_t N, RowSource rows, float* sums) {
  for (int64_t k = 0; k < K && sums; ++k)
    if (rows.is_bf16())
      for (int64_t j = 0; j < N; ++j) sums[j] += bf16_to_float(rows.row16(k)[j]);
    else if (rows.scale)
      for (int64_t j = 0; j < N; ++j) sums[j] += rows.scale[k] * rows.row(k)[j];
    else
      for (int64_t j = 0; j < N; ++j) sums[j] += rows.row(k)[j];
}
// The same in bf16 form in one pass (what pack_b_bf16 makes of pack_b's panels): values rounded,
// depths in pair order, K rounded up to even; without the AVX512_BF16 words (add_bf16_pairs).
void pack_b_rows_bf16(int64_t K, int64_t N, RowSource B, PackedB& out);
// The GEMM of gemm.h on packed B; `dot`: a bf16 GEMM (B.bf16) on the AVX512_BF16 kernel instead
// of the fp32 kernels.
void gemm_packed_impl(Trans trans_a, int64_t M, RowSource A, const PackedB& B, float beta, float* C, int64_t ldc,
                      const GemmExtras& extras, bool dot);
// Whether a product of `flops` is split over the compute threads: only when the work pays for
// waking them. On these VMs a wake-up and the wait for it cost more than a 16 MFLOP product saves
// (decoding 16 sequences, whose LM head is ~13 MFLOP, ran 1.09-1.27x faster with this bound than
// with 4 MFLOP; docs/BENCHMARKS.md).
bool worth_threads(double flops);
// This thread's scratch packing of B (gemm and gemm_bf16 pack into it).
PackedB& scratch_packed_b();
// Whether op(A) op(B) ran without packing B (gemm_unpacked.cpp: a C of at most 8 rows from a
// transposed A, or a shallow depth, on AVX-512); false: the caller packs and runs the panels.
bool gemm_unpacked(Trans trans_a, Trans trans_b, int64_t M, int64_t N, int64_t K, const float* A, int64_t lda,
                   const float* B, int64_t ldb, float beta, float* C, int64_t ldc);
// One 6-row micro-panel of A: panel[k * 6 + i] = rows[i][k] (with swap_pairs, rows[i][k ^ 1]; kc
// even) for k < kc, 8 depths at a time with an 8 x 8 transpose in registers where the CPU has
// AVX2. Element by element, packing A was 5% of an fp32 layer's time and 6% of a bf16 one's.
// scale (null: none): panel[k * 6 + i] = scale[i] * rows[i][k] (not with swap_pairs).
void interleave6(const float* const (&rows)[6], int64_t kc, float* panel, bool swap_pairs,
                 const float* scale = nullptr);

// ---- gemm_bf16_pack.cpp -----------------------------------------------------------------------
// The AVX512_BF16 kernel's words of a bf16 packed B, where the CPU has the instructions.
void add_bf16_pairs(PackedB& out);
// The same words of op(B) = B's K rows (N wide) straight from the source, rounded as they are
// read: out.pairs only (its float panels untouched). column_sums: as pack_b_rows.
void pack_b_pair_words(int64_t K, int64_t N, RowSource B, PackedB& out, float* column_sums = nullptr);
// pack_a for a bf16 GEMM: MR-row micro-panels, each value rounded to bf16 and each depth pair
// swapped (packed depth k reads depth k ^ 1; k0 is even), depths at or past `depth` zero.
void pack_a_bf16(Trans trans_a, RowSource A, int64_t row0, int64_t rows, int64_t k0, int64_t kc, int64_t depth,
                 int64_t MR, float* out);
// The same for the AVX512_BF16 kernel, straight into its words: [kc / 2][MR] per micro-panel, the
// even depth of each pair in the low half (the bits pack_a_bf16's values make as pair words).
void pack_a_pairs(Trans trans_a, RowSource A, int64_t row0, int64_t rows, int64_t k0, int64_t kc, int64_t depth,
                  int64_t MR, uint32_t* out);
// The same words row by row, for AMX's A tiles: out[i * kc / 2 + q] = the word of op(A)'s row
// row0 + i at depths k0 + 2q, k0 + 2q + 1, for i < padded_rows (rows past `rows` and depths past
// `depth` zero).
void pack_a_row_words(Trans trans_a, RowSource A, int64_t row0, int64_t rows, int64_t k0, int64_t kc, int64_t depth,
                      int64_t padded_rows, uint32_t* out);
// Whether bf16 packings make the pair words (the AVX512_BF16 kernel's, which AMX's order reads too).
bool bf16_pair_words_wanted();
// Whether bf16 GEMMs packed now run on the pair words alone (the AVX512_BF16 kernel, ready, or the
// amx order): their float panels would go unread.
bool bf16_words_run_here();
// pack_b_bf16 making the float panels (the fp32 kernels'), the pair words, or both (the first-use
// checks compare the kernels on one packing).
void pack_b_bf16_forms(Trans trans_b, int64_t K, int64_t N, const float* B, int64_t ldb, PackedB& out, bool panels,
                       bool words);
// A bf16 B's float panels made from its pair words (a B packed for the words alone, then run on the
// fp32 kernels: tests that force the instruction set down, or change the order, after packing).
void float_panels_from_words(const PackedB& B, PackedB& out);

// ---- gemm_bf16.cpp ----------------------------------------------------------------------------
// The CPU has AVX512_BF16 (or tests emulate it: emulate_bf16_dot_for_testing).
bool cpu_has_bf16_dot();
// One 6 x width tile with vdpbf16ps: Ap [pairs][6] words of bf16 pairs, Bp a panel of B's (width
// columns, from a block of 16 pairs on, laid out as B's: PackedB::pair_word_offset).
void run_tile_bf16(int64_t width, int64_t pairs, const uint32_t* Ap, const uint32_t* Bp, const PackedB& B, float* C,
                   int64_t ldc, bool zero_start, const float* bias);
// The same with A read in place: row i's pair words from a_rows[i] (bf16 rows from an even depth:
// two bf16 values are a pair word already, the even depth in the low half).
void run_tile_bf16(int64_t width, int64_t pairs, const uint16_t* const (&a_rows)[6], const uint32_t* Bp,
                   const PackedB& B, float* C, int64_t ldc, bool zero_start, const float* bias);
// Whether tiles can read bf16 rows in place (the AVX512_BF16 instructions, not their emulation).
bool bf16_dot_reads_rows_in_place();
// Whether a GEMM with B runs the AVX512_BF16 kernel: B is bf16 with pairs, the CPU has the
// instructions, the ISA is not forced down, and the kernel passed its first-use check.
bool use_bf16_dot(const PackedB& B);

// ---- gemm_amx.cpp -----------------------------------------------------------------------------
// bf16 GEMMs run in AMX's order (set_bf16_order).
bool bf16_order_is_amx();
// The CPU has AMX's bf16 tiles and the kernel lets this process use them.
bool cpu_has_amx();
// Sets the calling thread's tile configuration once (every tile 16 rows of 64 bytes): needed
// before its first tile instruction. Only where cpu_has_amx().
void configure_tiles_on_this_thread();
// gemm_packed_impl's bf16 GEMM in AMX's order: on the tiles where the CPU has AMX, else the model.
void gemm_amx_order(Trans trans_a, int64_t M, RowSource A, const PackedB& B, float beta, float* C, int64_t ldc,
                    const GemmExtras& extras);

}  // namespace pm::gemm_detail
