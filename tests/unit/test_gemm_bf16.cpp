// bf16 GEMMs (kernels/cpu/gemm.h): the exact chain they promise (operands rounded to bf16, fp32
// accumulation, depth pairs odd depth first, as vdpbf16ps takes them), against float64 within the
// error bf16 rounding allows, and the bit-for-bit promises the pipeline relies on.
#include <fmt/format.h>
#include <gtest/gtest.h>

#include <array>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "core/rng.h"
#include "core/tensor.h"
#include "kernels/cpu/gemm.h"
#include "kernels/cpu/gemm_internal.h"
#include "kernels/cpu/thread_pool.h"
#include "support/gemm_operands.h"

namespace pm {
namespace {

std::vector<float> random_matrix(int64_t n, uint64_t stream) {
  std::vector<float> v(n);
  Rng(7, stream).fill_normal(v.data(), n, 0.0f, 1.0f);
  return v;
}

float at(Trans t, const std::vector<float>& X, int64_t rows, int64_t cols, int64_t i, int64_t j) {
  // op(X)[i, j] of an op(X) [rows, cols]
  return t == Trans::no ? X[i * cols + j] : X[j * rows + i];
}

// The chain the header specifies, written out element by element (scalar fma, no packing).
std::vector<float> chain(Trans ta, Trans tb, int64_t M, int64_t N, int64_t K, const std::vector<float>& A,
                         const std::vector<float>& B, const std::vector<float>& C0, float beta) {
  std::vector<float> C(M * N);
  for (int64_t i = 0; i < M; ++i)
    for (int64_t j = 0; j < N; ++j) {
      float c = beta == 0.0f ? 0.0f : C0[i * N + j];
      for (int64_t p = 0; p < K; p += 2)
        for (int64_t d : {p + 1, p}) {
          float a = d < K ? round_to_bf16(at(ta, A, M, K, i, d)) : 0.0f;
          float b = d < K ? round_to_bf16(at(tb, B, K, N, d, j)) : 0.0f;
          c = std::fma(a, b, c);
        }
      C[i * N + j] = c;
    }
  return C;
}

struct Shape {
  int64_t M, N, K;
};

class Bf16Shapes : public ::testing::TestWithParam<Shape> {};

TEST_P(Bf16Shapes, GivesTheSpecifiedChainBitForBitAndStaysWithinBf16Error) {
  const auto [M, N, K] = GetParam();
  for (Trans ta : {Trans::no, Trans::yes})
    for (Trans tb : {Trans::no, Trans::yes})
      for (float beta : {0.0f, 1.0f}) {
        auto A = random_matrix(M * K, 1), B = random_matrix(K * N, 2), C = random_matrix(M * N, 3);
        auto expected = chain(ta, tb, M, N, K, A, B, C, beta);
        std::vector<float> ours = C;
        gemm_bf16(ta, tb, M, N, K, A.data(), ta == Trans::no ? K : M, B.data(), tb == Trans::no ? N : K, beta,
                  ours.data(), N);
        EXPECT_EQ(0, std::memcmp(ours.data(), expected.data(), ours.size() * sizeof(float)))
            << "ta=" << int(ta) << " tb=" << int(tb) << " beta=" << beta;
        // Against float64 on the unrounded operands: rounding moves each operand by at most 2^-8 of
        // itself (bf16 keeps 8 significant bits), so a product by at most 2^-7 + 2^-16 of |a b|;
        // fp32 accumulation adds at most K * 2^-24 of the sum of magnitudes.
        double worst = 0;
        for (int64_t i = 0; i < M; ++i)
          for (int64_t j = 0; j < N; ++j) {
            double exact = beta * C[i * N + j], magnitude = std::abs(exact);
            for (int64_t d = 0; d < K; ++d) {
              double prod = static_cast<double>(at(ta, A, M, K, i, d)) * at(tb, B, K, N, d, j);
              exact += prod;
              magnitude += std::abs(prod);
            }
            double bound = (std::ldexp(1.0, -7) + std::ldexp(1.0, -16) + K * std::ldexp(1.0, -24)) * magnitude + 1e-30;
            worst = std::max(worst, std::abs(ours[i * N + j] - exact) / bound);
          }
        EXPECT_LE(worst, 1.0) << "error beyond the bf16 bound";
      }
}

INSTANTIATE_TEST_SUITE_P(Sizes, Bf16Shapes,
                         ::testing::Values(Shape{1, 1, 1}, Shape{7, 13, 5}, Shape{6, 64, 16}, Shape{37, 100, 71},
                                           Shape{50, 130, 1101}, Shape{13, 8, 0}, Shape{30, 17, 2},
                                           Shape{523, 66, 530},  // two blocks of rows
                                           Shape{31, 40, 2403}),  // of depths: 2048 + 355 (AVX512_BF16), 1024 x 2 + 355
                         [](const ::testing::TestParamInfo<Shape>& info) {
                           const Shape& s = info.param;
                           return fmt::format("M{}_N{}_K{}", s.M, s.N, s.K);
                         });

// bf16 is not fp32: the rounding shows (else the tests above could pass on an fp32 GEMM).
TEST(GemmBf16, DiffersFromTheFp32Gemm) {
  const int64_t M = 8, N = 16, K = 64;
  auto A = random_matrix(M * K, 4), B = random_matrix(K * N, 5);
  std::vector<float> c32(M * N), c16(M * N);
  gemm(Trans::no, Trans::no, M, N, K, A.data(), K, B.data(), N, 0.0f, c32.data(), N);
  gemm_bf16(Trans::no, Trans::no, M, N, K, A.data(), K, B.data(), N, 0.0f, c16.data(), N);
  int differing = 0;
  for (int64_t i = 0; i < M * N; ++i) differing += c32[i] != c16[i];
  EXPECT_GT(differing, M * N / 2);
}

// A float A is rounded to bf16 as it is packed, ties to even, in the vector packing (six whole
// rows, 16 depths at a time) and the scalar one (its last depths): ties that round down and up at
// every depth of a row, through a product with one-hot B columns that gives back each rounded value.
TEST(GemmBf16, RoundsFloatRowsOfATiesToEvenAsItPacksThem) {
  const int64_t M = 12, K = 40, N = K;  // K: two blocks of 16 depths and 8 more
  std::vector<float> A(M * K), B(K * N, 0.0f), expected(M * N);
  for (int64_t d = 0; d < K; ++d) B[d * N + d] = 1.0f;
  for (int64_t i = 0; i < M; ++i)
    for (int64_t d = 0; d < K; ++d) {
      // bf16 value 0x3f80 + n (even or odd last kept bit) plus exactly half its last place, signed
      const uint32_t kept = 0x3f80u + static_cast<uint32_t>((i * K + d) % 97);
      const uint32_t bits = (kept << 16) | 0x8000u | (i % 2 ? 0x80000000u : 0u);
      std::memcpy(&A[i * K + d], &bits, 4);
      const uint32_t rounded = ((kept + (kept & 1u)) << 16) | (i % 2 ? 0x80000000u : 0u);
      std::memcpy(&expected[i * N + d], &rounded, 4);
      EXPECT_EQ(round_to_bf16(A[i * K + d]), expected[i * N + d]);
    }
  std::vector<float> C(M * N);
  gemm_bf16(Trans::no, Trans::no, M, N, K, A.data(), K, B.data(), N, 0.0f, C.data(), N);
  EXPECT_EQ(0, std::memcmp(C.data(), expected.data(), C.size() * sizeof(float)));
  A[7 * K + 3] = std::nanf("");  // a NaN stays a NaN (rounding must not carry it into infinity)
  gemm_bf16(Trans::no, Trans::no, M, N, K, A.data(), K, B.data(), N, 0.0f, C.data(), N);
  EXPECT_TRUE(std::isnan(C[7 * N + 3]));
}

TEST(GemmBf16, RowResultsDoNotDependOnSplitsInstructionSetsOrThreads) {
  const int64_t M = 97, N = 150, K = 531;
  auto A = random_matrix(M * K, 6), B = random_matrix(K * N, 7), C0 = random_matrix(M * N, 8);
  PackedB packed;
  pack_b_bf16(Trans::no, K, N, B.data(), N, packed);
  auto run = [&](int64_t split) { return test::gemm_in_row_splits(A, M, K, packed, C0, split); };
  const std::vector<float> whole = run(M);
  for (int64_t split : {1, 5, 6, 64}) {
    auto parts = run(split);
    EXPECT_EQ(0, std::memcmp(whole.data(), parts.data(), whole.size() * sizeof(float))) << "split " << split;
  }
  for (const char* isa : {"avx2", "scalar"}) {
    if (std::string(isa) == "avx2" && !__builtin_cpu_supports("avx2")) continue;
    force_gemm_isa(isa);
    auto other = run(M);
    EXPECT_EQ(0, std::memcmp(whole.data(), other.data(), whole.size() * sizeof(float))) << isa;
  }
  force_gemm_isa("");
  set_compute_threads(2);
  auto threaded = run(M);
  set_compute_threads(1);
  EXPECT_EQ(0, std::memcmp(whole.data(), threaded.data(), whole.size() * sizeof(float)));
}

// Weight gradients read rows where the pipeline left them: the bits of the contiguous product.
TEST(GemmBf16, RowsGivenByPointersGiveTheBitsOfTheContiguousProduct) {
  const int64_t M = 40, N = 70, K = 33;
  auto A = random_matrix(K * M, 9), B = random_matrix(K * N, 10), C0 = random_matrix(M * N, 11);
  std::vector<const float*> a_rows, b_rows;
  for (int64_t k = 0; k < K; ++k) {
    a_rows.push_back(A.data() + k * M);
    b_rows.push_back(B.data() + k * N);
  }
  std::vector<float> by_rows = C0, contiguous = C0;
  gemm_tn_rows_bf16(M, N, K, a_rows.data(), b_rows.data(), 1.0f, by_rows.data(), N);
  gemm_bf16(Trans::yes, Trans::no, M, N, K, A.data(), M, B.data(), N, 1.0f, contiguous.data(), N);
  EXPECT_EQ(0, std::memcmp(by_rows.data(), contiguous.data(), by_rows.size() * sizeof(float)));
}

// An expert's input rows read where the all-to-all left them (gemm_packed_rows), floats or bf16
// rows, and bf16 rows one after the other: the bits of A held in floats, on every instruction set
// and with threads; a bias, odd depths (packed) and even ones (the AVX512_BF16 kernel reads bf16
// rows in place below 16 panels of B, packed from 17: N 1030), partial micro-panels, several blocks
// of rows and of depths.
TEST(GemmBf16, ARowsByPointersGiveTheContiguousProductsBits) {
  for (auto [M, N, K] : {std::array<int64_t, 3>{13, 70, 33}, {1100, 40, 9}, {37, 150, 2403}, {13, 70, 32},
                         {1100, 40, 10}, {37, 150, 2404}, {13, 1030, 64}})
    for (float beta : {0.0f, 1.0f}) {
      const auto A = random_matrix(M * K, 21), B = random_matrix(K * N, 22), C0 = random_matrix(M * N, 23),
                 bias = random_matrix(N, 24);
      PackedB packed;
      pack_b_bf16(Trans::no, K, N, B.data(), N, packed);
      const GemmExtras extras{beta == 0.0f ? bias.data() : nullptr, nullptr};
      std::vector<float> expected = C0;
      gemm_packed(Trans::no, M, A.data(), K, packed, beta, expected.data(), N, extras);
      for (int threads : {1, 2})
        for (const char* isa : {"", "avx2", "scalar"}) {
          if (std::string(isa) == "avx2" && !__builtin_cpu_supports("avx2")) continue;
          force_gemm_isa(isa);
          set_compute_threads(threads);
          const auto f32 = test::gemm_by_row_pointers<float>(A, M, K, packed, beta, C0, extras);
          const auto b16 = test::gemm_by_row_pointers<uint16_t>(A, M, K, packed, beta, C0, extras);
          std::vector<uint16_t> A16(A.size());
          floats_to_bf16(A.data(), A16.data(), static_cast<int64_t>(A.size()));
          std::vector<float> contiguous16 = C0;
          gemm_packed(Trans::no, M, A16.data(), K, packed, beta, contiguous16.data(), N, extras);
          const std::string what = fmt::format("{}x{}x{} beta {} isa '{}' threads {}", M, N, K, beta, isa, threads);
          EXPECT_EQ(0, std::memcmp(expected.data(), f32.data(), f32.size() * sizeof(float))) << "float rows, " << what;
          EXPECT_EQ(0, std::memcmp(expected.data(), b16.data(), b16.size() * sizeof(float))) << "bf16 rows, " << what;
          EXPECT_EQ(0, std::memcmp(expected.data(), contiguous16.data(), b16.size() * sizeof(float)))
              << "bf16 rows one after the other, " << what;
        }
      force_gemm_isa("");
      set_compute_threads(1);
    }
}

// A stored as bf16 (activations a bf16 expert saves in bf16) gives the bits of A stored as floats,
// contiguous or by row pointers, on every instruction set; odd depths and partial micro-panels.
TEST(GemmBf16, AStoredInBf16GivesTheBitsOfAStoredInFloats) {
  const int64_t M = 29, N = 83, K = 531;
  auto A = random_matrix(M * K, 14), B = random_matrix(K * N, 15), C0 = random_matrix(M * N, 16);
  std::vector<uint16_t> A16(A.size());
  floats_to_bf16(A.data(), A16.data(), static_cast<int64_t>(A.size()));
  PackedB packed;
  pack_b_bf16(Trans::no, K, N, B.data(), N, packed);
  std::vector<std::string> isas{""};
  if (__builtin_cpu_supports("avx2")) isas.push_back("avx2");
  isas.push_back("scalar");
  for (const std::string& isa : isas) {
    force_gemm_isa(isa);
    for (float beta : {0.0f, 1.0f}) {
      std::vector<float> from_floats = C0, from_bf16 = C0;
      gemm_packed(Trans::no, M, A.data(), K, packed, beta, from_floats.data(), N);
      gemm_packed(Trans::no, M, A16.data(), K, packed, beta, from_bf16.data(), N);
      EXPECT_EQ(0, std::memcmp(from_floats.data(), from_bf16.data(), from_floats.size() * sizeof(float)))
          << "isa '" << isa << "' beta " << beta;
    }
    // A^T B with A's K rows [M] by pointers (the weight gradients' form)
    const int64_t Kt = 37, Mt = 45, Nt = 70;
    auto At = random_matrix(Kt * Mt, 17), Bt = random_matrix(Kt * Nt, 18);
    std::vector<uint16_t> At16(At.size());
    floats_to_bf16(At.data(), At16.data(), static_cast<int64_t>(At.size()));
    std::vector<const float*> a_rows, b_rows;
    std::vector<const uint16_t*> a_rows16;
    for (int64_t k = Kt - 1; k >= 0; --k) {  // rows anywhere: here in reverse storage order
      a_rows.push_back(At.data() + k * Mt);
      a_rows16.push_back(At16.data() + k * Mt);
      b_rows.push_back(Bt.data() + k * Nt);
    }
    std::vector<float> by_floats(Mt * Nt, 0.5f), by_bf16(Mt * Nt, 0.5f);
    gemm_tn_rows_bf16(Mt, Nt, Kt, a_rows.data(), b_rows.data(), 1.0f, by_floats.data(), Nt);
    gemm_tn_rows_bf16(Mt, Nt, Kt, a_rows16.data(), b_rows.data(), 1.0f, by_bf16.data(), Nt);
    EXPECT_EQ(0, std::memcmp(by_floats.data(), by_bf16.data(), by_floats.size() * sizeof(float))) << "isa '" << isa << "'";
  }
  force_gemm_isa("");
}

// The bias gradient summed while B's rows are packed (b_column_sums) has the bits of adding the
// rows one after the other, and leaves the product's bits alone: fp32, bf16 with A in floats or
// in bf16, on every instruction set (AVX512_BF16 where the CPU has it, the fp32 kernels
// otherwise), an odd K, a partial panel, and no columns of A at all.
TEST(GemmBf16, ColumnSumsOfBGiveTheBitsOfAddingTheRowsInOrder) {
  const int64_t M = 45, N = 83, K = 37;
  auto A = random_matrix(K * M, 30), B = random_matrix(K * N, 31), start = random_matrix(N, 32);
  std::vector<uint16_t> A16(A.size());
  floats_to_bf16(A.data(), A16.data(), static_cast<int64_t>(A.size()));
  std::vector<const float*> a_rows, b_rows;
  std::vector<const uint16_t*> a_rows16;
  for (int64_t k = 0; k < K; ++k) {
    a_rows.push_back(A.data() + k * M);
    a_rows16.push_back(A16.data() + k * M);
    b_rows.push_back(B.data() + k * N);
  }
  std::vector<float> expected = start;
  for (int64_t k = 0; k < K; ++k)
    for (int64_t j = 0; j < N; ++j) expected[j] += B[k * N + j];
  std::vector<std::string> isas{""};
  if (__builtin_cpu_supports("avx2")) isas.push_back("avx2");
  for (const std::string& isa : isas)
    for (bool emulate : {false, true}) {  // emulate: the AVX512_BF16 path on any CPU (its packing sums)
      force_gemm_isa(isa);
      emulate_bf16_dot_for_testing(emulate);
      for (int variant = 0; variant < 3; ++variant) {
        std::vector<float> plain(M * N, 0.5f), fused(M * N, 0.5f), sums = start;
        auto run = [&](std::vector<float>& C, float* column_sums) {
          if (variant == 0) gemm_tn_rows(M, N, K, a_rows.data(), b_rows.data(), 1.0f, C.data(), N, column_sums);
          if (variant == 1) gemm_tn_rows_bf16(M, N, K, a_rows.data(), b_rows.data(), 1.0f, C.data(), N, column_sums);
          if (variant == 2) gemm_tn_rows_bf16(M, N, K, a_rows16.data(), b_rows.data(), 1.0f, C.data(), N, column_sums);
        };
        run(plain, nullptr);
        run(fused, sums.data());
        EXPECT_EQ(0, std::memcmp(sums.data(), expected.data(), N * sizeof(float))) << "isa '" << isa << "' " << variant;
        EXPECT_EQ(0, std::memcmp(plain.data(), fused.data(), plain.size() * sizeof(float))) << "isa '" << isa << "' " << variant;
      }
    }
  emulate_bf16_dot_for_testing(false);
  force_gemm_isa("");
  std::vector<float> sums = start, C;
  gemm_tn_rows_bf16(0, N, K, a_rows.data(), b_rows.data(), 1.0f, C.data(), N, sums.data());
  EXPECT_EQ(0, std::memcmp(sums.data(), expected.data(), N * sizeof(float))) << "no columns of A";
}

// B's rows stored as bf16 (output gradients a bf16 all-to-all carried) give the bits of the same
// values as floats, product and column sums, with A's rows floats or bf16, on every instruction
// set and packing path (an odd K, a partial panel, and no columns of A at all).
TEST(GemmBf16, BRowsStoredAsBf16GiveTheBitsOfTheirFloatValues) {
  const int64_t M = 45, N = 83, K = 37;
  auto A = random_matrix(K * M, 33), B = random_matrix(K * N, 34), start = random_matrix(N, 35);
  std::vector<uint16_t> A16(A.size()), B16(B.size());
  floats_to_bf16(A.data(), A16.data(), static_cast<int64_t>(A.size()));
  floats_to_bf16(B.data(), B16.data(), static_cast<int64_t>(B.size()));
  std::vector<float> Bq(B.size());  // B's values as bf16 holds them
  for (size_t i = 0; i < B.size(); ++i) Bq[i] = bf16_to_float(B16[i]);
  std::vector<const float*> a_rows, bq_rows;
  std::vector<const uint16_t*> a_rows16, b_rows16;
  for (int64_t k = K - 1; k >= 0; --k) {  // rows anywhere: here in reverse storage order
    a_rows.push_back(A.data() + k * M);
    a_rows16.push_back(A16.data() + k * M);
    bq_rows.push_back(Bq.data() + k * N);
    b_rows16.push_back(B16.data() + k * N);
  }
  std::vector<std::string> isas{""};
  if (__builtin_cpu_supports("avx2")) isas.push_back("avx2");
  for (const std::string& isa : isas)
    for (bool emulate : {false, true}) {
      force_gemm_isa(isa);
      emulate_bf16_dot_for_testing(emulate);
      for (int64_t m : {M, int64_t{0}})
        for (bool a16 : {false, true}) {
          std::vector<float> from_floats(M * N, 0.5f), from_bf16(M * N, 0.5f), sums_floats = start, sums_bf16 = start;
          if (a16) {
            gemm_tn_rows_bf16(m, N, K, a_rows16.data(), bq_rows.data(), 1.0f, from_floats.data(), N, sums_floats.data());
            gemm_tn_rows_bf16(m, N, K, a_rows16.data(), b_rows16.data(), 1.0f, from_bf16.data(), N, sums_bf16.data());
          } else {
            gemm_tn_rows_bf16(m, N, K, a_rows.data(), bq_rows.data(), 1.0f, from_floats.data(), N, sums_floats.data());
            gemm_tn_rows_bf16(m, N, K, a_rows.data(), b_rows16.data(), 1.0f, from_bf16.data(), N, sums_bf16.data());
          }
          const std::string where = "isa '" + isa + "' emulate " + std::to_string(emulate) + " M " + std::to_string(m) +
                                    " a16 " + std::to_string(a16);
          EXPECT_EQ(0, std::memcmp(from_floats.data(), from_bf16.data(), M * N * sizeof(float))) << where;
          EXPECT_EQ(0, std::memcmp(sums_floats.data(), sums_bf16.data(), N * sizeof(float))) << where;
          EXPECT_NE(0, std::memcmp(sums_bf16.data(), start.data(), N * sizeof(float))) << where;
        }
    }
  emulate_bf16_dot_for_testing(false);
  force_gemm_isa("");
}

// Float rows of B each times a scale (b_row_scale: a bf16 expert's output gradients read where
// the deduplicated dispatch left them) give the bits of a bf16 copy of the scaled rows, product
// and column sums, with A's rows floats or bf16: on AVX512_BF16 (and its emulation), where the
// pair words' packing rounds the rows, in AMX's order (on its model too), and on the fp32 kernels
// (a copy first); an odd K, a partial panel, and no columns of A at all.
TEST(GemmBf16, ScaledBRowsGiveTheBitsOfABf16CopyOfThem) {
  const int64_t M = 45, N = 83, K = 37;
  auto A = random_matrix(K * M, 36), B = random_matrix(K * N, 37), scale = random_matrix(K, 38),
       start = random_matrix(N, 39);
  std::vector<uint16_t> A16(A.size()), copy(B.size());
  floats_to_bf16(A.data(), A16.data(), static_cast<int64_t>(A.size()));
  for (int64_t k = 0; k < K; ++k)
    for (int64_t j = 0; j < N; ++j) copy[k * N + j] = float_to_bf16(scale[k] * B[k * N + j]);
  std::vector<const float*> a_rows, b_rows;
  std::vector<const uint16_t*> a_rows16, copy_rows;
  std::vector<float> row_scale;
  for (int64_t k = K - 1; k >= 0; --k) {  // rows anywhere: here in reverse storage order
    a_rows.push_back(A.data() + k * M);
    a_rows16.push_back(A16.data() + k * M);
    b_rows.push_back(B.data() + k * N);
    copy_rows.push_back(copy.data() + k * N);
    row_scale.push_back(scale[k]);
  }
  struct Path {
    std::string isa;
    bool emulate;
    Bf16Order order;
    bool amx_model;
  };
  std::vector<Path> paths{{"", false, Bf16Order::dot, false}, {"", true, Bf16Order::dot, false},
                          {"", false, Bf16Order::amx, false}, {"", false, Bf16Order::amx, true}};
  if (__builtin_cpu_supports("avx2")) paths.push_back({"avx2", false, Bf16Order::dot, false});
  for (const Path& path : paths) {
    force_gemm_isa(path.isa);
    emulate_bf16_dot_for_testing(path.emulate);
    set_bf16_order(path.order);
    use_amx_model_for_testing(path.amx_model);
    for (int64_t m : {M, int64_t{0}})
      for (bool a16 : {false, true}) {
        std::vector<float> from_copy(M * N, 0.5f), scaled(M * N, 0.5f), sums_copy = start, sums_scaled = start;
        if (a16) {
          gemm_tn_rows_bf16(m, N, K, a_rows16.data(), copy_rows.data(), 1.0f, from_copy.data(), N, sums_copy.data());
          gemm_tn_rows_bf16(m, N, K, a_rows16.data(), b_rows.data(), 1.0f, scaled.data(), N, sums_scaled.data(),
                            row_scale.data());
        } else {
          gemm_tn_rows_bf16(m, N, K, a_rows.data(), copy_rows.data(), 1.0f, from_copy.data(), N, sums_copy.data());
          gemm_tn_rows_bf16(m, N, K, a_rows.data(), b_rows.data(), 1.0f, scaled.data(), N, sums_scaled.data(),
                            row_scale.data());
        }
        const std::string where = "isa '" + path.isa + "' emulate " + std::to_string(path.emulate) + " amx " +
                                  std::to_string(path.order == Bf16Order::amx) + " model " +
                                  std::to_string(path.amx_model) + " M " + std::to_string(m) + " a16 " +
                                  std::to_string(a16);
        EXPECT_EQ(0, std::memcmp(from_copy.data(), scaled.data(), M * N * sizeof(float))) << where;
        EXPECT_EQ(0, std::memcmp(sums_copy.data(), sums_scaled.data(), N * sizeof(float))) << where;
        if (m > 0) {
          EXPECT_NE(0, std::memcmp(scaled.data(), std::vector<float>(M * N, 0.5f).data(), M * N * sizeof(float)));
        }
      }
  }
  use_amx_model_for_testing(false);
  set_bf16_order(Bf16Order::dot);
  emulate_bf16_dot_for_testing(false);
  force_gemm_isa("");
}

// Where bf16 GEMMs run on the pair words, pack_b_bf16 makes only those, a transposed B's straight
// from its rows (16 x 16 word transposes): the words the float panels made them from before, in
// both orders' layouts, with odd depths, partial panels, a NaN, a denormal and a tie; and the
// product on them, then on the fp32 kernels (float panels made back from the words), the bits of
// the product on both forms.
TEST(GemmBf16, WordsAlonePackTheWordsOfTheFloatPanels) {
  if (!gemm_detail::bf16_pair_words_wanted()) GTEST_SKIP() << "no pair words on this CPU";
  for (Bf16Order order : {Bf16Order::dot, Bf16Order::amx})
    for (Trans tb : {Trans::yes, Trans::no})
      for (auto [K, N] : {std::array<int64_t, 2>{1, 1}, {5, 17}, {33, 64}, {64, 100}, {131, 70}, {512, 256}}) {
        set_bf16_order(order);
        auto B = random_matrix(K * N, 31);
        B[0] = std::nanf("");
        if (B.size() > 2) B[1] = 1e-40f, B[2] = 1.00390625f;  // a denormal; a tie to even
        const int64_t ldb = tb == Trans::no ? N : K;
        PackedB both, words;
        gemm_detail::pack_b_bf16_forms(tb, K, N, B.data(), ldb, both, true, true);
        gemm_detail::pack_b_bf16_forms(tb, K, N, B.data(), ldb, words, false, true);
        const std::string what = fmt::format("{} order, tb {}, {}x{}", bf16_order_name(), int(tb), K, N);
        ASSERT_TRUE(words.data.empty()) << what;
        ASSERT_EQ(words.K, both.K) << what;
        ASSERT_EQ(words.pair_tiles, both.pair_tiles) << what;
        for (int64_t p = 0; p < both.panels(); ++p)
          for (int64_t q = 0; q < both.pair_rows(); ++q)
            for (int64_t j = 0; j < both.panel_width(p); ++j) {
              const int64_t at = both.pair_word_offset(both.panel_width(p), q, j);
              ASSERT_EQ(words.pair_panel(p)[at], both.pair_panel(p)[at]) << what << " panel " << p << " pair " << q
                                                                         << " column " << j;
            }
        const int64_t M = 11;
        auto A = random_matrix(M * K, 32), C0 = random_matrix(M * N, 33);
        std::vector<float> on_words = C0, on_both = C0, on_fp32 = C0;
        gemm_packed(Trans::no, M, A.data(), K, words, 1.0f, on_words.data(), N);
        gemm_packed(Trans::no, M, A.data(), K, both, 1.0f, on_both.data(), N);
        force_gemm_isa("scalar");
        gemm_packed(Trans::no, M, A.data(), K, words, 1.0f, on_fp32.data(), N);
        force_gemm_isa("");
        const auto same = [](const std::vector<float>& a, const std::vector<float>& b) {
          return std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
        };
        EXPECT_TRUE(same(on_words, on_both)) << what;
        if (order == Bf16Order::dot) {
          EXPECT_TRUE(same(on_words, on_fp32)) << what << ", on the fp32 kernels";
        }
      }
  set_bf16_order(Bf16Order::dot);
}

// An fp32 pack after a bf16 one (the same thread-local buffers) is an fp32 GEMM again.
TEST(GemmBf16, Fp32PackingAfterBf16IsFp32) {
  const int64_t M = 5, N = 20, K = 9;
  auto A = random_matrix(M * K, 12), B = random_matrix(K * N, 13);
  std::vector<float> first(M * N), bf(M * N), second(M * N);
  gemm(Trans::no, Trans::no, M, N, K, A.data(), K, B.data(), N, 0.0f, first.data(), N);
  gemm_bf16(Trans::no, Trans::no, M, N, K, A.data(), K, B.data(), N, 0.0f, bf.data(), N);
  gemm(Trans::no, Trans::no, M, N, K, A.data(), K, B.data(), N, 0.0f, second.data(), N);
  EXPECT_EQ(0, std::memcmp(first.data(), second.data(), first.size() * sizeof(float)));
}

}  // namespace
}  // namespace pm

