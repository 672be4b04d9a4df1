// GEMM: against a float64 reference, and the bit-for-bit promises the pipeline relies on.
#include <fmt/format.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "core/rng.h"
#include "core/tensor.h"
#include "kernels/backend.h"
#include "kernels/cpu/fma_ceiling.h"
#include "kernels/cpu/gemm.h"
#include "kernels/cpu/thread_pool.h"
#include "support/gemm_operands.h"

namespace pm {
namespace {

std::vector<float> random_matrix(int64_t n, uint64_t stream) {
  std::vector<float> v(n);
  Rng(42, stream).fill_normal(v.data(), n, 0.0f, 1.0f);
  return v;
}

// C = beta*C + op(A) op(B) in double.
std::vector<double> reference(Trans ta, Trans tb, int64_t M, int64_t N, int64_t K, const std::vector<float>& A,
                              const std::vector<float>& B, const std::vector<float>& C0, float beta) {
  std::vector<double> C(M * N);
  for (int64_t i = 0; i < M; ++i)
    for (int64_t j = 0; j < N; ++j) {
      double s = beta * C0[i * N + j];
      for (int64_t k = 0; k < K; ++k) {
        double a = ta == Trans::no ? A[i * K + k] : A[k * M + i];
        double b = tb == Trans::no ? B[k * N + j] : B[j * K + k];
        s += a * b;
      }
      C[i * N + j] = s;
    }
  return C;
}

struct Shape {
  int64_t M, N, K;
};

class GemmShapes : public ::testing::TestWithParam<Shape> {};

TEST_P(GemmShapes, MatchesFloat64ForEveryTransposeAndBeta) {
  const auto [M, N, K] = GetParam();
  for (Trans ta : {Trans::no, Trans::yes})
    for (Trans tb : {Trans::no, Trans::yes})
      for (float beta : {0.0f, 1.0f}) {
        auto A = random_matrix(M * K, 1), B = random_matrix(K * N, 2), C = random_matrix(M * N, 3);
        auto expected = reference(ta, tb, M, N, K, A, B, C, beta);
        gemm(ta, tb, M, N, K, A.data(), ta == Trans::no ? K : M, B.data(), tb == Trans::no ? N : K, beta,
             C.data(), N);
        double worst = 0;
        for (int64_t i = 0; i < M * N; ++i)
          worst = std::max(worst, std::abs(C[i] - expected[i]) / (1.0 + std::abs(expected[i])));
        EXPECT_LT(worst, 1e-5 * std::sqrt(static_cast<double>(K) + 1)) << "ta=" << int(ta) << " tb=" << int(tb) << " beta=" << beta;
      }
}

INSTANTIATE_TEST_SUITE_P(Sizes, GemmShapes,
                         ::testing::Values(Shape{1, 1, 1}, Shape{7, 13, 5}, Shape{6, 64, 16}, Shape{37, 100, 70},
                                           Shape{250, 130, 600}, Shape{13, 8, 0}, Shape{300, 17, 33}),
                         [](const ::testing::TestParamInfo<Shape>& info) {  // e.g. M37_N100_K70
                           const Shape& s = info.param;
                           return fmt::format("M{}_N{}_K{}", s.M, s.N, s.K);
                         });

// The promise the pipeline relies on: a row's result does not depend on which call computed it.
std::vector<std::string> runnable_isas();

// Every element is the chain the header promises, c = fma(a_k, b_k, c) for k in order from C, the
// bias or zero, bit for bit, for tiles of every row count (1 to 6, in place and in the padded copy
// of a partial panel), one to three depth blocks, with and without a bias, on every instruction set,
// with A read in place and packed: packed from 4 panels of B with AVX2 (N 300) and from 16 with
// AVX-512 (N 1030, 17 panels, the last one partial; gemm.cpp's min_panels_to_pack_a); and the same
// with A's rows given by pointers (gemm_packed_rows), read in place by AVX-512 below 16 panels.
TEST(Gemm, EveryRowCountGivesTheWrittenOutChain) {
  auto check = [](const std::string& isa, int64_t M, int64_t N, int64_t K, int variant) -> ::testing::AssertionResult {
    const float beta = variant == 1 ? 1.0f : 0.0f;
    auto A = random_matrix(M * K, 31), B = random_matrix(K * N, 32), C0 = random_matrix(M * N, 33),
         bias = random_matrix(N, 34);
    std::vector<float> expected(M * N), C = C0;
    for (int64_t i = 0; i < M; ++i)
      for (int64_t j = 0; j < N; ++j) {
        float c = variant == 1 ? C0[i * N + j] : variant == 2 ? bias[j] : 0.0f;
        for (int64_t k = 0; k < K; ++k) c = std::fma(A[i * K + k], B[k * N + j], c);
        expected[i * N + j] = c;
      }
    PackedB packed;
    pack_b(Trans::no, K, N, B.data(), N, packed);
    GemmExtras extras{variant == 2 ? bias.data() : nullptr, nullptr};
    gemm_packed(Trans::no, M, A.data(), K, packed, beta, C.data(), N, extras);
    // and A's rows by pointers, read in place by AVX-512's kernel below 16 panels
    const std::vector<float> by_rows = test::gemm_by_row_pointers<float>(A, M, K, packed, beta, C0, extras);
    if (std::memcmp(C.data(), expected.data(), C.size() * sizeof(float)) == 0 &&
        std::memcmp(by_rows.data(), expected.data(), C.size() * sizeof(float)) == 0)
      return ::testing::AssertionSuccess();
    return ::testing::AssertionFailure() << "isa '" << isa << "' M " << M << " N " << N << " K " << K << " variant "
                                         << variant << (std::memcmp(C.data(), expected.data(), C.size() * sizeof(float))
                                                            ? " (contiguous)"
                                                            : " (rows by pointers)");
  };
  for (const std::string& isa : runnable_isas()) {
    force_gemm_isa(isa);
    for (int variant = 0; variant < 3; ++variant) {  // beta 0, beta 1, a bias
      for (int64_t M : {1, 2, 3, 4, 5, 6, 7, 11, 13})
        for (int64_t N : {16, 40, 64, 150, 300})
          for (int64_t K : {9, 2100, 3100})  // one depth block; two, the last one deeper (1024 + 1076); three
            ASSERT_TRUE(check(isa, M, N, K, variant));
      for (int64_t M : {5, 13})  // a partial micro-panel alone, and after two whole ones
        for (int64_t K : {9, 2100}) ASSERT_TRUE(check(isa, M, 1030, K, variant));
      ASSERT_TRUE(check(isa, 1100, 40, 9, variant));  // three blocks of rows (516 each)
    }
  }
  force_gemm_isa("");
}

// A linear layer's forward on the CPU starts each element's chain from the bias in the kernel;
// Backend's own linear fills the rows with the bias and runs the product with beta 1. Both give
// the same bits: fp32 and bf16 (both orders), B packed beforehand or not, no bias, small products
// (gemm's unpacked paths) and deep ones (two depth blocks); in bf16 also from x kept as bf16 rows
// (the values the product rounds float rows to), on both paths. Fails if the kernel adds the bias
// anywhere but at the chain's start.
TEST(Gemm, LinearStartsFromTheBiasWithTheBitsOfFilledRows) {
  Backend& k = cpu_backend();
  struct Case {
    int64_t M, N, K;
  };
  for (Precision p : {Precision::fp32, Precision::bf16})
    for (Bf16Order order : {Bf16Order::dot, Bf16Order::amx}) {
      if (p == Precision::fp32 && order == Bf16Order::amx) continue;
      set_bf16_order(order);
      for (const Case& c : {Case{5, 40, 9}, Case{70, 150, 70}, Case{200, 96, 192}, Case{530, 70, 100},
                            Case{100, 300, 2100}})
        for (bool with_bias : {true, false})
          for (bool prepacked : {false, true}) {
            const auto x = random_matrix(c.M * c.K, 51), w = random_matrix(c.K * c.N, 52), b = random_matrix(c.N, 53);
            const float* bias = with_bias ? b.data() : nullptr;
            const auto packed = prepacked ? k.pack_matrix(p, Trans::no, c.K, c.N, w.data(), c.N) : nullptr;
            std::vector<float> filled(c.M * c.N, -1.0f), started(c.M * c.N, -2.0f);
            k.Backend::linear(p, c.M, c.N, c.K, x.data(), w.data(), packed.get(), bias, filled.data());
            k.linear(p, c.M, c.N, c.K, x.data(), w.data(), packed.get(), bias, started.data());
            ASSERT_EQ(0, std::memcmp(filled.data(), started.data(), filled.size() * sizeof(float)))
                << (p == Precision::bf16 ? "bf16 " : "fp32 ") << bf16_order_name() << " M " << c.M << " N " << c.N
                << " K " << c.K << (with_bias ? " bias" : " no bias") << (prepacked ? " prepacked" : "");
            if (p != Precision::bf16) continue;
            std::vector<uint16_t> x16(x.size());
            for (std::size_t i = 0; i < x.size(); ++i) x16[i] = float_to_bf16(x[i]);
            for (bool own : {false, true}) {
              std::vector<float> from_bf16(c.M * c.N, -3.0f);
              if (own)
                k.Backend::linear(p, c.M, c.N, c.K, x16.data(), w.data(), packed.get(), bias, from_bf16.data());
              else
                k.linear(p, c.M, c.N, c.K, x16.data(), w.data(), packed.get(), bias, from_bf16.data());
              ASSERT_EQ(0, std::memcmp(filled.data(), from_bf16.data(), filled.size() * sizeof(float)))
                  << "bf16 rows of x, " << (own ? "Backend's linear, " : "") << bf16_order_name() << " M " << c.M
                  << " N " << c.N << " K " << c.K << (with_bias ? " bias" : " no bias")
                  << (prepacked ? " prepacked" : "");
            }
          }
    }
  set_bf16_order(Bf16Order::dot);
}

// Two shapes run without packing B where the CPU has AVX-512: a C of at most 8 rows from a
// transposed A (a router's weight gradient) and a shallow depth (its share of the input gradient:
// at most 8, or 64 for at most 64 rows). Every element is still the written-out chain, from C or
// zero: depths past the first one's 256-deep chunks, columns past its 48-wide blocks and the
// second's 64-wide ones, rows past its groups of 4, on every instruction set and with threads;
// the shapes just past the bounds take the panels.
TEST(Gemm, FewRowsOrAShallowDepthGiveTheWrittenOutChain) {
  struct Case {
    Trans ta;
    int64_t M, N, K;
  };
  std::vector<Case> cases;
  for (int64_t M : {1, 3, 8, 9})
    for (int64_t N : {5, 48, 50, 512})
      for (int64_t K : {1, 256, 2100}) cases.push_back({Trans::yes, M, N, K});
  // A^T's packing runs over chunks of 8 micro-panels (48 rows) and blocks of 16 depths: rows past a
  // chunk, a partial last micro-panel, and a second block of 516 rows
  for (int64_t M : {49, 101, 530})
    for (int64_t K : {17, 37}) cases.push_back({Trans::yes, M, 70, K});
  for (int64_t M : {1, 3, 4, 7, 64, 65, 2049})
    for (int64_t N : {5, 64, 70, 512})
      for (int64_t K : {1, 2, 8, 9, 64, 65}) cases.push_back({Trans::no, M, N, K});
  for (const std::string& isa : runnable_isas())
    for (int threads : {1, 2}) {
      force_gemm_isa(isa);
      set_compute_threads(threads);
      for (const Case& c : cases)
        for (float beta : {0.0f, 1.0f}) {
          const auto [ta, M, N, K] = c;
          auto A = random_matrix(M * K, 41), B = random_matrix(K * N, 42), C = random_matrix(M * N, 43);
          std::vector<float> expected(M * N);
          for (int64_t i = 0; i < M; ++i)
            for (int64_t j = 0; j < N; ++j) {
              float e = beta == 1.0f ? C[i * N + j] : 0.0f;
              for (int64_t k = 0; k < K; ++k)
                e = std::fma(ta == Trans::yes ? A[k * M + i] : A[i * K + k], B[k * N + j], e);
              expected[i * N + j] = e;
            }
          gemm(ta, Trans::no, M, N, K, A.data(), ta == Trans::yes ? M : K, B.data(), N, beta, C.data(), N);
          ASSERT_EQ(0, std::memcmp(C.data(), expected.data(), C.size() * sizeof(float)))
              << "isa '" << isa << "' threads " << threads << (ta == Trans::yes ? " A^T" : " A") << " M " << M
              << " N " << N << " K " << K << " beta " << beta;
        }
    }
  set_compute_threads(1);
  force_gemm_isa("");
}

TEST(Gemm, RowResultsDoNotDependOnHowRowsAreSplit) {
  for (const int64_t N : {150, 300, 1030}) {  // A read in place, and packed (AVX2 from N 256, AVX-512 from 1024)
    const int64_t M = 203, K = 530;
    auto A = random_matrix(M * K, 4), B = random_matrix(K * N, 5), bias = random_matrix(M * N, 6);
    PackedB packed;
    pack_b(Trans::no, K, N, B.data(), N, packed);
    std::vector<float> whole = bias;
    gemm_packed(Trans::no, M, A.data(), K, packed, 1.0f, whole.data(), N);
    for (int64_t split : {1, 5, 6, 7, 64, 100}) {
      std::vector<float> parts = bias;
      for (int64_t r = 0; r < M; r += split) {
        int64_t rows = std::min(split, M - r);
        gemm_packed(Trans::no, rows, A.data() + r * K, K, packed, 1.0f, parts.data() + r * N, N);
      }
      EXPECT_EQ(0, std::memcmp(whole.data(), parts.data(), whole.size() * sizeof(float))) << "split " << split;
    }
  }
}

TEST(Gemm, SameBitsOnEveryInstructionSetAndThreadCount) {
  const int64_t M = 61, N = 200, K = 700;
  auto A = random_matrix(M * K, 7), B = random_matrix(K * N, 8);
  auto run = [&] {
    std::vector<float> C(M * N, 0.5f);
    gemm(Trans::yes, Trans::yes, M, N, K, A.data(), M, B.data(), K, 1.0f, C.data(), N);
    return C;
  };
  std::vector<float> best = run();
  for (const char* isa : {"avx2", "scalar"}) {
    if (std::string(isa) == "avx2" && !__builtin_cpu_supports("avx2")) continue;
    force_gemm_isa(isa);
    std::vector<float> other = run();
    EXPECT_EQ(0, std::memcmp(best.data(), other.data(), best.size() * sizeof(float))) << isa;
  }
  force_gemm_isa("");
  set_compute_threads(2);
  std::vector<float> threaded = run();
  set_compute_threads(1);
  EXPECT_EQ(0, std::memcmp(best.data(), threaded.data(), best.size() * sizeof(float)));
}

}  // namespace
}  // namespace pm

