// N bf16 experts taking turns, each with its own weights and rows (as a layer's local experts run:
// every expert's data has left the caches when its turn comes), against one expert run N times
// (its data hot, as bench/expert_parts.cpp times it): the forward, input gradient and weight
// gradients per expert, medians of 9 rounds alternating the two; and the backward's two steps in
// the layer's order against each expert's both at once. Default: 32 SwiGLU experts of
// 512 rows, M 512, H 128 (a DeepSeek-style layer's share of one rank). docs/BENCHMARKS.md,
// "Fine-grained experts in turn: memory, not arithmetic". Build against a built tree and run:
//
//   g++ -O3 -march=native -std=c++20 -ffp-contract=off -Isrc bench/experts_in_turn.cpp -o /tmp/experts_in_turn
//       -Lbuild/src -lpipemoe_kernels -lpipemoe_core -lfmt -lpthread -lopenblas   (one line)
//   (or build/bench/experts_in_turn, built with the tree)
//   /tmp/experts_in_turn [N ROWS M H [gelu|swiglu]]   (BF16_ORDER=amx: in AMX's order, bench_expert.h)
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <vector>

#include "bench_expert.h"
#include "core/tensor.h"
#include "kernels/cpu/expert_ffn.h"
using namespace pm;

namespace {

using Expert = bench::BenchExpert;

}  // namespace

int main(int argc, char** argv) {
  int n = 32;
  int64_t R = 512, M = 512, H = 128;
  Activation kind = Activation::swiglu;
  if (argc >= 5) n = std::atoi(argv[1]), R = std::atoll(argv[2]), M = std::atoll(argv[3]), H = std::atoll(argv[4]);
  if (argc >= 6) kind = std::strcmp(argv[5], "gelu") == 0 ? Activation::gelu : Activation::swiglu;
  if ((argc != 1 && argc != 5 && argc != 6) || n < 1 || R < 1 || M < 2 || H < 2 || M % 2 || H % 2) {
    std::fprintf(stderr, "usage: %s [N ROWS M H [gelu|swiglu]]  (M, H even)\n", argv[0]);
    return 2;
  }
  bench::set_bf16_order_from_env();
  std::vector<std::unique_ptr<Expert>> experts;
  for (int e = 0; e < n; ++e) experts.push_back(std::make_unique<Expert>(e, R, M, H, kind));
  auto forward = [](Expert& x) { x.forward(); };
  auto input_grad = [](Expert& x) { x.input_gradient(); };
  auto weight_grads = [](Expert& x) { x.weight_gradients(); };
  for (auto& x : experts) forward(*x), input_grad(*x);
  std::printf("%d bf16 %s experts of %lld rows, M %lld, H %lld, one thread: ms per expert\n", n,
              kind == Activation::swiglu ? "SwiGLU" : "GeLU", static_cast<long long>(R), static_cast<long long>(M),
              static_cast<long long>(H));
  std::printf("%-22s %10s %10s %7s\n", "step", "in turn", "one hot", "ratio");
  auto row = [&](const char* name, auto step) {
    std::vector<double> ms[2];
    for (int round = 0; round < 9; ++round)
      for (int hot = 0; hot < 2; ++hot) {
        const auto start = std::chrono::steady_clock::now();
        for (int e = 0; e < n; ++e) step(*experts[hot ? 0 : e]);
        ms[hot].push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() * 1e3 / n);
      }
    for (auto& v : ms) std::sort(v.begin(), v.end());
    std::printf("%-22s %10.3f %10.3f %6.2fx\n", name, ms[0][4], ms[1][4], ms[0][4] / ms[1][4]);
  };
  row("forward", forward);
  row("input gradient", input_grad);
  row("weight gradients", weight_grads);
  // The backward's two steps in the layer's order (every input gradient, then every expert's
  // weight gradients) against each expert's weight gradients right after its input gradient, while
  // its output gradients and dh are still in cache.
  std::vector<double> ms[2];
  for (int round = 0; round < 9; ++round)
    for (int fused = 0; fused < 2; ++fused) {
      const auto start = std::chrono::steady_clock::now();
      if (fused) {
        for (auto& x : experts) input_grad(*x), weight_grads(*x);
      } else {
        for (auto& x : experts) input_grad(*x);
        for (auto& x : experts) weight_grads(*x);
      }
      ms[fused].push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() * 1e3 / n);
    }
  for (auto& v : ms) std::sort(v.begin(), v.end());
  std::printf("backward, all input gradients then all weight gradients: %.3f ms per expert; each expert's both "
              "at once: %.3f (%.2fx)\n", ms[0][4], ms[1][4], ms[1][4] / ms[0][4]);
  return 0;
}
