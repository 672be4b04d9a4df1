// bench/attention_ab.sh's side: attention's core (kernels/cpu/attention.h) of one tree, compiled in
// its own namespace (-Dpm=pm_ab_a or pm_ab_b) and reached through ATT_AB_RUN (run_a or run_b).
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "kernels/cpu/attention.h"

namespace {

struct Shape {
  int64_t B = 12, S = 128, heads = 4, kv_heads = 4, hd = 48;  // one rank's micro-batch of the bundled models
};

Shape shape() {
  Shape s;
  if (const char* e = std::getenv("ATT_AB_SHAPE"))  // B,S,heads,kv_heads,hd
    std::sscanf(e, "%ld,%ld,%ld,%ld,%ld", &s.B, &s.S, &s.heads, &s.kv_heads, &s.hd);
  return s;
}

struct Buffers {
  Shape s = shape();
  int64_t D = s.heads * s.hd, ld = D + 2 * s.kv_heads * s.hd, T = s.B * s.S;
  std::vector<float> qkv, dout, probs, out, dqkv;
  Buffers() : qkv(T * ld), dout(T * D), probs(s.B * s.heads * s.S * s.S), out(T * D), dqkv(T * ld) {
    uint32_t x = 12345;  // the same values on both sides
    auto next = [&] { return (x = x * 1664525u + 1013904223u, static_cast<float>(x >> 8) / 16777216.0f - 0.5f); };
    for (float& v : qkv) v = 2 * next();
    for (float& v : dout) v = next();
  }
};

uint64_t fnv(const std::vector<float>& v, uint64_t h) {
  for (float f : v) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    h = (h ^ u) * 1099511628211ull;
  }
  return h;
}

}  // namespace

// pass 0: the forward (scores, softmax, P V); 1: the backward (reads the forward's probabilities).
// Returns its seconds; *hash: the bits it wrote.
extern "C" double ATT_AB_RUN(int pass, uint64_t* hash) {
  static Buffers b;
  const Shape& s = b.s;
  const auto t0 = std::chrono::steady_clock::now();
  if (pass == 0)
    pm::attention_forward(b.qkv.data(), s.B, s.S, s.heads, s.kv_heads, s.hd, b.probs.data(), b.out.data());
  else
    pm::attention_backward(b.qkv.data(), b.probs.data(), b.dout.data(), s.B, s.S, s.heads, s.kv_heads, s.hd,
                           b.dqkv.data());
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  *hash = pass == 0 ? fnv(b.out, fnv(b.probs, 1469598103934665603ull)) : fnv(b.dqkv, 1469598103934665603ull);
  return seconds;
}
