// The dense products of a training step of the bundled models (one rank's 1536 tokens, d_model
// 192, MLP 768, vocabulary 2048): each layer's forward, input-gradient and weight-gradient GEMM,
// fp32 or bf16, and the loss with its gradient (cross_entropy). One thread, operands in cache,
// medians of the rounds, GFLOP/s. Build it against two trees' libraries and run them alternately
// for old against new (docs/BENCHMARKS.md, "The training step's dense work": the weight
// gradients' transposed packing by chunks, the loss's exponentials in vectors of 16):
//
//   g++ -O3 -march=native -std=c++20 -ffp-contract=off -Isrc bench/dense_products.cpp -o /tmp/dense_products
//       -Lbuild/src -lpipemoe_kernels -lpipemoe_core -lfmt -lpthread -lopenblas   (one line)
//   (or build/bench/dense_products, built with the tree)
//   build/bench/dense_products [fp32|bf16] [--csv FILE]
#include <cstdio>
#include <string>
#include <vector>

#include "bench_timing.h"
#include "core/rng.h"
#include "kernels/cpu/cross_entropy.h"
#include "kernels/cpu/gemm.h"
using namespace pm;

int main(int argc, char** argv) {
  bool bf16 = false;
  std::string csv_path;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "bf16") bf16 = true;
    if (a == "--csv" && i + 1 < argc) csv_path = argv[++i];
  }
  struct Product {
    const char* name;
    Trans ta, tb;
    int64_t M, N, K;
  };
  constexpr int64_t T = 1536, D = 192, F = 768, V = 2048;
  const Product products[] = {
      {"qkv fwd", Trans::no, Trans::no, T, 3 * D, D},     {"qkv dgrad", Trans::no, Trans::yes, T, D, 3 * D},
      {"qkv wgrad", Trans::yes, Trans::no, D, 3 * D, T},  {"proj fwd", Trans::no, Trans::no, T, D, D},
      {"proj wgrad", Trans::yes, Trans::no, D, D, T},      {"mlp fc fwd", Trans::no, Trans::no, T, F, D},
      {"mlp fc wgrad", Trans::yes, Trans::no, D, F, T},    {"mlp out fwd", Trans::no, Trans::no, T, D, F},
      {"mlp out dgrad", Trans::no, Trans::yes, T, F, D},   {"mlp out wgrad", Trans::yes, Trans::no, F, D, T},
      {"head fwd", Trans::no, Trans::yes, T, V, D},        {"head dgrad", Trans::no, Trans::no, T, D, V},
      {"head wgrad", Trans::yes, Trans::no, V, D, T}};
  constexpr int kRounds = 15;
  FILE* csv = csv_path.empty() ? nullptr : std::fopen(csv_path.c_str(), "w");
  if (csv) std::fprintf(csv, "product,dtype,M,N,K,ms,gflops\n");
  std::printf("%s, one thread\n%-14s %6s %6s %6s %9s %9s\n", bf16 ? "bf16" : "fp32", "product", "M", "N", "K", "ms",
              "GFLOP/s");
  for (const Product& p : products) {
    const int64_t a_rows = p.ta == Trans::no ? p.M : p.K, a_cols = p.ta == Trans::no ? p.K : p.M;
    const int64_t b_rows = p.tb == Trans::no ? p.K : p.N, b_cols = p.tb == Trans::no ? p.N : p.K;
    std::vector<float> A(a_rows * a_cols), B(b_rows * b_cols), C(p.M * p.N);
    Rng(1, 0).fill_normal(A.data(), A.size(), 0.0f, 1.0f);
    Rng(2, 0).fill_normal(B.data(), B.size(), 0.0f, 1.0f);
    std::vector<double> t;
    for (int round = 0; round <= kRounds; ++round) {  // round 0: first touch, not timed
      const double ms = bench::ms_of([&] {
        if (bf16)
          gemm_bf16(p.ta, p.tb, p.M, p.N, p.K, A.data(), a_cols, B.data(), b_cols, 0.0f, C.data(), p.N);
        else
          gemm(p.ta, p.tb, p.M, p.N, p.K, A.data(), a_cols, B.data(), b_cols, 0.0f, C.data(), p.N);
      });
      if (round > 0) t.push_back(ms);
    }
    const double ms = bench::median(t), gflops = 2.0 * p.M * p.N * p.K / (ms * 1e6);
    std::printf("%-14s %6ld %6ld %6ld %9.3f %9.1f\n", p.name, static_cast<long>(p.M), static_cast<long>(p.N),
                static_cast<long>(p.K), ms, gflops);
    if (csv)
      std::fprintf(csv, "%s,%s,%ld,%ld,%ld,%.4f,%.1f\n", p.name, bf16 ? "bf16" : "fp32", static_cast<long>(p.M),
                   static_cast<long>(p.N), static_cast<long>(p.K), ms, gflops);
  }
  // the loss and its gradient over the logits (fp32 in both precisions)
  std::vector<float> logits(T * V), dlogits(T * V), losses(T);
  std::vector<int32_t> targets(T);
  Rng(3, 0).fill_normal(logits.data(), logits.size(), 0.0f, 3.0f);
  for (int64_t r = 0; r < T; ++r) targets[r] = static_cast<int32_t>((r * 7919) % V);
  std::vector<double> t;
  for (int round = 0; round <= kRounds; ++round) {
    const double ms = bench::ms_of([&] {
      cross_entropy(logits.data(), targets.data(), T, V, losses.data(), dlogits.data(), 1.0f / T);
    });
    if (round > 0) t.push_back(ms);
  }
  const double ms = bench::median(t);
  std::printf("%-14s %6ld %6ld %6s %9.3f %6.3f ns a logit\n", "cross entropy", static_cast<long>(T),
              static_cast<long>(V), "", ms, ms * 1e6 / (T * V));
  if (csv) std::fprintf(csv, "cross entropy,fp32,%ld,%ld,0,%.4f,0\n", static_cast<long>(T), static_cast<long>(V), ms);
  if (csv) std::fclose(csv);
  return 0;
}