namespace pm {
namespace {

// A bias start gives the bits of filling C with the bias and accumulating onto it; the epilogue
// sees every tile of C exactly once, after its last depth block.
TEST(Gemm, BiasStartAndTileEpilogue) {
  const int64_t M = 29, N = 150, K = 2300;  // three depth blocks, edge rows and columns
  auto A = random_matrix(M * K, 9), B = random_matrix(K * N, 10), bias = random_matrix(N, 11);
  PackedB packed;
  pack_b(Trans::no, K, N, B.data(), N, packed);
  std::vector<float> filled(M * N);
  for (int64_t i = 0; i < M; ++i) std::copy(bias.begin(), bias.end(), filled.begin() + i * N);
  gemm_packed(Trans::no, M, A.data(), K, packed, 1.0f, filled.data(), N);

  std::vector<float> started(M * N, -7.0f);
  std::vector<int> visits(M * N, 0);
  TileEpilogue count = [&](int64_t r, int64_t c, int64_t nr, int64_t nc) {
    for (int64_t i = r; i < r + nr; ++i)
      for (int64_t j = c; j < c + nc; ++j) visits[i * N + j] += 1;
  };
  gemm_packed(Trans::no, M, A.data(), K, packed, 0.0f, started.data(), N, {bias.data(), &count});
  EXPECT_EQ(0, std::memcmp(filled.data(), started.data(), filled.size() * sizeof(float)));
  for (int v : visits) EXPECT_EQ(v, 1);
}

}  // namespace
}  // namespace pm

