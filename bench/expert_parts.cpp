// The parts of one expert block's passes timed alone (by default 1025 rows, M 512, H 1024, GeLU, bf16
// or fp32): each GEMM plain, then the whole forward / input-gradient / weight-gradient step around
// them, so the work beside the GEMMs shows (docs/BENCHMARKS.md, "bf16 on a CPU with AVX512_BF16"
// and "The floor's gap, looked at again"). Medians of 15 rounds (each calls every part once), one thread, with GFLOP/s. Build
// against a built tree and run:
//
//   g++ -O3 -march=native -std=c++20 -ffp-contract=off -Isrc bench/expert_parts.cpp -o /tmp/expert_parts
//       -Lbuild/src -lpipemoe_kernels -lpipemoe_core -lfmt -lpthread -lopenblas   (one line)
//   (or build/bench/expert_parts, built with the tree)
//   /tmp/expert_parts [bf16|fp32] [ROWS M H [gelu|swiglu]]   (default 1025 512 1024 gelu; e.g.
//       512 512 128 swiglu: a fine-grained expert's share of a DeepSeek-style layer)
//   BF16_ORDER=amx /tmp/expert_parts bf16 ...: the bf16 GEMMs in AMX's order (gemm.h); amx-model:
//   in that order on its fp32 model even where the CPU has AMX (what a CPU without it runs)
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <vector>

#include "bench_expert.h"
#include "core/tensor.h"
#include "kernels/cpu/elementwise.h"
#include "kernels/cpu/expert_ffn.h"
#include "kernels/cpu/gemm.h"
using namespace pm;

namespace {

int64_t R = 1025, M = 512, H = 1024;  // main's arguments may change them
Activation kind = Activation::gelu;

// The parts, timed in rounds: each round calls every part once, so a change in the host's speed
// (10-30% within a minute here) falls on every part alike; the median round of each is printed.
struct Part {
  const char* name;
  double flops;
  std::function<void()> fn;
};

void time_parts(const std::vector<Part>& parts) {
  constexpr int kRounds = 15;
  std::vector<std::vector<double>> ms(parts.size());
  for (int round = 0; round < kRounds; ++round)
    for (size_t p = 0; p < parts.size(); ++p) {
      const auto start = std::chrono::steady_clock::now();
      parts[p].fn();
      ms[p].push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() * 1e3);
    }
  for (size_t p = 0; p < parts.size(); ++p) {
    std::sort(ms[p].begin(), ms[p].end());
    const double median = ms[p][kRounds / 2];
    std::printf("%-30s %7.3f ms %7.1f GFLOP/s\n", parts[p].name, median, parts[p].flops / median / 1e6);
  }
}

