// The router's forward (gate_forward) for 2048 tokens, M 512, top-8 of 64 and 256 experts, softmax
// and sigmoid scores: as training runs it (the router's losses computed) and as inference does
// (RouterLosses::skip: no z-loss log-sum-exp, no aux means). Best of 12 interleaved calls, one
// thread (docs/BENCHMARKS.md, "Inference skips the router's losses"). Build against a built tree:
//
//   g++ -O3 -march=native -std=c++20 -ffp-contract=off -Isrc bench/router_losses.cpp -o /tmp/router_losses
//       -Lbuild/src -lpipemoe_moe -lpipemoe_kernels -lpipemoe_core -lfmt -lpthread -lopenblas   (one line)
//   (or build/bench/router_losses, built with the tree)
//   /tmp/router_losses
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <vector>
#include "core/rng.h"
#include "kernels/backend.h"
#include "moe/gate.h"
using namespace pm;
int main() {
  for (int E : {64, 256}) for (RouterScore sc : {RouterScore::softmax, RouterScore::sigmoid}) {
    MoeShape shape;
    shape.tokens = 2048, shape.model_dim = 512, shape.hidden = 64, shape.experts = E, shape.top_k = 8, shape.capacity_factor = 0;
    shape.router_score = sc;
    Rng rng(1, 0);
    std::vector<float> x(shape.tokens * 512), wg(512 * E);
    rng.fill_uniform(x.data(), static_cast<int64_t>(x.size()), -1.0f, 1.0f);
    rng.fill_uniform(wg.data(), static_cast<int64_t>(wg.size()), -0.1f, 0.1f);
    double best[2] = {1e9, 1e9};
    for (int r = 0; r < 12; ++r)
      for (int m = 0; m < 2; ++m) {
        auto s = std::chrono::steady_clock::now();
        Gating g = gate_forward(cpu_backend(), x.data(), wg.data(), shape.tokens, shape, nullptr, m ? RouterLosses::skip : RouterLosses::compute);
        best[m] = std::min(best[m], std::chrono::duration<double>(std::chrono::steady_clock::now() - s).count() * 1e3);
      }
    std::printf("E %3d %s: training %.3f ms, inference %.3f ms (best of 12)\n", E, sc == RouterScore::softmax ? "softmax" : "sigmoid", best[0], best[1]);
  }
}
