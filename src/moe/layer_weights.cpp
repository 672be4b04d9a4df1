#include "moe/layer_weights.h"

#include <cmath>

#include "core/rng.h"

namespace pm {

LayerWeights::LayerWeights(const MoeShape& shape) {
  const int64_t M = shape.model_dim, H = shape.hidden, H1 = shape.fc1_width(), El = shape.local_experts();
  wg = Tensor::zeros({M, shape.experts});
  w1 = Tensor::zeros({El, M, H1});
  b1 = Tensor::zeros({El, H1});
  w2 = Tensor::zeros({El, H, M});
  b2 = Tensor::zeros({El, M});
  dwg = Tensor::zeros(wg.shape());
  dw1 = Tensor::zeros(w1.shape());
  db1 = Tensor::zeros(b1.shape());
  dw2 = Tensor::zeros(w2.shape());
  db2 = Tensor::zeros(b2.shape());
  has_router_bias = shape.balance_bias;
  if (shape.balance_bias) {
    router_bias = Tensor::zeros({shape.experts});
    drouter_bias = Tensor::zeros({shape.experts});  // stays 0: the bias moves by update_balance_bias only
  }
}

std::vector<Parameter> LayerWeights::parameters(bool with_experts) {
  std::vector<Parameter> params{{"wg", &wg, &dwg, false, true}};
  if (has_router_bias) params.push_back({"router_bias", &router_bias, &drouter_bias, false, false});
  if (!with_experts) return params;
  for (Parameter p : std::initializer_list<Parameter>{{"w1", &w1, &dw1, true, true},
                                                      {"b1", &b1, &db1, true, false},
                                                      {"w2", &w2, &dw2, true, true},
                                                      {"b2", &b2, &db2, true, false}})
    params.push_back(p);
  return params;
}

void LayerWeights::init(uint64_t seed, const MoeShape& shape, int first_expert, bool with_experts) {
  const int64_t M = shape.model_dim, H = shape.hidden, H1 = shape.fc1_width();
  Rng(seed, stream_id(2)).fill_normal(wg.f32(), wg.numel(), 0.0f, 1.0f / std::sqrt(static_cast<float>(M)));
  for (int le = 0; le < shape.local_experts() && with_experts; ++le) {
    uint64_t e = static_cast<uint64_t>(first_expert + le);
    Rng(seed, stream_id(3, e)).fill_normal(w1.f32() + le * M * H1, M * H1, 0.0f, 1.0f / std::sqrt(static_cast<float>(M)));
    Rng(seed, stream_id(4, e)).fill_normal(b1.f32() + le * H1, H1, 0.0f, 0.1f);
    Rng(seed, stream_id(5, e)).fill_normal(w2.f32() + le * H * M, H * M, 0.0f, 1.0f / std::sqrt(static_cast<float>(H)));
    Rng(seed, stream_id(6, e)).fill_normal(b2.f32() + le * M, M, 0.0f, 0.1f);
  }
}

void LayerWeights::drop_experts() {
  for (Tensor* t : {&w1, &b1, &w2, &b2, &dw1, &db1, &dw2, &db2}) *t = Tensor();
}

void LayerWeights::pack_forward(Backend& backend, const MoeShape& shape, PackedExperts& packed) const {
  // (the biases too: the packing keeps pointers to them)
  if (!packed.forward.changed({&w1, &w2, &b1, &b2})) return;
  ++packed.packings;
  const int64_t M = shape.model_dim, H = shape.hidden, H1 = shape.fc1_width();
  for (int le = 0; le < shape.local_experts(); ++le)
    backend.pack_expert_forward(packed[le], w1.f32() + le * M * H1, w2.f32() + le * H * M, b1.f32() + le * H1,
                                b2.f32() + le * M, M, H);
}

void LayerWeights::pack_backward(Backend& backend, const MoeShape& shape, PackedExperts& packed) const {
  if (!packed.backward.changed({&w1, &w2})) return;
  ++packed.packings;
  const int64_t M = shape.model_dim, H = shape.hidden, H1 = shape.fc1_width();
  for (int le = 0; le < shape.local_experts(); ++le)
    backend.pack_expert_backward(packed[le], w1.f32() + le * M * H1, w2.f32() + le * H * M, M, H);
}

void LayerWeights::release_expert_masters() {
  for (Tensor* t : {&w1, &w2, &dw1, &dw2}) *t = Tensor();
}

ExpertGrads LayerWeights::grads_of(const MoeShape& shape, int le) {
  const int64_t M = shape.model_dim, H = shape.hidden, H1 = shape.fc1_width();
  return ExpertGrads{dw1.f32() + le * M * H1, db1.f32() + le * H1, dw2.f32() + le * H * M, db2.f32() + le * M};
}

}  // namespace pm
