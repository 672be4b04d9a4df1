// bf16 experts' whole backward (input gradients of every expert, then every expert's weight
// gradients, the layer's order) on output gradients the deduplicated dispatch left once per token,
// each choice's row to be read as gate * dy rounded to bf16. Two ways, alternating in one process:
//   copy:  gate * dy rounded into a bf16 copy of every choice's row as each expert's turn comes,
//          which both steps then read (the layer until session 60: 16 MB a rank at these shapes);
//   block: DyRows::scaled / ExpertRows::dy_scale, each step rounding its expert's rows into a
//          block of its own where it reads them (expert_ffn.cpp, scaled_rows_in_bf16).
// Default: 32 SwiGLU experts of 512 rows picked from 4096 distinct rows of dy, M 512, H 128 (a
// DeepSeek-style rank's share of top-8 of 64). One thread; per-round ratios; checks the bits.
// docs/BENCHMARKS.md, "bf16 experts round the scaled rows where they read them". Build against a
// built tree and run:
//
//   g++ -O3 -march=native -std=c++20 -ffp-contract=off -Isrc bench/scaled_rows_bf16.cpp -o /tmp/srb
//       -Lbuild/src -lpipemoe_kernels -lpipemoe_core -lfmt -lpthread -lopenblas   (one line)
//   (or build/bench/scaled_rows_bf16, built with the tree)
//   /tmp/srb [ROUNDS=11 [CSV]]   (BF16_ORDER=amx: in AMX's order, bench_expert.h)
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "bench_expert.h"
#include "bench_timing.h"
#include "core/rng.h"
#include "core/tensor.h"
#include "kernels/cpu/expert_ffn.h"
using namespace pm;

namespace {

constexpr int kExperts = 32;
constexpr int64_t kRows = 512, kDistinct = 4096, M = 512, H = 128;

using bench::median;
using bench::ms_of;

// One way's outputs: every expert's input and weight gradients.
struct Outputs {
  std::vector<std::vector<float>> dhpre, du, gw1, gb1, gw2, gb2;
};

}  // namespace

