// The engine's own single-precision GEMM.
//
// Why not BLAS: OpenBLAS computes a row of C differently depending on how many rows the call
// has (small-matrix and direct paths, edge kernels), so splitting a GEMM into pipeline chunks
// changed the last bits of the results. Here every element C[i, j] is one fused multiply-add
// chain over k = 0..K-1 in order, starting from C (beta = 1) or zero (beta = 0): its value does
// not depend on M, on where the row sits, on the thread count, or on the instruction set
// (AVX-512, AVX2 and scalar paths perform the same chain). Pipelining changes time, never bits.
//
// The right-hand matrix is packed into panels of 64 columns, k-major, in strips that each kernel
// reads front to back (PackedB). Weights are packed once per iteration and reused by every chunk,
// so small pipeline chunks do not pay for repacking.
// Row-major throughout.
#pragma once

#include <algorithm>
#include <cstdint>
#include <functional>
#include <string>

#include "core/aligned.h"
#include "kernels/backend.h"

namespace pm {

// op(B)[K, N], packed: panel p holds columns [64p, 64p + 64), width_p = 64 except for the last
// panel (the remaining columns rounded up to 16, zero-padded), as strips of `strip` columns one
// after the other, each [K][strip] (strip_of(p) = min(strip, width_p)): element (k, j) of panel
// p sits at panel(p) + (j / S) * K * S + k * S + j % S. Each micro-kernel call reads one strip
// from start to end: AVX-512 kernels take a whole panel per call (strip 64: the panel is
// [K][width_p]); AVX2 kernels take 16 columns, and 16-column strips let them stream B
// contiguously (64-column rows made them jump 256 bytes per depth: 3-7% slower on Zen 3).
struct PackedB {
  int64_t K = 0, N = 0;  // K: the depth the kernels run (bf16: the source depth rounded up to even)
  int64_t strip = 64;    // columns per strip, chosen by pack_b for the instruction set of the day
  bool bf16 = false;     // packed by pack_b_bf16: GEMMs with it are bf16 GEMMs (below)
  int64_t source_depth = 0;  // the depth of op(B) (and of op(A)) before the bf16 pair padding
  FloatBuffer data;
  // bf16, on a CPU with AVX512_BF16: the same panels as bf16 pairs, one 32-bit word per (depth
  // pair, column), the even depth in the low half (vdpbf16ps's operand), per panel in blocks of 16
  // pairs ([pair_rows() / 16] blocks; pairs from K / 2 on zero). Within a block, as packed in the
  // dot order: pair by pair, [16][width_p] (what the AVX512_BF16 kernel reads fastest); in the amx
  // order (pair_tiles): 16 columns by 16, [width_p / 16][16 pairs][16 columns], each one AMX B tile
  // (1 KB, contiguous: its products took 0.86-0.95x the time of the pair-by-pair rows' on every
  // shape of bench/gemm_ab.sh, two processes at once). Every kernel reads both (pair_word_offset).
  std::vector<uint32_t, AlignedAllocator<uint32_t>> pairs;
  bool pair_tiles = false;
  int64_t pair_rows() const { return (K / 2 + 15) / 16 * 16; }
  const uint32_t* pair_panel(int64_t p) const { return pairs.data() + p * pair_rows() * 64; }
  // Where the word of depth pair q and column j sits in a panel `width` columns wide; a word's
  // next pair sits pair_step(width) words on within its block, its next 16 columns group_step on.
  int64_t pair_word_offset(int64_t width, int64_t q, int64_t j) const {
    return (q >> 4) * 16 * width + (q & 15) * pair_step(width) + (j >> 4) * group_step() + (j & 15);
  }
  int64_t pair_step(int64_t width) const { return pair_tiles ? 16 : width; }
  int64_t group_step() const { return pair_tiles ? 256 : 16; }
  int64_t panels() const { return (N + 63) / 64; }
  int64_t panel_width(int64_t p) const;
  int64_t strip_of(int64_t p) const { return std::min(strip, panel_width(p)); }
  const float* panel(int64_t p) const { return data.data() + p * K * 64; }
  // Element (k, j) of panel p (j < panel_width(p)).
  int64_t offset_in_panel(int64_t p, int64_t k, int64_t j) const {
    const int64_t S = strip_of(p);
    return (j / S) * K * S + k * S + j % S;
  }
};

// op(B) = B[K, N] (ldb >= N) or, with Trans::yes, the transpose of B[N, K] (ldb >= K).
void pack_b(Trans trans_b, int64_t K, int64_t N, const float* B, int64_t ldb, PackedB& out);

// Called on each finished tile of C (rows [row, row + rows), columns [col, col + cols)) while it is
// still in cache: fuses elementwise work into the GEMM without another pass over C. Called from
// the GEMM's worker threads for disjoint tiles.
using TileEpilogue = std::function<void(int64_t row, int64_t col, int64_t rows, int64_t cols)>;

struct GemmExtras {
  const float* bias = nullptr;           // [N]: with beta = 0, every chain starts from bias[j]
  const TileEpilogue* epilogue = nullptr;
  // C's rows anywhere: row i of C at c_rows[i] (C and ldc are not read); beta 0, no epilogue. An
  // expert's outputs go straight into the all-to-all's rows, where a copy took them from a buffer.
  // The bits of the same product into one matrix: each tile whose rows lie evenly apart is written
  // where it belongs, any other through the edge tiles' buffer.
  float* const* c_rows = nullptr;
  // The same with C's rows bf16 (c_rows16; not with c_rows): each value rounded to bf16 as its tile
  // is written (float_to_bf16's rounding: the bits of the float rows rounded after), where a bf16
  // all-to-all carries the expert's outputs.
  uint16_t* const* c_rows16 = nullptr;
  // A's row i times a_row_scale[i] (fp32, A not transposed; null: none), made as A is packed: the
  // bits of the product on rows scaled by a copy beforehand (one float product a value), without
  // writing the copy. An expert's output gradients dy reach it once per rank and each of its
  // choices reads them times its gate value.
  const float* a_row_scale = nullptr;
};

// C[M, N] = beta * C + op(A)[M, K] * B, beta 0 or 1. op(A) = A[M, K] (lda >= K) or, with
// Trans::yes, the transpose of A[K, M] (lda >= M).
void gemm_packed(Trans trans_a, int64_t M, const float* A, int64_t lda, const PackedB& B, float beta,
                 float* C, int64_t ldc, const GemmExtras& extras = {});

// C[M, N] = beta * C + A * B with A's rows anywhere: a_rows[i] points at row i of A[M, K] (an
// expert's input rows where the all-to-all left them). The bits of gemm_packed on the same rows
// copied into one matrix, without the copy (AVX-512 reads them in place as it would the matrix).
void gemm_packed_rows(int64_t M, const float* const* a_rows, const PackedB& B, float beta, float* C, int64_t ldc,
                      const GemmExtras& extras = {});

// Same, packing B on the fly (into a reused per-thread buffer).
void gemm(Trans trans_a, Trans trans_b, int64_t M, int64_t N, int64_t K, const float* A, int64_t lda,
          const float* B, int64_t ldb, float beta, float* C, int64_t ldc);

// C[M, N] = A[M, K] B[K, N] + bias[N] (bias null: zeros): the bits of C's rows filled with the bias
// and then gemm with beta 1, each element's chain started from the bias in the kernel instead (a
// linear layer's forward: no pass writing C and reading it back, 1.05-1.11x on 1536 rows of depth
// 192). Small products (at most 64 rows or 64 deep) take gemm's unpacked paths from filled rows.
void gemm_bias(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb,
               const float* bias, float* C, int64_t ldc);

// C[M, N] = beta * C + A^T B over K rows that sit anywhere: a_rows[k] points at row k of A[K, M]
// and b_rows[k] at row k of B[K, N]. The sum runs over k in order, so this gives the bits of
// gemm(Trans::yes, Trans::no, ...) on the same rows copied into contiguous matrices: weight
// gradients read rows where the pipeline chunks left them, in canonical order, without copying.
// b_column_sums ([N], optional): B's rows are also added into it, one after the other in order
// (the bits of sums[j] += row[j] row by row): a bias gradient reads the same rows as the weight
// gradient, and gets them while they are packed instead of in a pass of its own.
// b_row_scale ([K], optional): B's row k is b_row_scale[k] times the row (GemmExtras::a_row_scale's
// products, for the product and the sums alike).
void gemm_tn_rows(int64_t M, int64_t N, int64_t K, const float* const* a_rows, const float* const* b_rows,
                  float beta, float* C, int64_t ldc, float* b_column_sums = nullptr,
                  const float* b_row_scale = nullptr);

// ---- bf16 operands, fp32 accumulation ---------------------------------------------------------
// A bf16 GEMM rounds both operands to bf16 (to nearest even) and accumulates every element in fp32
// in the order AVX512_BF16's dot product (vdpbf16ps) takes a depth pair, odd depth first:
//   c = fma(a[1], b[1], c); c = fma(a[0], b[0], c); c = fma(a[3], b[3], c); c = fma(a[2], b[2], c); ...
// (an odd K ends with a zero pair member). A product of two bf16 values is exact in fp32, so the
// fp32 kernels running on rounded operands in that order compute what the instruction computes:
// the same bits on every CPU and path, except for denormal inputs, which the instruction reads as
// zero. As in fp32, an element's value never depends on M, the row's place or the thread count.
// The output C stays fp32.

// op(B) rounded to bf16, depths in pair order; gemm_packed with it runs a bf16 GEMM (A is rounded
// as it is packed).
void pack_b_bf16(Trans trans_b, int64_t K, int64_t N, const float* B, int64_t ldb, PackedB& out);

// gemm and gemm_tn_rows as bf16 GEMMs.
void gemm_bf16(Trans trans_a, Trans trans_b, int64_t M, int64_t N, int64_t K, const float* A, int64_t lda,
               const float* B, int64_t ldb, float beta, float* C, int64_t ldc);
// gemm_bias as a bf16 GEMM: the bits of gemm_bf16 with beta 1 on C's rows filled with the bias.
void gemm_bf16_bias(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb,
                    const float* bias, float* C, int64_t ldc);
void gemm_bf16_bias(int64_t M, int64_t N, int64_t K, const uint16_t* A, int64_t lda, const float* B, int64_t ldb,
                    const float* bias, float* C, int64_t ldc);  // A stored as bf16
// b_row_scale ([K], optional): B's row k is what a bf16 copy of b_row_scale[k] times the row holds
// (each product rounded to bf16: scaled_floats_to_bf16), for the product and the sums alike.
void gemm_tn_rows_bf16(int64_t M, int64_t N, int64_t K, const float* const* a_rows, const float* const* b_rows,
                       float beta, float* C, int64_t ldc, float* b_column_sums = nullptr,
                       const float* b_row_scale = nullptr);
// The same with A stored as bf16 (uint16_t bit patterns: activations a bf16 expert saved in bf16):
// the bits of the float versions on A's float32 values, without the rounding pass over A.
void gemm_packed(Trans trans_a, int64_t M, const uint16_t* A, int64_t lda, const PackedB& B, float beta, float* C,
                 int64_t ldc, const GemmExtras& extras = {});  // B packed by pack_b_bf16
void gemm_packed_rows(int64_t M, const uint16_t* const* a_rows, const PackedB& B, float beta, float* C, int64_t ldc,
                      const GemmExtras& extras = {});  // B packed by pack_b_bf16
void gemm_tn_rows_bf16(int64_t M, int64_t N, int64_t K, const uint16_t* const* a_rows, const float* const* b_rows,
                       float beta, float* C, int64_t ldc, float* b_column_sums = nullptr,
                       const float* b_row_scale = nullptr);
// ... and with B's rows stored as bf16 (output gradients a bf16 all-to-all carried): the bits of
// the float versions on B's float32 values (the column sums add the widened values).
void gemm_tn_rows_bf16(int64_t M, int64_t N, int64_t K, const float* const* a_rows, const uint16_t* const* b_rows,
                       float beta, float* C, int64_t ldc, float* b_column_sums = nullptr);
void gemm_tn_rows_bf16(int64_t M, int64_t N, int64_t K, const uint16_t* const* a_rows, const uint16_t* const* b_rows,
                       float beta, float* C, int64_t ldc, float* b_column_sums = nullptr);
void gemm_bf16(Trans trans_a, Trans trans_b, int64_t M, int64_t N, int64_t K, const uint16_t* A, int64_t lda,
               const float* B, int64_t ldb, float beta, float* C, int64_t ldc);

// The order in which bf16 GEMMs sum (both exact definitions: the same bits on every CPU and path):
// - dot (the default): vdpbf16ps's, above.
// - amx: Intel AMX's tile product (TDPBF16PS), per element and block of 32 depths from depth 0:
//   the even depths' products added in order, each add rounded, the odd depths' likewise, then
//   c = c + (even sum + odd sum). It runs on AMX where the CPU has it (2.6-15x the AVX512_BF16
//   kernel on the Xeon measured), on an fp32 model of the order elsewhere (slower).
// Set once per process, before the first bf16 GEMM (every rank alike: the order fixes the bits;
// pipemoe's --bf16-order, whose `auto` the ranks resolve together, apps/pipemoe/bf16_order.cpp).
enum class Bf16Order { dot, amx };
#define PM_HAVE_BF16_ORDER 1  // (bench/gemm_ab builds older revisions too)
void set_bf16_order(Bf16Order order);
Bf16Order bf16_order();
std::string bf16_order_name();  // "dot" or "amx"
// How the amx order runs here: "amx", or "amx order on fp32 (no AMX here)".
std::string bf16_amx_path();
// Whether this CPU runs the amx order on AMX's tiles (it has them, Linux grants them, and they
// passed the first-use check).
bool amx_runs_here();
// For tests: the amx order on its model even where the CPU has AMX.
void use_amx_model_for_testing(bool on);

// Which micro-kernels run: "avx512", "avx2" or "scalar" (all give the same bits).
std::string gemm_isa();
// How bf16 GEMMs run: "avx512_bf16" (vdpbf16ps on bf16 pairs) or "fp32 kernels" (on rounded
// operands in the same order; CPUs without AVX512_BF16, or a forced slower instruction set).
// The AVX512_BF16 kernel is checked against the fp32 kernels once, on first use, and left out
// with a warning if they disagree.
std::string gemm_bf16_path();
// "" where bf16 GEMMs run on their fast path; else why not, in a few words for the user.
std::string gemm_bf16_note();
// For tests: force a slower instruction set ("avx2", "scalar"); "" restores the best one.
void force_gemm_isa(const std::string& isa);
// For tests on CPUs without AVX512_BF16: bf16 GEMMs packed while this is on take the AVX512_BF16
// path (its pair words, their packing, its tile loop and first-use check) with each tile computed
// by a scalar model of vdpbf16ps instead of the instruction; gemm_bf16_path() says "avx512_bf16
// (emulated)". bf16_dot_tiles_emulated() counts the tiles the model computed.
void emulate_bf16_dot_for_testing(bool on);
int64_t bf16_dot_tiles_emulated();

}  // namespace pm