namespace pm {
namespace {

// The instruction sets this CPU can run, the best first.
std::vector<std::string> runnable_isas() {
  std::vector<std::string> isas{""};
  if (__builtin_cpu_supports("avx512f")) isas.push_back("avx512");
  if (__builtin_cpu_supports("avx2")) isas.push_back("avx2");
  isas.push_back("scalar");
  return isas;
}

TEST(Gemm, PackingMatchesTheDefinitionInEveryStripLayout) {
  for (const std::string& isa : runnable_isas()) {
    force_gemm_isa(isa);  // each instruction set packs in the strips its kernels read best
    for (Trans trans : {Trans::no, Trans::yes})
      for (auto [K, N] : {std::pair<int64_t, int64_t>{13, 70}, {64, 64}, {100, 131}, {8, 8}, {3, 5}}) {
        auto B = random_matrix(K * N, 12);  // [K, N], or [N, K] with op(B) = B^T
        PackedB packed;
        pack_b(trans, K, N, B.data(), trans == Trans::no ? N : K, packed);
        for (int64_t p = 0; p < packed.panels(); ++p)
          for (int64_t k = 0; k < K; ++k)
            for (int64_t j = 0; j < packed.panel_width(p); ++j) {
              int64_t col = p * 64 + j;
              float expected = col >= N ? 0.0f : trans == Trans::no ? B[k * N + col] : B[col * K + k];
              ASSERT_EQ(packed.panel(p)[packed.offset_in_panel(p, k, j)], expected)
                  << K << "x" << N << " isa '" << isa << "' strip " << packed.strip;
            }
      }
  }
  force_gemm_isa("");
}

// Weights stay packed across calls (a pass, a whole inference run): a B packed for one instruction
// set gives the same bits when the kernels of another read it.
TEST(Gemm, BPackedForOneInstructionSetGivesTheSameBitsOnAnother) {
  const int64_t M = 31, N = 150, K = 90;
  auto A = random_matrix(M * K, 13), B = random_matrix(K * N, 14);
  std::vector<float> expected(M * N);
  gemm(Trans::no, Trans::no, M, N, K, A.data(), K, B.data(), N, 0.0f, expected.data(), N);
  for (const std::string& packer : runnable_isas())
    for (const std::string& runner : runnable_isas()) {
      force_gemm_isa(packer);
      PackedB packed;
      pack_b(Trans::no, K, N, B.data(), N, packed);
      force_gemm_isa(runner);
      std::vector<float> C(M * N);
      gemm_packed(Trans::no, M, A.data(), K, packed, 0.0f, C.data(), N);
      EXPECT_EQ(0, std::memcmp(expected.data(), C.data(), C.size() * sizeof(float)))
          << "packed for '" << packer << "' (strip " << packed.strip << "), run on '" << runner << "'";
    }
  force_gemm_isa("");
}

// A B laid out in AVX-512's whole-panel strips (64 columns), built by hand so that CPUs without
// AVX-512 run it too: every instruction set here gives the bits of its own packing, partial tiles
// of every row count included (they read 16-column groups side by side in the wide strip).
TEST(Gemm, WidePanelStripsGiveTheSameBitsOnEveryInstructionSet) {
  const int64_t K = 70, N = 150;
  auto B = random_matrix(K * N, 35);
  PackedB wide;
  wide.K = K, wide.N = N, wide.source_depth = K, wide.strip = 64;
  wide.data.assign(wide.panels() * K * 64, 0.0f);
  for (int64_t p = 0; p < wide.panels(); ++p)
    for (int64_t k = 0; k < K; ++k)
      for (int64_t j = 0; j < std::min<int64_t>(64, N - 64 * p); ++j)
        wide.data[p * K * 64 + wide.offset_in_panel(p, k, j)] = B[k * N + 64 * p + j];
  for (int64_t M : {1, 2, 3, 4, 5, 6, 13}) {
    auto A = random_matrix(M * K, 36);
    std::vector<float> expected(M * N);
    gemm(Trans::no, Trans::no, M, N, K, A.data(), K, B.data(), N, 0.0f, expected.data(), N);
    for (const std::string& isa : runnable_isas()) {
      force_gemm_isa(isa);
      std::vector<float> C(M * N);
      gemm_packed(Trans::no, M, A.data(), K, wide, 0.0f, C.data(), N);
      EXPECT_EQ(0, std::memcmp(expected.data(), C.data(), C.size() * sizeof(float))) << "isa '" << isa << "' M " << M;
    }
    force_gemm_isa("");
  }
}

TEST(Gemm, RowsGivenByPointersGiveTheBitsOfTheContiguousProduct) {
  // A^T B over K rows scattered in two buffers (as pipeline chunks leave them), against the same
  // rows copied into contiguous matrices; K crosses the depth block (1024) and has a ragged end.
  const int64_t M = 70, N = 100, K = 2300;
  auto A = random_matrix(K * M, 11), B = random_matrix(K * N, 12);
  std::vector<float> A_far(K * M, 0.0f), B_far(K * N, 0.0f);
  std::vector<const float*> a_rows(K), b_rows(K);
  for (int64_t k = 0; k < K; ++k) {
    int64_t at = (k * 7919) % K;  // a permutation of the rows
    std::memcpy(&A_far[at * M], &A[k * M], M * sizeof(float));
    std::memcpy(&B_far[at * N], &B[k * N], N * sizeof(float));
    a_rows[k] = &A_far[at * M];
    b_rows[k] = &B_far[at * N];
  }
  for (float beta : {0.0f, 1.0f}) {
    auto C_ref = random_matrix(M * N, 13), C = C_ref;
    gemm(Trans::yes, Trans::no, M, N, K, A.data(), M, B.data(), N, beta, C_ref.data(), N);
    gemm_tn_rows(M, N, K, a_rows.data(), b_rows.data(), beta, C.data(), N);
    EXPECT_EQ(std::memcmp(C.data(), C_ref.data(), C.size() * sizeof(float)), 0) << "beta " << beta;
  }
}

// The FMA ceiling `bench gemm` reports: a positive, finite rate on vector ISAs, nothing to report
// on the scalar path (and the GEMM's instruction set restored after).
TEST(FmaCeiling, MeasuresTheVectorIsaTheGemmUses) {
  const double gflops = fma_ceiling_gflops(0.02);
  if (gemm_isa() == "scalar") {
    EXPECT_EQ(gflops, 0.0);
  } else {
    EXPECT_TRUE(std::isfinite(gflops));
    EXPECT_GT(gflops, 1.0) << "a vector FMA core runs more than 1 GFLOP/s";
  }
  force_gemm_isa("scalar");
  EXPECT_EQ(fma_ceiling_gflops(0.02), 0.0);
  force_gemm_isa("");
}

}  // namespace
}  // namespace pm

