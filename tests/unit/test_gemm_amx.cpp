// bf16 GEMMs in AMX's order (kernels/cpu/gemm.h, Bf16Order::amx): the order written out element by
// element, against the tiles where the CPU has AMX and against the fp32 model everywhere, plus the
// bit-for-bit promises the pipeline relies on (row splits, threads, rows by pointers, bf16
// operands, a bias and an epilogue).
#include <fmt/format.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "core/tensor.h"
#include "kernels/cpu/gemm.h"
#include "kernels/cpu/gemm_internal.h"
#include "kernels/cpu/thread_pool.h"
#include "support/gemm_operands.h"

namespace pm {
namespace {

std::vector<float> random_matrix(int64_t n, uint64_t stream) { return test::random_matrix(11, n, stream); }
using test::op_at;

// The order gemm.h specifies, written out: blocks of 32 depths from depth 0; in each, the even
// depths' products summed in order, the odd depths' likewise, then c = c + (even + odd).
std::vector<float> amx_chain(Trans ta, Trans tb, int64_t M, int64_t N, int64_t K, const std::vector<float>& A,
                             const std::vector<float>& B, const std::vector<float>& C0, float beta,
                             const float* bias = nullptr) {
  std::vector<float> C(M * N);
  for (int64_t i = 0; i < M; ++i)
    for (int64_t j = 0; j < N; ++j) {
      float c = beta == 0.0f ? (bias ? bias[j] : 0.0f) : C0[i * N + j];
      for (int64_t block = 0; block < K; block += 32) {
        float lane[2] = {0.0f, 0.0f};
        for (int64_t d = block; d < std::min(K, block + 32); ++d)
          lane[d % 2] = std::fma(round_to_bf16(op_at(ta, A, M, K, i, d)), round_to_bf16(op_at(tb, B, K, N, d, j)), lane[d % 2]);
        c = c + (lane[0] + lane[1]);
      }
      C[i * N + j] = c;
    }
  return C;
}

bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

// Runs each test three times: on what this CPU has (AMX's tiles where it has them), on the model
// (AVX-512 where the CPU has it) and on the model element by element (the scalar instruction set).
enum class AmxPath { this_cpu, model, scalar_model };
class AmxOrder : public ::testing::TestWithParam<AmxPath> {
 protected:
  void SetUp() override {
    set_bf16_order(Bf16Order::amx);
    use_amx_model_for_testing(GetParam() != AmxPath::this_cpu);
    if (GetParam() == AmxPath::scalar_model) force_gemm_isa("scalar");
  }
  void TearDown() override {
    set_bf16_order(Bf16Order::dot);
    use_amx_model_for_testing(false);
    force_gemm_isa("");
    set_compute_threads(1);
  }
};

TEST_P(AmxOrder, GivesTheWrittenOutOrderBitForBitAndStaysWithinBf16Error) {
  for (auto [M, N, K] : {std::array<int64_t, 3>{1, 1, 1}, {7, 13, 5}, {32, 64, 32}, {37, 100, 71}, {50, 130, 1101},
                         {30, 17, 2}, {300, 66, 530} /* two blocks of rows */, {31, 40, 2403} /* of depths */})
    for (Trans ta : {Trans::no, Trans::yes})
      for (Trans tb : {Trans::no, Trans::yes})
        for (float beta : {0.0f, 1.0f}) {
          auto A = random_matrix(M * K, 1), B = random_matrix(K * N, 2), C = random_matrix(M * N, 3);
          const auto expected = amx_chain(ta, tb, M, N, K, A, B, C, beta);
          std::vector<float> ours = C;
          gemm_bf16(ta, tb, M, N, K, A.data(), ta == Trans::no ? K : M, B.data(), tb == Trans::no ? N : K, beta,
                    ours.data(), N);
          EXPECT_TRUE(same_bits(ours, expected))
              << M << "x" << N << "x" << K << " ta " << int(ta) << " tb " << int(tb) << " beta " << beta;
          // the bound of test_gemm_bf16: operand rounding 2^-7 + 2^-16 of each |a b|, fp32 adds K 2^-24
          double worst = 0;
          for (int64_t i = 0; i < M; ++i)
            for (int64_t j = 0; j < N; ++j) {
              double exact = beta * C[i * N + j], magnitude = std::abs(exact);
              for (int64_t d = 0; d < K; ++d) {
                const double prod = static_cast<double>(op_at(ta, A, M, K, i, d)) * op_at(tb, B, K, N, d, j);
                exact += prod;
                magnitude += std::abs(prod);
              }
              const double bound =
                  (std::ldexp(1.0, -7) + std::ldexp(1.0, -16) + K * std::ldexp(1.0, -24)) * magnitude + 1e-30;
              worst = std::max(worst, std::abs(ours[i * N + j] - exact) / bound);
            }
          EXPECT_LE(worst, 1.0) << "error beyond the bf16 bound";
        }
}

// The order shows in the bits: not the dot order's (else the test above could pass on it).
TEST_P(AmxOrder, DiffersFromTheDotOrder) {
  const int64_t M = 16, N = 32, K = 256;
  auto A = random_matrix(M * K, 4), B = random_matrix(K * N, 5);
  std::vector<float> amx(M * N), dot(M * N);
  gemm_bf16(Trans::no, Trans::no, M, N, K, A.data(), K, B.data(), N, 0.0f, amx.data(), N);
  set_bf16_order(Bf16Order::dot);
  gemm_bf16(Trans::no, Trans::no, M, N, K, A.data(), K, B.data(), N, 0.0f, dot.data(), N);
  EXPECT_FALSE(same_bits(amx, dot));
}

// Pipelining splits rows and threads split panels: neither changes an element. A bias start and an
// epilogue see every tile once.
TEST_P(AmxOrder, RowResultsDoNotDependOnSplitsOrThreadsAndABiasStartsTheChain) {
  const int64_t M = 97, N = 150, K = 531;
  auto A = random_matrix(M * K, 6), B = random_matrix(K * N, 7), C0 = random_matrix(M * N, 8), bias = random_matrix(N, 9);
  PackedB packed;
  pack_b_bf16(Trans::no, K, N, B.data(), N, packed);
  auto run = [&](int64_t split) { return test::gemm_in_row_splits(A, M, K, packed, C0, split); };
  const std::vector<float> whole = run(M);
  EXPECT_TRUE(same_bits(whole, amx_chain(Trans::no, Trans::no, M, N, K, A, B, C0, 1.0f)));
  for (int64_t split : {1, 5, 33, 64}) EXPECT_TRUE(same_bits(whole, run(split))) << "split " << split;
  set_compute_threads(2);
  EXPECT_TRUE(same_bits(whole, run(M))) << "two threads";

  std::vector<int> seen(M * N, 0);
  const TileEpilogue count = [&](int64_t row, int64_t col, int64_t rows, int64_t cols) {
    for (int64_t i = row; i < row + rows; ++i)
      for (int64_t j = col; j < col + cols; ++j) ++seen[i * N + j];
  };
  std::vector<float> with_bias(M * N);
  gemm_packed(Trans::no, M, A.data(), K, packed, 0.0f, with_bias.data(), N, GemmExtras{bias.data(), &count});
  EXPECT_TRUE(same_bits(with_bias, amx_chain(Trans::no, Trans::no, M, N, K, A, B, C0, 0.0f, bias.data())));
  for (int s : seen) ASSERT_EQ(s, 1) << "the epilogue must see each element once";
}

// Weight gradients: rows by pointers, A and B rows stored in bf16, the bias gradient's column sums.
TEST_P(AmxOrder, RowsByPointersAndBf16RowsGiveTheContiguousProductsBits) {
  const int64_t M = 45, N = 70, K = 37;
  // rows past four of amx_gemm's blocks (1100 > 4 x 256), depths past one block (2403 > 2048)
  for (auto [m, n, k] : {std::array<int64_t, 3>{M, N, K}, {1100, 20, 2403}, {17, 33, 64}}) {
    auto A = random_matrix(k * m, 10), B = random_matrix(k * n, 11), C0 = random_matrix(m * n, 12);
    std::vector<uint16_t> A16(A.size()), B16(B.size());
    floats_to_bf16(A.data(), A16.data(), static_cast<int64_t>(A.size()));
    floats_to_bf16(B.data(), B16.data(), static_cast<int64_t>(B.size()));
    std::vector<const float*> a_rows, b_rows;
    std::vector<const uint16_t*> a_rows16, b_rows16;
    for (int64_t d = 0; d < k; ++d) {
      a_rows.push_back(A.data() + d * m), a_rows16.push_back(A16.data() + d * m);
      b_rows.push_back(B.data() + d * n), b_rows16.push_back(B16.data() + d * n);
    }
    const auto expected = amx_chain(Trans::yes, Trans::no, m, n, k, A, B, C0, 1.0f);
    std::vector<float> sums_expected(n, 0.0f);
    for (int64_t d = 0; d < k; ++d)
      for (int64_t j = 0; j < n; ++j) sums_expected[j] += B[d * n + j];
    std::vector<float> C = C0, sums(n, 0.0f);
    gemm_tn_rows_bf16(m, n, k, a_rows.data(), b_rows.data(), 1.0f, C.data(), n, sums.data());
    EXPECT_TRUE(same_bits(C, expected)) << m << "x" << n << "x" << k;
    EXPECT_TRUE(same_bits(sums, sums_expected)) << m << "x" << n << "x" << k;
    C = C0;
    gemm_tn_rows_bf16(m, n, k, a_rows16.data(), b_rows.data(), 1.0f, C.data(), n);
    EXPECT_TRUE(same_bits(C, expected)) << "A rows in bf16, " << m << "x" << n << "x" << k;
    C = C0;
    gemm_tn_rows_bf16(m, n, k, a_rows16.data(), b_rows16.data(), 1.0f, C.data(), n);
    EXPECT_TRUE(same_bits(C, expected)) << "A and B rows in bf16, " << m << "x" << n << "x" << k;
  }
  // A's rows by pointers, floats or bf16 (gemm_packed_rows: an expert's input rows where the
  // all-to-all left them), with a bias: the bits of the contiguous product
  for (auto [m, n, k] : {std::array<int64_t, 3>{M, N, K}, {1100, 20, 2403}, {17, 33, 64}}) {
    const auto A = random_matrix(m * k, 14), B = random_matrix(k * n, 15), bias = random_matrix(n, 16);
    PackedB packed;
    pack_b_bf16(Trans::no, k, n, B.data(), n, packed);
    const std::vector<float> C0(m * n, 0.0f);
    std::vector<float> expected = C0;
    gemm_packed(Trans::no, m, A.data(), k, packed, 0.0f, expected.data(), n, {bias.data(), nullptr});
    EXPECT_TRUE(same_bits(expected, test::gemm_by_row_pointers<float>(A, m, k, packed, 0.0f, C0, {bias.data(), nullptr})))
        << "float rows, " << m << "x" << n << "x" << k;
    EXPECT_TRUE(same_bits(expected, test::gemm_by_row_pointers<uint16_t>(A, m, k, packed, 0.0f, C0, {bias.data(), nullptr})))
        << "bf16 rows, " << m << "x" << n << "x" << k;
  }
  // A stored in bf16, contiguous (rows lda apart, lda >= K, even or odd), several blocks of rows and
  // of depths: the bits of the same values held in floats
  for (auto [m, n, k, lda] : {std::array<int64_t, 4>{M, N, K, K}, {300, 40, 512, 514}, {70, 24, 4160, 4160},
                              {33, 17, 96, 97}})
    for (float beta : {0.0f, 1.0f}) {
      const auto B = random_matrix(k * n, 11), C0 = random_matrix(m * n, 12), Ar = random_matrix(m * lda, 13);
      std::vector<uint16_t> Ar16(m * lda);
      floats_to_bf16(Ar.data(), Ar16.data(), m * lda);
      std::vector<float> from_floats = C0, from_bf16 = C0;
      gemm_bf16(Trans::no, Trans::no, m, n, k, Ar.data(), lda, B.data(), n, beta, from_floats.data(), n);
      gemm_bf16(Trans::no, Trans::no, m, n, k, Ar16.data(), lda, B.data(), n, beta, from_bf16.data(), n);
      EXPECT_TRUE(same_bits(from_floats, from_bf16)) << m << "x" << n << "x" << k << " lda " << lda;
    }
}

// B's pair words are laid out for the order that packed them (PackedB::pair_tiles: 16 x 16 tiles
// in the amx order, pair rows in the dot order); every kernel reads both. A B packed in one order
// and used in the other gives the bits of one packed in the order used, in both orders.
TEST_P(AmxOrder, BPackedInEitherOrderGivesTheSameBitsInEither) {
  for (auto [M, N, K] : {std::array<int64_t, 3>{7, 13, 5}, {37, 100, 71}, {33, 200, 1101}, {31, 40, 2403}})
    for (Trans tb : {Trans::no, Trans::yes}) {
      const auto A = random_matrix(M * K, 21), B = random_matrix(K * N, 22), C0 = random_matrix(M * N, 23);
      const int64_t ldb = tb == Trans::no ? N : K;
      PackedB as_tiles, as_rows;
      pack_b_bf16(tb, K, N, B.data(), ldb, as_tiles);
      set_bf16_order(Bf16Order::dot);
      pack_b_bf16(tb, K, N, B.data(), ldb, as_rows);
      EXPECT_FALSE(as_rows.pair_tiles);
      EXPECT_TRUE(as_tiles.pair_tiles || as_tiles.pairs.empty());
      for (Bf16Order order : {Bf16Order::amx, Bf16Order::dot}) {
        set_bf16_order(order);
        std::vector<float> from_tiles = C0, from_rows = C0;
        gemm_packed(Trans::no, M, A.data(), K, as_tiles, 1.0f, from_tiles.data(), N);
        gemm_packed(Trans::no, M, A.data(), K, as_rows, 1.0f, from_rows.data(), N);
        EXPECT_TRUE(same_bits(from_tiles, from_rows))
            << M << "x" << N << "x" << K << " tb " << int(tb) << " in the " << bf16_order_name() << " order";
        if (order == Bf16Order::amx) {
          EXPECT_TRUE(same_bits(from_tiles, amx_chain(Trans::no, tb, M, N, K, A, B, C0, 1.0f)));
        }
      }
      set_bf16_order(Bf16Order::amx);
    }
}

TEST_P(AmxOrder, SaysHowItRuns) {
  const std::string path = gemm_bf16_path();
  EXPECT_TRUE(path == "amx" || path == "amx order on fp32 (no AMX here)") << path;
  // Where the CPU has AMX the tiles must run: a tile kernel that disagreed with the model at its
  // first use would fall back to the model, and every other test would pass on the model.
  if (gemm_detail::cpu_has_amx()) {
    EXPECT_EQ(path, "amx") << "the tiles disagreed with the model at their first use";
  }
  std::printf("bf16 GEMMs in the amx order run as: %s\n", path.c_str());
}

INSTANTIATE_TEST_SUITE_P(Paths, AmxOrder, ::testing::Values(AmxPath::this_cpu, AmxPath::model, AmxPath::scalar_model),
                         [](const ::testing::TestParamInfo<AmxPath>& info) {
                           return std::string(info.param == AmxPath::this_cpu ? "ThisCpu"
                                              : info.param == AmxPath::model ? "Model"
                                                                             : "ScalarModel");
                         });

}  // namespace
}  // namespace pm
