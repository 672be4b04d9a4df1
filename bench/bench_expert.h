// One bf16 expert of the standalone expert benchmarks (experts_in_turn.cpp, bf16_saved_tensors.cpp):
// its weights packed for the forward and the backward, deterministic inputs and output gradients,
// buffers for everything its steps write, each buffer's rows as pointers (what the weight
// gradients read, as the layer hands them over), and the library's three steps on them.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "core/tensor.h"
#include "kernels/cpu/expert_ffn.h"

namespace pm::bench {

// BF16_ORDER=amx: the bf16 GEMMs in AMX's order (gemm.h); amx-model: in that order on its fp32
// model even where the CPU has AMX (what a CPU without it runs). Unset or anything else: the dot
// order.
inline void set_bf16_order_from_env() {
  if (const char* order = std::getenv("BF16_ORDER"); order && std::strncmp(order, "amx", 3) == 0) {
    set_bf16_order(Bf16Order::amx);
    use_amx_model_for_testing(std::strcmp(order, "amx-model") == 0);
  }
}

struct BenchExpert {
  int64_t R, M, H;
  Activation kind;
  std::vector<float> w1, w2, b1, b2, saved, y, dh, du, gw1, gw2, gb1, gb2;
  std::vector<uint16_t> u, act, dy;
  ExpertWeights w;
  std::vector<const float*> saved_rows, dh_rows;
  std::vector<const uint16_t*> u_rows, act_rows, dy_rows;

  // Expert number e (its values differ from the others') of R rows, M wide, hidden H.
  BenchExpert(int e, int64_t rows, int64_t model_dim, int64_t hidden, Activation activation)
      : R(rows), M(model_dim), H(hidden), kind(activation) {
    const int64_t H1 = fc1_width(kind, H);
    w1.resize(M * H1), w2.resize(H * M), b1.resize(H1), b2.resize(M);
    saved.resize(R * H1), y.resize(R * M), dh.resize(R * H1), du.resize(R * M);
    gw1.resize(M * H1), gw2.resize(H * M), gb1.resize(H1), gb2.resize(M);
    u.resize(R * M), act.resize(R * H), dy.resize(R * M);
    for (size_t i = 0; i < w1.size(); ++i) w1[i] = ((i * 5 + e) % 11) * 0.01f - 0.05f;
    for (size_t i = 0; i < w2.size(); ++i) w2[i] = ((i * 3 + e) % 7) * 0.01f - 0.03f;
    for (size_t i = 0; i < u.size(); ++i)
      u[i] = float_to_bf16(((i * 7) % 13) * 0.01f - 0.06f), dy[i] = float_to_bf16(((i * 3) % 17) * 0.01f - 0.08f);
    w.precision = Precision::bf16;
    w.activation = kind;
    w.b1 = b1.data();
    w.b2 = b2.data();
    w.pack_forward(w1.data(), w2.data(), M, H);
    w.pack_backward(w1.data(), w2.data(), M, H);
    for (int64_t i = 0; i < R; ++i) {
      saved_rows.push_back(saved.data() + i * H1), dh_rows.push_back(dh.data() + i * H1);
      u_rows.push_back(u.data() + i * M), act_rows.push_back(act.data() + i * H);
      dy_rows.push_back(dy.data() + i * M);
    }
  }

  void forward() {
    expert_forward(w, R, M, H, RowPointers(u_rows.data()), saved.data(), RowsOut(act.data()), y.data(),
                   ForwardFor::backward);
  }
  void input_gradient() {
    expert_backward_input(w, R, M, H, RowsIn(dy.data()), saved_rows.data(), dh.data(), du.data());
  }
  void weight_gradients() {
    ExpertRows rows;
    rows.u_bf16 = u_rows, rows.act_bf16 = act_rows, rows.dy_bf16 = dy_rows, rows.dhpre = dh_rows;
    expert_weight_grads({gw1.data(), gb1.data(), gw2.data(), gb2.data()}, kind, Precision::bf16, M, H, rows);
  }
};

}  // namespace pm::bench
