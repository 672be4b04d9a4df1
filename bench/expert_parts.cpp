// The parts of one expert block's passes timed alone (1025 rows, M 512, H 1024, bf16 GeLU expert):
// each GEMM plain, then the whole forward / input-gradient / weight-gradient step around them, so
// the work beside the GEMMs shows (docs/BENCHMARKS.md, "bf16 on a CPU with AVX512_BF16"). Medians
// of 15 calls, one thread. Build against a built tree and run:
//
//   g++ -O3 -march=native -std=c++20 -ffp-contract=off -Isrc bench/expert_parts.cpp -o /tmp/expert_parts \
//       -Lbuild/src -lpipemoe_kernels -lpipemoe_core -lfmt -lpthread -lopenblas && /tmp/expert_parts
#include <chrono>
#include <cstdio>
#include <vector>
#include <algorithm>
#include "kernels/cpu/expert_ffn.h"
#include "kernels/cpu/gemm.h"
#include "kernels/cpu/elementwise.h"
#include "core/tensor.h"
using namespace pm;
int main() {
  const int64_t R = 1025, M = 512, H = 1024;
  std::vector<float> u(R*M), w1(M*H), w2(H*M), b1(H), b2(M), saved(R*H), y(R*M), dy(R*M), dh(R*H), du(R*M);
  std::vector<float> gw1(M*H), gw2(H*M), gb1(H), gb2(M);
  std::vector<uint16_t> u16(R*M), act16(R*H);
  for (size_t i=0;i<u.size();++i) u[i]=((i*7)%13)*0.01f-0.06f, dy[i]=((i*3)%17)*0.01f-0.08f;
  for (size_t i=0;i<w1.size();++i) w1[i]=((i*5)%11)*0.01f-0.05f, w2[i]=((i*3)%7)*0.01f-0.03f;
  floats_to_bf16(u.data(), u16.data(), u.size());
  ExpertWeights w; w.precision = Precision::bf16; w.activation = Activation::gelu; w.b1=b1.data(); w.b2=b2.data();
  w.pack_forward(w1.data(), w2.data(), M, H);
  w.pack_backward(w1.data(), w2.data(), M, H);
  expert_forward(w, R, M, H, RowsIn(u16.data()), saved.data(), RowsOut(act16.data()), y.data(), ForwardFor::backward);
  std::vector<const float*> saved_rows(R); for (int64_t i=0;i<R;++i) saved_rows[i]=saved.data()+i*H;
  ExpertRows rows; 
  for (int64_t i=0;i<R;++i){ rows.u_bf16.push_back(u16.data()+i*M); rows.act_bf16.push_back(act16.data()+i*H); rows.dy.push_back(dy.data()+i*M); rows.dhpre.push_back(dh.data()+i*H);} 
  auto t = [&](const char* name, auto fn) {
    std::vector<double> s;
    for (int i=0;i<15;++i){ auto a=std::chrono::steady_clock::now(); fn(); s.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now()-a).count()*1e3);} 
    std::sort(s.begin(),s.end()); printf("%-30s %7.3f ms\n", name, s[7]);
  };
  t("fwd gemm u.W1 plain", [&]{ gemm_packed(Trans::no, R, u16.data(), M, w.w1, 0.0f, saved.data(), H, {b1.data(), nullptr}); });
  t("fwd gemm a.W2 plain", [&]{ gemm_packed(Trans::no, R, act16.data(), H, w.w2, 0.0f, y.data(), M, {b2.data(), nullptr}); });
  t("expert_forward (training)", [&]{ expert_forward(w, R, M, H, RowsIn(u16.data()), saved.data(), RowsOut(act16.data()), y.data(), ForwardFor::backward); });
  t("dgrad gemm dy.W2^T plain", [&]{ gemm_packed(Trans::no, R, dy.data(), M, w.w2_t, 0.0f, dh.data(), H); });
  t("dgrad gemm dh.W1^T plain", [&]{ gemm_packed(Trans::no, R, dh.data(), H, w.w1_t, 0.0f, du.data(), M); });
  t("expert_backward_input", [&]{ expert_backward_input(w, R, M, H, dy.data(), saved_rows.data(), dh.data(), du.data()); });
  t("wgrad a^T.dy", [&]{ gemm_tn_rows_bf16(H, M, R, rows.act_bf16.data(), rows.dy.data(), 1.0f, gw2.data(), M); });
  t("wgrad u^T.dh", [&]{ gemm_tn_rows_bf16(M, H, R, rows.u_bf16.data(), rows.dhpre.data(), 1.0f, gw1.data(), H); });
  t("expert_weight_grads", [&]{ expert_weight_grads({gw1.data(), gb1.data(), gw2.data(), gb2.data()}, Activation::gelu, Precision::bf16, M, H, rows); });
}