// Elem: the type of the rows the layer keeps for the backward (inputs, activations): uint16_t
// (bf16) or float.
template <typename Elem>
void run(Precision precision) {
  const bool bf16 = precision == Precision::bf16;
  const int64_t H1 = fc1_width(kind, H);  // W1's width: 2H for SwiGLU
  std::vector<float> u(R * M), w1(M * H1), w2(H * M), b1(H1), b2(M), saved(R * H1), y(R * M), dy(R * M), dh(R * H1),
      du(R * M), gw1(M * H1), gw2(H * M), gb1(H1), gb2(M), u32(R * M);
  std::vector<Elem> u_kept(R * M), act(R * H);
  for (size_t i = 0; i < u.size(); ++i) u[i] = ((i * 7) % 13) * 0.01f - 0.06f, dy[i] = ((i * 3) % 17) * 0.01f - 0.08f;
  for (size_t i = 0; i < w1.size(); ++i) w1[i] = ((i * 5) % 11) * 0.01f - 0.05f;
  for (size_t i = 0; i < w2.size(); ++i) w2[i] = ((i * 3) % 7) * 0.01f - 0.03f;
  if constexpr (sizeof(Elem) == 2)
    floats_to_bf16(u.data(), u_kept.data(), u.size());
  else
    std::memcpy(u_kept.data(), u.data(), u.size() * sizeof(float));
  ExpertWeights w;
  w.precision = precision;
  w.activation = kind;
  w.b1 = b1.data();
  w.b2 = b2.data();
  w.pack_forward(w1.data(), w2.data(), M, H);
  w.pack_backward(w1.data(), w2.data(), M, H);
  const RowList u_in(RowsIn(u_kept.data()), R, M);
  auto forward = [&] {
    expert_forward(w, R, M, H, u_in.pointers(), saved.data(), RowsOut(act.data()), y.data(), ForwardFor::backward);
  };
  forward();
  std::vector<const float*> saved_rows(R);
  std::vector<const Elem*> u_rows(R), act_rows(R);
  ExpertRows rows;
  for (int64_t i = 0; i < R; ++i) {
    saved_rows[i] = saved.data() + i * H1;
    u_rows[i] = u_kept.data() + i * M;
    act_rows[i] = act.data() + i * H;
    rows.dy.push_back(dy.data() + i * M);
    rows.dhpre.push_back(dh.data() + i * H1);
  }
  if constexpr (sizeof(Elem) == 2) {
    rows.u_bf16 = u_rows;
    rows.act_bf16 = act_rows;
  } else {
    rows.u = u_rows;
    rows.act = act_rows;
  }
  auto tn_rows = [&](int64_t m, int64_t n, const std::vector<const Elem*>& a, const std::vector<const float*>& b,
                     float* c) {
    if constexpr (sizeof(Elem) == 2)
      gemm_tn_rows_bf16(m, n, R, a.data(), b.data(), 1.0f, c, n);
    else
      gemm_tn_rows(m, n, R, a.data(), b.data(), 1.0f, c, n);
  };
  const double one = 2.0 * R * M * H, fc1 = 2.0 * R * M * H1;  // R x M x H multiply-adds; fc1: x H1
  std::printf("%s %s expert, %lld rows, M %lld, H %lld, one thread%s\n", bf16 ? "bf16" : "fp32",
              kind == Activation::swiglu ? "SwiGLU" : "GeLU", static_cast<long long>(R), static_cast<long long>(M),
              static_cast<long long>(H), bf16 ? (" (" + gemm_bf16_path() + ")").c_str() : "");
  time_parts({
  {"fwd gemm u.W1 plain", fc1, [&] {
    gemm_packed(Trans::no, R, u_kept.data(), M, w.w1, 0.0f, saved.data(), H1, {b1.data(), nullptr});
  }},
  {"fwd gemm a.W2 plain", one, [&] {
    gemm_packed(Trans::no, R, act.data(), H, w.w2, 0.0f, y.data(), M, {b2.data(), nullptr});
  }},
  {"expert_forward (training)", one + fc1, forward},
  {"dgrad gemm dy.W2^T plain", one, [&] { gemm_packed(Trans::no, R, dy.data(), M, w.w2_t, 0.0f, dh.data(), H); }},
  {"dgrad gemm dh.W1^T plain", fc1, [&] { gemm_packed(Trans::no, R, dh.data(), H1, w.w1_t, 0.0f, du.data(), M); }},
  {"expert_backward_input", one + fc1, [&] {
    expert_backward_input(w, R, M, H, dy.data(), saved_rows.data(), dh.data(), du.data());
  }},
  {"wgrad a^T.dy", one, [&] { tn_rows(H, M, act_rows, rows.dy, gw2.data()); }},
  {"wgrad u^T.dh", fc1, [&] { tn_rows(M, H1, u_rows, rows.dhpre, gw1.data()); }},
  {"expert_weight_grads", one + fc1, [&] {
    expert_weight_grads({gw1.data(), gb1.data(), gw2.data(), gb2.data()}, kind, precision, M, H, rows);
  }},
  });
}

}  // namespace

int main(int argc, char** argv) {
  const bool fp32 = argc > 1 && std::strcmp(argv[1], "fp32") == 0;
  bench::set_bf16_order_from_env();
  if ((argc > 1 && !fp32 && std::strcmp(argv[1], "bf16") != 0) || (argc != 1 && argc != 2 && argc != 5 && argc != 6)) {
    std::fprintf(stderr, "usage: %s [bf16|fp32] [ROWS M H [gelu|swiglu]]\n", argv[0]);
    return 2;
  }
  if (argc >= 5) {
    R = std::atoll(argv[2]), M = std::atoll(argv[3]), H = std::atoll(argv[4]);
    if (R < 1 || M < 2 || H < 2 || M % 2 || H % 2) {
      std::fprintf(stderr, "ROWS >= 1, M and H even and >= 2\n");
      return 2;
    }
  }
  if (argc == 6) {
    if (std::strcmp(argv[5], "swiglu") == 0) {
      kind = Activation::swiglu;
    } else if (std::strcmp(argv[5], "gelu") != 0) {
      std::fprintf(stderr, "the activation is gelu or swiglu\n");
      return 2;
    }
  }
  if (fp32)
    run<float>(Precision::fp32);
  else
    run<uint16_t>(Precision::bf16);
  return 0;
}