namespace pm {
namespace {

// Where the CPU has AVX512_BF16, bf16 GEMMs run vdpbf16ps (its first use checked it against the
// fp32 kernels, and the tests above compare it with the written-out chain); elsewhere the fp32
// kernels on rounded operands.
TEST(GemmBf16, UsesTheBf16InstructionsWhereTheCpuHasThem) {
  if (!__builtin_cpu_supports("avx512bf16")) {
    EXPECT_EQ(gemm_bf16_path(), "fp32 kernels");
    GTEST_SKIP() << "this CPU has no AVX512_BF16: the kernel that uses it is not exercised here";
  }
  EXPECT_EQ(gemm_bf16_path(), "avx512_bf16") << "the AVX512_BF16 kernel disagreed with the fp32 chain";
  force_gemm_isa("avx2");
  EXPECT_EQ(gemm_bf16_path(), "fp32 kernels");
  force_gemm_isa("");
}

}  // namespace
}  // namespace pm

namespace pm {
namespace {

// The AVX512_BF16 path on any CPU: its pair words, their packing (A's per micro-panel, B's per
// panel), the tile loop with edge tiles, a bias, beta 1, A stored in bf16, rows by pointers, two
// threads, and the first-use check, with a scalar model of vdpbf16ps in place of the instruction.
// It must give the bits of the written-out chain and of the fp32 kernels, as the real kernel must.
class EmulatedBf16Dot : public ::testing::Test {
 protected:
  void SetUp() override { emulate_bf16_dot_for_testing(true); }
  void TearDown() override {
    emulate_bf16_dot_for_testing(false);
    set_compute_threads(1);
  }
};

TEST_F(EmulatedBf16Dot, GivesTheChainsBitsOnEveryShape) {
  EXPECT_EQ(gemm_bf16_path(), "avx512_bf16 (emulated)") << "the model failed its first-use check";
  for (Shape s : {Shape{1, 1, 1}, Shape{6, 16, 2}, Shape{13, 83, 2403}, Shape{7, 130, 517}, Shape{97, 150, 64},
                  Shape{520, 70, 9}})
    for (Trans ta : {Trans::no, Trans::yes})
      for (Trans tb : {Trans::no, Trans::yes})
        for (float beta : {0.0f, 1.0f}) {
          auto A = random_matrix(s.M * s.K, 21), B = random_matrix(s.K * s.N, 22), C0 = random_matrix(s.M * s.N, 23);
          const auto expected = chain(ta, tb, s.M, s.N, s.K, A, B, C0, beta);
          std::vector<float> C = C0;
          const int64_t before = bf16_dot_tiles_emulated();
          gemm_bf16(ta, tb, s.M, s.N, s.K, A.data(), ta == Trans::no ? s.K : s.M, B.data(),
                    tb == Trans::no ? s.N : s.K, beta, C.data(), s.N);
          EXPECT_GT(bf16_dot_tiles_emulated(), before) << "the AVX512_BF16 path did not run";
          EXPECT_EQ(0, std::memcmp(C.data(), expected.data(), C.size() * sizeof(float)))
              << s.M << "x" << s.N << "x" << s.K << " ta " << (ta == Trans::yes) << " tb " << (tb == Trans::yes)
              << " beta " << beta;
        }
}

TEST_F(EmulatedBf16Dot, GivesTheFp32KernelsBitsWithABiasBf16RowsPointersAndThreads) {
  const int64_t M = 29, N = 83, K = 531;
  auto A = random_matrix(M * K, 24), B = random_matrix(K * N, 25), bias = random_matrix(N, 26);
  std::vector<uint16_t> A16(A.size());
  floats_to_bf16(A.data(), A16.data(), static_cast<int64_t>(A.size()));
  // each result with the model, then the same with the fp32 kernels (packed again without pairs)
  auto both = [&](auto&& run) {
    emulate_bf16_dot_for_testing(true);
    const int64_t before = bf16_dot_tiles_emulated();
    std::vector<float> dot = run();
    EXPECT_GT(bf16_dot_tiles_emulated(), before) << "the AVX512_BF16 path did not run";
    emulate_bf16_dot_for_testing(false);
    std::vector<float> fp32 = run();
    emulate_bf16_dot_for_testing(true);
    return std::memcmp(dot.data(), fp32.data(), dot.size() * sizeof(float)) == 0;
  };
  auto packed_run = [&](bool a_in_bf16, int threads) {
    return [&, a_in_bf16, threads] {
      set_compute_threads(threads);
      PackedB packed;
      pack_b_bf16(Trans::no, K, N, B.data(), N, packed);
      std::vector<float> C(M * N);
      GemmExtras extras{bias.data(), nullptr};
      if (a_in_bf16)
        gemm_packed(Trans::no, M, A16.data(), K, packed, 0.0f, C.data(), N, extras);
      else
        gemm_packed(Trans::no, M, A.data(), K, packed, 0.0f, C.data(), N, extras);
      set_compute_threads(1);
      return C;
    };
  };
  EXPECT_TRUE(both(packed_run(false, 1))) << "a bias";
  EXPECT_TRUE(both(packed_run(true, 1))) << "A stored in bf16";
  EXPECT_TRUE(both(packed_run(false, 2))) << "two threads";
  // A^T B with both operands' K rows by pointers, in reverse storage order (the weight gradients)
  std::vector<const float*> a_rows, b_rows;
  std::vector<const uint16_t*> a_rows16;
  auto At = random_matrix(K * M, 27), Bt = random_matrix(K * N, 28);
  std::vector<uint16_t> At16(At.size());
  floats_to_bf16(At.data(), At16.data(), static_cast<int64_t>(At.size()));
  for (int64_t k = K - 1; k >= 0; --k) {
    a_rows.push_back(At.data() + k * M);
    a_rows16.push_back(At16.data() + k * M);
    b_rows.push_back(Bt.data() + k * N);
  }
  EXPECT_TRUE(both([&] {
    std::vector<float> C(M * N, 0.5f);
    gemm_tn_rows_bf16(M, N, K, a_rows.data(), b_rows.data(), 1.0f, C.data(), N);
    return C;
  })) << "rows by pointers";
  EXPECT_TRUE(both([&] {
    std::vector<float> C(M * N, 0.5f);
    gemm_tn_rows_bf16(M, N, K, a_rows16.data(), b_rows.data(), 1.0f, C.data(), N);
    return C;
  })) << "bf16 rows by pointers";
}

// The model is as strict as the chain: taking a pair's even depth first gives other bits, so the
// comparisons above would see a kernel or a packing that swapped them.
TEST_F(EmulatedBf16Dot, TheChainsOrderShowsInTheBits) {
  const int64_t M = 12, N = 32, K = 256;
  auto A = random_matrix(M * K, 29), B = random_matrix(K * N, 30);
  std::vector<float> C(M * N);
  gemm_bf16(Trans::no, Trans::no, M, N, K, A.data(), K, B.data(), N, 0.0f, C.data(), N);
  int differing = 0;
  for (int64_t i = 0; i < M; ++i)
    for (int64_t j = 0; j < N; ++j) {
      float c = 0.0f;
      for (int64_t d = 0; d < K; ++d)  // even depth first: the other order within each pair
        c = std::fma(round_to_bf16(A[i * K + d]), round_to_bf16(B[d * N + j]), c);
      differing += c != C[i * N + j];
    }
  EXPECT_GT(differing, M * N / 10);
}

}  // namespace
}  // namespace pm
