// The dispatch's and the combine's row kernels (kernels/cpu/dispatch.cpp) against the per-choice
// loops they replaced (an axpy or a dot per choice, kept here as the reference): 2048 tokens of
// M 512, top-2 of 8 and top-8 of 64 experts, bf16 and fp32 slots, rows grouped by expert as the
// all-to-all delivers them. Medians of 21 alternating calls, one thread; checks that both give the same bits.
// Build against a built tree and run (docs/BENCHMARKS.md, "A token's choices summed in registers"):
//
//   g++ -O3 -march=native -std=c++20 -ffp-contract=off -Isrc bench/choice_rows.cpp -o /tmp/choice_rows
//       -Lbuild/src -lpipemoe_kernels -lpipemoe_core -lfmt -lpthread -lopenblas   (one line)
//   (or build/bench/choice_rows, built with the tree)
//   /tmp/choice_rows [CSV]      (CHOICE_ROWS_COLD=1: the rows evicted from the caches before each call)
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "core/tensor.h"
#include "kernels/cpu/dispatch.h"
#include "kernels/cpu/elementwise.h"
using namespace pm;

namespace {

// CHOICE_ROWS_COLD=1 (environment): every call after a 512 MB sweep, which evicts the caches (300
// MB of L3 here): the rows come from memory, as in a layer, where an all-to-all wrote them long
// before in cache terms.
const bool g_cold = std::getenv("CHOICE_ROWS_COLD") && std::string(std::getenv("CHOICE_ROWS_COLD")) == "1";

void evict_caches() {
  static std::vector<char> sweep(std::size_t{512} << 20);
  for (std::size_t i = 0; i < sweep.size(); i += 64) sweep[i] = static_cast<char>(sweep[i] + 1);
}

// Medians of 21 calls of each, the two alternating call by call: the host's speed drifts 10-30%
// within seconds, and both sides see the same drift.
template <typename A, typename B>
std::pair<double, double> median_ms(A a, B b) {
  std::vector<double> ms[2];
  auto time = [](auto fn) {
    if (g_cold) evict_caches();
    const auto start = std::chrono::steady_clock::now();
    fn();
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() * 1e3;
  };
  for (int i = 0; i < 21; ++i) ms[0].push_back(time(a)), ms[1].push_back(time(b));
  for (auto& v : ms) std::sort(v.begin(), v.end());
  return {ms[0][10], ms[1][10]};
}

// The loops before: one pass over the token's row per choice.
template <typename X>
void combine_per_choice(const X* slots, const float* gate, int64_t T, int64_t M, int k, const int64_t* pos, float* y) {
  for (int64_t t = 0; t < T; ++t) {
    std::memset(y + t * M, 0, M * sizeof(float));
    for (int j = 0; j < k; ++j)
      if (pos[t * k + j] >= 0) axpy(gate[t * k + j], slots + pos[t * k + j] * M, y + t * M, M);
  }
}
template <typename X>
void dispatch_backward_per_choice(const X* dslots, int64_t T, int64_t M, int k, const int64_t* pos, float* dx) {
  for (int64_t t = 0; t < T; ++t)
    for (int j = 0; j < k; ++j)
      if (pos[t * k + j] >= 0) axpy(1.0f, dslots + pos[t * k + j] * M, dx + t * M, M);
}
template <typename X>
void gate_grad_per_choice(const float* dy, const X* slots, int64_t T, int64_t M, int k, const int64_t* pos, float* dgate) {
  for (int64_t i = 0; i < T * k; ++i) dgate[i] = pos[i] < 0 ? 0.0f : dot(dy + (i / k) * M, slots + pos[i] * M, M);
}

template <typename X>
RowsIn rows_in(const std::vector<X>& v) { return RowsIn(v.data()); }

template <typename X>
void run(int k, int experts, FILE* csv) {
  const int64_t T = 2048, M = 512;
  std::mt19937 rng(1);
  std::vector<int64_t> pos(T * k);
  {  // each token's k distinct experts at random; slots grouped by expert, tokens in order within
    std::vector<int> expert(T * k);
    std::vector<int64_t> start(experts + 1, 0);
    for (int64_t t = 0; t < T; ++t) {
      std::vector<int> all(experts);
      std::iota(all.begin(), all.end(), 0);
      std::shuffle(all.begin(), all.end(), rng);
      for (int j = 0; j < k; ++j) expert[t * k + j] = all[j], ++start[all[j] + 1];
    }
    for (int e = 0; e < experts; ++e) start[e + 1] += start[e];
    for (int64_t i = 0; i < T * k; ++i) pos[i] = start[expert[i]]++;
    pos[5] = -1;  // a dropped choice
  }
  std::vector<X> slots(T * k * M);
  std::vector<float> dy(T * M), gate(T * k), y(T * M), y_ref(T * M), dx(T * M), dx_ref(T * M), dg(T * k), dg_ref(T * k);
  for (auto& v : slots) {
    const float f = static_cast<float>(static_cast<int>(rng() % 2001) - 1000) * 1e-3f;
    if constexpr (sizeof(X) == 2) v = float_to_bf16(f); else v = f;
  }
  for (auto& v : dy) v = static_cast<float>(static_cast<int>(rng() % 2001) - 1000) * 1e-3f;
  for (auto& v : gate) v = static_cast<float>(rng() % 1000) * 1e-3f;
  const RowsIn in = rows_in(slots);
  const char* type = sizeof(X) == 2 ? "bf16" : "fp32";
  struct Row { const char* name; double before, after; bool same; };
  std::vector<Row> rows;
  auto add = [&](const char* name, std::pair<double, double> ms, bool same) { rows.push_back({name, ms.first, ms.second, same}); };
  add("combine", median_ms([&] { combine_per_choice(slots.data(), gate.data(), T, M, k, pos.data(), y_ref.data()); },
                           [&] { combine_rows(in, gate.data(), T, M, k, pos.data(), y.data()); }), false);
  rows.back().same = y == y_ref;
  // (dx accumulates: both from zeros once for the bits, the timings on whatever they hold)
  dispatch_backward_per_choice(slots.data(), T, M, k, pos.data(), dx_ref.data());
  dispatch_rows_backward(in, T, M, k, pos.data(), dx.data());
  const bool dx_same = dx == dx_ref;
  add("dispatch backward", median_ms([&] { dispatch_backward_per_choice(slots.data(), T, M, k, pos.data(), dx_ref.data()); },
                                     [&] { dispatch_rows_backward(in, T, M, k, pos.data(), dx.data()); }), dx_same);
  add("gate gradient", median_ms([&] { gate_grad_per_choice(dy.data(), slots.data(), T, M, k, pos.data(), dg_ref.data()); },
                                 [&] { combine_rows_backward_gate(dy.data(), in, T, M, k, pos.data(), dg.data()); }), false);
  rows.back().same = dg == dg_ref;
  for (const Row& r : rows) {
    std::printf("%-5s top-%d of %-3d %-18s %8.3f ms %8.3f ms %6.2fx  %s\n", type, k, experts, r.name, r.before, r.after,
                r.after / r.before, r.same ? "same bits" : "BITS DIFFER");
    if (csv) std::fprintf(csv, "%s,%d,%d,%s,%.4f,%.4f,%d\n", type, k, experts, r.name, r.before, r.after, r.same ? 1 : 0);
  }
}

}  // namespace

int main(int argc, char** argv) {
  FILE* csv = argc > 1 ? std::fopen(argv[1], "w") : nullptr;
  if (argc > 1 && !csv) {
    std::fprintf(stderr, "cannot write %s\n", argv[1]);
    return 2;
  }
  if (csv) std::fprintf(csv, "slots,top_k,experts,kernel,per_choice_ms,in_registers_ms,same_bits\n");
  std::printf("2048 tokens, M 512, one thread: per choice (before) and in registers (now)\n");
  std::printf("%-5s %-13s %-18s %11s %11s %7s\n", "slots", "routing", "kernel", "per choice", "registers", "ratio");
  for (auto [k, e] : {std::pair{2, 8}, std::pair{8, 64}}) {
    run<uint16_t>(k, e, csv);
    run<float>(k, e, csv);
  }
  if (csv) std::fclose(csv);
  return 0;
}
