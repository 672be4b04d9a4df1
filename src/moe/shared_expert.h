// A shared expert (DeepSeek-MoE, Qwen2-MoE, DeepSeek-V3): a dense FFN that every token goes through
// beside the routed experts, of the same form as one of them (GeLU or SwiGLU, fp32 or bf16 GEMMs).
// It needs no communication, so a layer schedules it on the compute lane while the dispatch
// all-to-all is in flight (the `between` seam of MoeLayer::append_forward); its weights are
// replicated, like the router's.
//
//   SharedExpert se(backend, M, G, Activation::swiglu, Precision::bf16);
//   se.init(seed);
//   se.forward(x, T, out);        // out[T, M] = FFN(x); keeps what the backward needs
//   se.backward(x, dy, T, dx);    // grads += ...; dx[T, M] = d FFN / d x (overwritten)
#pragma once

#include <memory>
#include <vector>

#include "core/parameter.h"
#include "core/tensor.h"
#include "kernels/backend.h"
#include "moe/row_buffer.h"

namespace pm {

class SharedExpert {
 public:
  // hidden: G (SwiGLU: of each half; W1 is [M, 2G]); a usage error unless positive.
  SharedExpert(Backend& backend, int64_t model_dim, int64_t hidden, Activation activation, Precision precision);

  // "shared.w1" [M, G1], "shared.b1" [G1], "shared.w2" [G, M], "shared.b2" [M].
  std::vector<Parameter> parameters();
  // From (seed, stream 8..11): the same on every rank.
  void init(uint64_t seed);

  // out[T, M] = FFN(x[T, M]); x must stay unchanged until the backward.
  void forward(const float* x, int64_t tokens, float* out);
  // From dy[T, M] of the last forward: the weight gradients added to, dx[T, M] overwritten.
  void backward(const float* x, const float* dy, int64_t tokens, float* dx);

  // The forward keeps nothing but the caller's input; the backward makes the pre-activation and
  // activation again from it (the same bits; MoeShape::recompute_experts).
  void set_recompute(bool recompute) { recompute_ = recompute; }

  void zero_grads();
  Backend& backend() { return backend_; }
  int64_t hidden() const { return hidden_; }
  Activation activation() const { return activation_; }

 private:
  Backend& backend_;
  int64_t model_dim_, hidden_;
  Activation activation_;
  Precision precision_;
  Tensor w1_, b1_, w2_, b2_, dw1_, db1_, dw2_, db2_;
  std::unique_ptr<PackedExpert> packed_;
  VersionStamp packed_forward_, packed_backward_;  // the weights packed_ holds each direction of
  Buffer<float> fc1_saved_, dhpre_;  // [T, G1], [T, G1]
  RowBuffer act_;               // [T, G] (bf16 in a bf16 expert: row_buffer.h)
  void pack_forward();   // W1, W2 packed for expert_forward when they changed
  void release_saved();  // gives fc1_saved_ and act_ back
  int64_t saved_tokens_ = -1;   // tokens of the last forward (act_ holds its activations unless recomputing)
  bool recompute_ = false;
};

}  // namespace pm