namespace pm {
namespace {

// GemmExtras::c_rows: C's rows anywhere (an expert's outputs written straight into the all-to-all's
// rows). Rows evenly apart (written in place), shuffled and in runs with gaps (through the edge
// tiles' buffer), on every instruction set, fp32 and bf16, with a bias, two depth blocks and
// threads: the bits of the same product into one matrix, and nothing written between the rows.
// c_rows16 (a bf16 all-to-all's rows): the same product's floats rounded to bf16 (float_to_bf16),
// also in AMX's order and past one depth block (where the product goes through one matrix first).
TEST(Gemm, CRowsByPointersGiveTheBitsOfOneMatrix) {
  enum class Layout { evenly_apart, shuffled, runs_with_gaps };
  auto check = [](int64_t M, int64_t N, int64_t K, bool bf16, bool bias_start, Layout layout, bool rows16) {
    auto A = random_matrix(M * K, 51), B = random_matrix(K * N, 52), bias = random_matrix(N, 53);
    PackedB packed;
    (bf16 ? pack_b_bf16 : pack_b)(Trans::no, K, N, B.data(), N, packed);
    const GemmExtras plain{bias_start ? bias.data() : nullptr, nullptr};
    std::vector<float> expected(M * N);
    gemm_packed(Trans::no, M, A.data(), K, packed, 0.0f, expected.data(), N, plain);
    // each row N + 3 values apart in a larger buffer filled with a sentinel, in the layout's order
    const int64_t stride = N + 3;
    std::vector<int64_t> slot(M);
    for (int64_t i = 0; i < M; ++i) slot[i] = i;
    if (layout == Layout::shuffled)
      for (int64_t i = M - 1; i > 0; --i) std::swap(slot[i], slot[(i * 7 + 3) % (i + 1)]);
    if (layout == Layout::runs_with_gaps)
      for (int64_t i = 0; i < M; ++i) slot[i] = i + i / 7;  // a row left out after every 7
    const std::size_t size = (M + M / 7 + 1) * stride;
    std::vector<float> out(rows16 ? 0 : size, -7.0f);
    std::vector<uint16_t> out16(rows16 ? size : 0, 0xbeef);
    std::vector<float*> rows(M);
    std::vector<uint16_t*> rows_16(M);
    for (int64_t i = 0; i < M; ++i) {
      rows[i] = rows16 ? nullptr : out.data() + slot[i] * stride;
      rows_16[i] = rows16 ? out16.data() + slot[i] * stride : nullptr;
    }
    GemmExtras extras = plain;
    if (rows16)
      extras.c_rows16 = rows_16.data();
    else
      extras.c_rows = rows.data();
    gemm_packed(Trans::no, M, A.data(), K, packed, 0.0f, nullptr, 0, extras);
    std::vector<bool> written(size, false);
    for (int64_t i = 0; i < M; ++i) {
      for (int64_t j = 0; j < N; ++j) {
        const bool same = rows16 ? rows_16[i][j] == float_to_bf16(expected[i * N + j])
                                 : std::memcmp(&rows[i][j], &expected[i * N + j], sizeof(float)) == 0;
        if (!same) return ::testing::AssertionFailure() << "row " << i << " column " << j << " differs";
      }
      for (int64_t j = 0; j < N; ++j) written[slot[i] * stride + j] = true;
    }
    for (std::size_t e = 0; e < size; ++e)
      if (!written[e] && (rows16 ? out16[e] != 0xbeef : out[e] != -7.0f))
        return ::testing::AssertionFailure() << "wrote between the rows at " << e;
    return ::testing::AssertionSuccess();
  };
  for (const std::string& isa : runnable_isas()) {
    force_gemm_isa(isa);
    for (auto [bf16, rows16] : {std::pair{false, false}, {true, false}, {false, true}, {true, true}})
      for (Layout layout : {Layout::evenly_apart, Layout::shuffled, Layout::runs_with_gaps})
        for (auto [M, N, K] : {std::array<int64_t, 3>{1, 16, 9}, {5, 40, 9}, {6, 64, 33}, {13, 150, 2100},
                               {40, 1030, 40}, {44, 100, 512}, {7, 70, 2500}})
          for (bool bias_start : {false, true})
            ASSERT_TRUE(check(M, N, K, bf16, bias_start, layout, rows16))
                << "isa '" << isa << "' " << M << "x" << N << "x" << K << (bf16 ? " bf16" : " fp32") << " layout "
                << static_cast<int>(layout) << (bias_start ? " bias" : "") << (rows16 ? " into bf16 rows" : "");
    set_compute_threads(2);  // the panels split over threads
    ASSERT_TRUE(check(600, 300, 200, false, true, Layout::runs_with_gaps, false)) << "isa '" << isa << "', 2 threads";
    ASSERT_TRUE(check(600, 300, 200, true, true, Layout::runs_with_gaps, true)) << "isa '" << isa << "', 2 threads";
    set_compute_threads(1);
  }
  force_gemm_isa("");
  set_bf16_order(Bf16Order::amx);  // (on its model where the CPU has no AMX)
  for (bool rows16 : {false, true})
    ASSERT_TRUE(check(13, 150, 2100, true, true, Layout::shuffled, rows16)) << "amx order, bf16 rows " << rows16;
  set_bf16_order(Bf16Order::dot);
}


// Row i of A times a_row_scale[i], made as A is packed: the bits of the product on a copy of the
// rows scaled beforehand (scale * value, one float product each), on every instruction set,
// wherever the rows sit, for B of few panels (where A is otherwise read in place) and of many,
// a depth of two blocks, a bias start, an epilogue, and two threads.
TEST(Gemm, ScaledRowsOfAGiveTheBitsOfAScaledCopy) {
  auto check = [](int64_t M, int64_t N, int64_t K, bool bias_start) {
    auto A = random_matrix(M * K, 61), B = random_matrix(K * N, 62), bias = random_matrix(N, 63);
    auto scale = random_matrix(M, 64);
    PackedB packed;
    pack_b(Trans::no, K, N, B.data(), N, packed);
    std::vector<float> copy(M * K);
    for (int64_t i = 0; i < M; ++i)
      for (int64_t k = 0; k < K; ++k) copy[i * K + k] = scale[i] * A[i * K + k];
    // an epilogue that leaves a mark the two runs must share
    TileEpilogue mark = [&](int64_t, int64_t, int64_t, int64_t) {};
    const GemmExtras plain{bias_start ? bias.data() : nullptr, bias_start ? &mark : nullptr};
    std::vector<float> expected(M * N), got(M * N, -7.0f);
    gemm_packed(Trans::no, M, copy.data(), K, packed, 0.0f, expected.data(), N, plain);
    // A's rows in reverse order in their buffer: by pointer
    std::vector<const float*> rows(M);
    std::vector<float> reversed(M * K);
    for (int64_t i = 0; i < M; ++i) {
      std::memcpy(&reversed[(M - 1 - i) * K], &A[i * K], K * sizeof(float));
      rows[i] = &reversed[(M - 1 - i) * K];
    }
    GemmExtras extras = plain;
    extras.a_row_scale = scale.data();
    gemm_packed_rows(M, rows.data(), packed, 0.0f, got.data(), N, extras);
    if (std::memcmp(got.data(), expected.data(), M * N * sizeof(float)) != 0)
      return ::testing::AssertionFailure() << "the products differ";
    return ::testing::AssertionSuccess();
  };
  for (const std::string& isa : runnable_isas()) {
    force_gemm_isa(isa);
    for (auto [M, N, K] : {std::array<int64_t, 3>{1, 16, 9}, {5, 40, 9}, {6, 64, 33}, {13, 150, 2100}, {40, 1030, 40},
                           {601, 128, 512}})
      for (bool bias_start : {false, true})
        ASSERT_TRUE(check(M, N, K, bias_start)) << "isa '" << isa << "' " << M << "x" << N << "x" << K
                                                << (bias_start ? " bias" : "");
    set_compute_threads(2);
    ASSERT_TRUE(check(600, 1100, 200, true)) << "isa '" << isa << "', 2 threads";
    set_compute_threads(1);
  }
  force_gemm_isa("");
  // not for what it cannot scale: a transposed A, bf16
  auto A = random_matrix(36, 65), scale = random_matrix(6, 66);
  PackedB packed, packed16;
  pack_b(Trans::no, 6, 6, A.data(), 6, packed);
  pack_b_bf16(Trans::no, 6, 6, A.data(), 6, packed16);
  std::vector<float> C(36);
  GemmExtras extras;
  extras.a_row_scale = scale.data();
  EXPECT_THROW(gemm_packed(Trans::yes, 6, A.data(), 6, packed, 0.0f, C.data(), 6, extras), Error);
  EXPECT_THROW(gemm_packed(Trans::no, 6, A.data(), 6, packed16, 0.0f, C.data(), 6, extras), Error);
}

// gemm_tn_rows with B's rows scaled: the weight gradient and B's column sums of a scaled copy.
TEST(Gemm, TnRowsWithScaledBGiveTheBitsOfAScaledCopy) {
  for (const std::string& isa : runnable_isas()) {
    force_gemm_isa(isa);
    for (auto [M, N, K] : {std::array<int64_t, 3>{7, 40, 5}, {128, 512, 1025}, {64, 70, 1300}, {0, 16, 9}}) {
      auto A = random_matrix(K * std::max<int64_t>(M, 1), 71), B = random_matrix(K * N, 72), scale = random_matrix(K, 73);
      std::vector<float> copy(K * N);
      for (int64_t k = 0; k < K; ++k)
        for (int64_t j = 0; j < N; ++j) copy[k * N + j] = scale[k] * B[k * N + j];
      std::vector<const float*> a_rows(K), b_rows(K), copy_rows(K);
      for (int64_t k = 0; k < K; ++k)
        a_rows[k] = &A[k * std::max<int64_t>(M, 1)], b_rows[k] = &B[k * N], copy_rows[k] = &copy[k * N];
      auto start = random_matrix(std::max<int64_t>(M, 1) * N, 74), sums_start = random_matrix(N, 75);
      std::vector<float> expected = start, got = start, expected_sums = sums_start, got_sums = sums_start;
      gemm_tn_rows(M, N, K, a_rows.data(), copy_rows.data(), 1.0f, expected.data(), N, expected_sums.data());
      gemm_tn_rows(M, N, K, a_rows.data(), b_rows.data(), 1.0f, got.data(), N, got_sums.data(), scale.data());
      ASSERT_EQ(0, std::memcmp(got.data(), expected.data(), got.size() * sizeof(float)))
          << "isa '" << isa << "' " << M << "x" << N << "x" << K;
      ASSERT_EQ(0, std::memcmp(got_sums.data(), expected_sums.data(), N * sizeof(float)))
          << "sums, isa '" << isa << "' " << M << "x" << N << "x" << K;
    }
  }
  force_gemm_isa("");
}

}  // namespace
}  // namespace pm