int main(int argc, char** argv) {
  const int rounds = argc > 1 ? std::atoi(argv[1]) : 11;
  const std::string csv = argc > 2 ? argv[2] : "";
  if (rounds < 1 || argc > 3) {
    std::fprintf(stderr, "usage: %s [ROUNDS [CSV]]\n", argv[0]);
    return 2;
  }
  bench::set_bf16_order_from_env();
  const Activation kind = Activation::swiglu;
  const int64_t H1 = fc1_width(kind, H), rows_all = kExperts * kRows;
  std::vector<std::unique_ptr<bench::BenchExpert>> experts;
  for (int e = 0; e < kExperts; ++e) {
    experts.push_back(std::make_unique<bench::BenchExpert>(e, kRows, M, H, kind));
    experts.back()->forward();  // the saved rows and activations the backward reads
  }
  std::vector<float> dy(kDistinct * M), gate(rows_all);
  Rng(7, 1).fill_normal(dy.data(), dy.size(), 0.0f, 1.0f);
  Rng(7, 2).fill_normal(gate.data(), gate.size(), 0.0f, 0.5f);
  std::vector<const float*> rows(rows_all);  // each choice's row of dy, scattered over the distinct ones
  for (int64_t i = 0; i < rows_all; ++i) rows[i] = &dy[static_cast<int64_t>((i * 2654435761ull) % kDistinct) * M];
  std::vector<uint16_t> copy(rows_all * M);

  auto make_outputs = [&] {
    Outputs o;
    for (auto* v : {&o.dhpre, &o.du, &o.gw1, &o.gb1, &o.gw2, &o.gb2}) v->resize(kExperts);
    for (int e = 0; e < kExperts; ++e) {
      o.dhpre[e].assign(kRows * H1, 0.0f), o.du[e].assign(kRows * M, 0.0f);
      o.gw1[e].assign(M * H1, 0.0f), o.gb1[e].assign(H1, 0.0f), o.gw2[e].assign(H * M, 0.0f), o.gb2[e].assign(M, 0.0f);
    }
    return o;
  };
  Outputs by_copy = make_outputs(), by_block = make_outputs();
  auto backward = [&](Outputs& o, bool block) {
    for (int e = 0; e < kExperts; ++e) {
      bench::BenchExpert& x = *experts[e];
      const int64_t first = e * kRows;
      DyRows dy_in = DyRows::scaled(&rows[first], &gate[first]);
      if (!block) {
        for (int64_t i = first; i < first + kRows; ++i) scaled_floats_to_bf16(gate[i], rows[i], &copy[i * M], M);
        dy_in = DyRows(RowsIn(&copy[first * M]));
      }
      expert_backward_input(x.w, kRows, M, H, dy_in, x.saved_rows.data(), o.dhpre[e].data(), o.du[e].data());
    }
    for (int e = 0; e < kExperts; ++e) {
      bench::BenchExpert& x = *experts[e];
      const int64_t first = e * kRows;
      ExpertRows r;
      r.u_bf16 = x.u_rows, r.act_bf16 = x.act_rows;
      for (int64_t i = 0; i < kRows; ++i) {
        r.dhpre.push_back(&o.dhpre[e][i * H1]);
        if (block)
          r.dy.push_back(rows[first + i]), r.dy_scale.push_back(gate[first + i]);
        else
          r.dy_bf16.push_back(&copy[(first + i) * M]);
      }
      expert_weight_grads({o.gw1[e].data(), o.gb1[e].data(), o.gw2[e].data(), o.gb2[e].data()}, kind,
                          Precision::bf16, M, H, r);
    }
  };
  std::vector<double> copy_ms, block_ms, ratio;
  for (int r = 0; r < rounds; ++r) {
    const bool block_first = r % 2 == 0;
    const double first = ms_of([&] { backward(block_first ? by_block : by_copy, block_first); });
    const double second = ms_of([&] { backward(block_first ? by_copy : by_block, !block_first); });
    block_ms.push_back(block_first ? first : second), copy_ms.push_back(block_first ? second : first);
    ratio.push_back(block_ms.back() / copy_ms.back());
  }
  // the weight gradients accumulate over rounds: the same rounds, so the same sums, bit for bit
  bool same = true;
  for (int e = 0; e < kExperts; ++e)
    for (auto field : {&Outputs::dhpre, &Outputs::du, &Outputs::gw1, &Outputs::gb1, &Outputs::gw2, &Outputs::gb2})
      same = same && (by_copy.*field)[e] == (by_block.*field)[e];
  std::printf("%d bf16 SwiGLU experts x %lld rows of %lld distinct rows of dy, M %lld, H %lld, one thread (%s), %d "
              "alternating rounds\n",
              kExperts, static_cast<long long>(kRows), static_cast<long long>(kDistinct), static_cast<long long>(M),
              static_cast<long long>(H), gemm_bf16_path().c_str(), rounds);
  std::printf("%22s %22s %22s %s\n", "bf16 copy + both ms", "blocks, both ms", "ratio (median of rounds)", "bits");
  std::printf("%22.2f %22.2f %22.3f %s\n", median(copy_ms), median(block_ms), median(ratio), same ? "same" : "DIFFER");
  if (!csv.empty()) {
    FILE* out = std::fopen(csv.c_str(), "w");
    if (!out) return std::fprintf(stderr, "cannot write %s\n", csv.c_str()), 1;
    std::fprintf(out, "round,copy_ms,block_ms,ratio\n");
    for (int r = 0; r < rounds; ++r) std::fprintf(out, "%d,%.3f,%.3f,%.4f\n", r + 1, copy_ms[r], block_ms[r], ratio[r]);
    std::fclose(out);
  }
  return same ? 0 : 1;
}
