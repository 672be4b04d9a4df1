#include "moe/shared_expert.h"

#include <cmath>
#include <utility>

#include "core/error.h"
#include "core/rng.h"

namespace pm {

SharedExpert::SharedExpert(Backend& backend, int64_t model_dim, int64_t hidden, Activation activation,
                           Precision precision)
    : backend_(backend),
      model_dim_(model_dim),
      hidden_(hidden),
      activation_(activation),
      precision_(precision),
      fc1_saved_(BackendAllocator<float>(backend)),
      dhpre_(BackendAllocator<float>(backend)),
      act_(backend) {
  PM_REQUIRE(hidden > 0, "the shared expert's hidden size must be positive, got {}", hidden);
  PM_REQUIRE(model_dim > 0, "model dim must be positive, got {}", model_dim);
  const int64_t M = model_dim, G = hidden, G1 = fc1_width(activation, hidden);
  for (auto [t, shape] : {std::pair{&w1_, Shape{M, G1}}, {&b1_, Shape{G1}}, {&w2_, Shape{G, M}}, {&b2_, Shape{M}}}) {
    *t = Tensor::zeros(shape);
  }
  dw1_ = Tensor::zeros(w1_.shape());
  db1_ = Tensor::zeros(b1_.shape());
  dw2_ = Tensor::zeros(w2_.shape());
  db2_ = Tensor::zeros(b2_.shape());
  packed_ = backend.new_packed_expert(activation, precision);
}

std::vector<Parameter> SharedExpert::parameters() {
  return {{"shared.w1", &w1_, &dw1_, false, true},
          {"shared.b1", &b1_, &db1_, false, false},
          {"shared.w2", &w2_, &dw2_, false, true},
          {"shared.b2", &b2_, &db2_, false, false}};
}

void SharedExpert::init(uint64_t seed) {
  const float M = static_cast<float>(model_dim_), G = static_cast<float>(hidden_);
  Rng(seed, stream_id(8)).fill_normal(w1_.f32(), w1_.numel(), 0.0f, 1.0f / std::sqrt(M));
  Rng(seed, stream_id(9)).fill_normal(b1_.f32(), b1_.numel(), 0.0f, 0.1f);
  Rng(seed, stream_id(10)).fill_normal(w2_.f32(), w2_.numel(), 0.0f, 1.0f / std::sqrt(G));
  Rng(seed, stream_id(11)).fill_normal(b2_.f32(), b2_.numel(), 0.0f, 0.1f);
}

void SharedExpert::zero_grads() {
  for (Tensor* g : {&dw1_, &db1_, &dw2_, &db2_}) g->zero();
}

void SharedExpert::pack_forward() {
  if (packed_forward_.changed({&w1_, &w2_, &b1_, &b2_}))  // once per change of the weights
    backend_.pack_expert_forward(*packed_, std::as_const(w1_).f32(), std::as_const(w2_).f32(),
                                 std::as_const(b1_).f32(), std::as_const(b2_).f32(), model_dim_, hidden_);
}

void SharedExpert::forward(const float* x, int64_t tokens, float* out) {
  const int64_t M = model_dim_, G = hidden_, G1 = fc1_width(activation_, hidden_);
  fc1_saved_.resize(tokens * G1);
  act_.resize(tokens, G, precision_);
  saved_tokens_ = tokens;
  pack_forward();
  backend_.expert_forward(*packed_, tokens, M, G, RowList(x, tokens, M).pointers(), fc1_saved_.data(), act_.out(0), out,
                          recompute_ ? ForwardFor::inference : ForwardFor::backward);
  if (recompute_) release_saved();  // the backward makes them again from x
}

void SharedExpert::release_saved() {
  Buffer<float>(fc1_saved_.get_allocator()).swap(fc1_saved_);
  act_.release();
}

void SharedExpert::backward(const float* x, const float* dy, int64_t tokens, float* dx) {
  const int64_t M = model_dim_, G = hidden_, G1 = fc1_width(activation_, hidden_);
  PM_CHECK(saved_tokens_ == tokens, "a shared-expert backward without its forward");
  dhpre_.resize(tokens * G1);
  if (recompute_) {  // the forward kept only x: its pre-activation and activation again
    fc1_saved_.resize(tokens * G1);
    act_.resize(tokens, G, precision_);
    pack_forward();
    backend_.expert_forward(*packed_, tokens, M, G, RowList(x, tokens, M).pointers(), fc1_saved_.data(),
                            act_.out(0), nullptr, ForwardFor::backward);
  }
  if (packed_backward_.changed({&w1_, &w2_}))
    backend_.pack_expert_backward(*packed_, std::as_const(w1_).f32(), std::as_const(w2_).f32(), M, G);
  std::vector<const float*> saved_rows(tokens);
  std::vector<int64_t> positions(tokens);
  ExpertRows rows;
  for (int64_t t = 0; t < tokens; ++t) {
    saved_rows[t] = fc1_saved_.data() + t * G1;
    positions[t] = t;
    rows.u.push_back(x + t * M);  // the caller's input (rounded by the bf16 GEMMs as they read it)
    rows.dhpre.push_back(dhpre_.data() + t * G1);
    rows.dy.push_back(dy + t * M);
  }
  act_.add_rows(positions, rows.act, rows.act_bf16);
  backend_.expert_backward_input(*packed_, tokens, M, G, dy, saved_rows.data(), dhpre_.data(), dx);
  backend_.expert_weight_grads({dw1_.f32(), db1_.f32(), dw2_.f32(), db2_.f32()}, activation_, precision_, M, G, rows);
  if (recompute_) release_saved();
}

}  // namespace pm
