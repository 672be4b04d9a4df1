// Packing one rank's bf16 expert weights, as a training step does after every optimizer update
// (ExpertWeights::pack_forward and pack_backward's four packings per expert), in the two forms:
// the float panels and the pair words both (what pack_b_bf16 made on every CPU before) against the
// pair words alone (what it makes where the bf16 GEMMs run on them: AVX512_BF16 or AMX's order).
// Each round packs every expert in both forms, one form after the other, so the host's drift falls
// on both; the weights (and the packings) are each expert's own, so they come from memory as they do
// in a training step. Medians of the rounds, one thread; docs/BENCHMARKS.md, "Expert weights packed
// as pair words alone". Build against a built tree:
//
//   g++ -O3 -march=native -std=c++20 -ffp-contract=off -Isrc bench/weight_packing.cpp -o /tmp/weight_packing
//       -Lbuild/src -lpipemoe_kernels -lpipemoe_core -lfmt -lpthread -lopenblas   (one line)
//   (or build/bench/weight_packing, built with the tree)
//   build/bench/weight_packing [--csv FILE]
//   (a DeepSeek-style layer's 32 experts a rank, M 512, SwiGLU of hidden 128; the PyTorch comparison
//   layer's 4 experts a rank, GeLU of hidden 1024)
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "bench_timing.h"
#include "core/rng.h"
#include "kernels/cpu/gemm.h"
#include "kernels/cpu/gemm_internal.h"
using namespace pm;

namespace {

struct Layer {
  const char* name;
  int64_t experts, M, H;
  bool swiglu;
};

// The four packings of ExpertWeights::pack_forward and pack_backward for one expert.
void pack_expert(const float* w1, const float* w2, int64_t M, int64_t H1, int64_t H, bool panels, PackedB* out) {
  gemm_detail::pack_b_bf16_forms(Trans::no, M, H1, w1, H1, out[0], panels, true);
  gemm_detail::pack_b_bf16_forms(Trans::no, H, M, w2, M, out[1], panels, true);
  gemm_detail::pack_b_bf16_forms(Trans::yes, M, H, w2, M, out[2], panels, true);
  gemm_detail::pack_b_bf16_forms(Trans::yes, H1, M, w1, H1, out[3], panels, true);
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  const std::string csv_path = bench::csv_path_of(argc, argv);
  if (!gemm_detail::bf16_pair_words_wanted()) {
    std::printf("this CPU has no AVX512_BF16: bf16 packings make the float panels alone, as before\n");
    return 0;
  }
  const Layer layers[] = {{"DeepSeek-style (32 experts, M 512, SwiGLU H 128)", 32, 512, 128, true},
                          {"PyTorch comparison (4 experts, M 512, GeLU H 1024)", 4, 512, 1024, false}};
  constexpr int kRounds = 9;
  FILE* csv = csv_path.empty() ? nullptr : std::fopen(csv_path.c_str(), "w");
  if (csv) std::fprintf(csv, "layer,experts,values_per_pass,both_forms_ms,words_alone_ms,ratio\n");
  std::printf("%-52s %14s %14s %8s\n", "one rank's experts, a step's four packings each", "panels+words", "words alone",
              "ratio");
  for (const Layer& l : layers) {
    const int64_t H1 = l.swiglu ? 2 * l.H : l.H;
    std::vector<std::vector<float>> w1(l.experts, std::vector<float>(l.M * H1));
    std::vector<std::vector<float>> w2(l.experts, std::vector<float>(l.H * l.M));
    for (int64_t e = 0; e < l.experts; ++e) {
      Rng(7, e).fill_uniform(w1[e].data(), l.M * H1, -0.1f, 0.1f);
      Rng(8, e).fill_uniform(w2[e].data(), l.H * l.M, -0.1f, 0.1f);
    }
    std::vector<PackedB> both(4 * l.experts), words(4 * l.experts);
    std::vector<double> t_both, t_words;
    for (int round = 0; round <= kRounds; ++round) {  // round 0: first touch of the packings' pages, not timed
      for (bool panels : {true, false}) {
        const auto start = std::chrono::steady_clock::now();
        for (int64_t e = 0; e < l.experts; ++e)
          pack_expert(w1[e].data(), w2[e].data(), l.M, H1, l.H, panels, &(panels ? both : words)[4 * e]);
        const double ms = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() * 1e3;
        if (round > 0) (panels ? t_both : t_words).push_back(ms);
      }
    }
    const double a = median(t_both), b = median(t_words);
    std::printf("%-52s %11.2f ms %11.2f ms %8.3f\n", l.name, a, b, b / a);
    if (csv)
      std::fprintf(csv, "\"%s\",%ld,%ld,%.3f,%.3f,%.4f\n", l.name, static_cast<long>(l.experts),
                   static_cast<long>(2 * l.experts * (l.M * H1 + l.H * l.M)), a, b, b / a);
  }
  if (csv) std::fclose(csv);
}
