#include "model/gpt.h"

#include <cmath>
#include <cstring>
#include <optional>

#include "core/rng.h"
#include "kernels/cpu/attention.h"
#include "kernels/cpu/cross_entropy.h"
#include "kernels/cpu/elementwise.h"
#include "kernels/cpu/gemm.h"
#include "kernels/cpu/layernorm.h"

namespace pm {
namespace {

constexpr float kLayerNormEps = 1e-5f;

// y[T, N] = x[T, K] w[K, N] + b[N]
void linear_forward(const float* x, const Tensor& w, const Tensor& b, int64_t T, float* y) {
  const int64_t K = w.dim(0), N = w.dim(1);
  fill_rows(y, T, N, b.f32());
  gemm(Trans::no, Trans::no, T, N, K, x, K, w.f32(), N, 1.0f, y, N);
}

// From dy[T, N]: dw += x^T dy, db += colsum(dy), dx = dy w^T (dx may be null).
void linear_backward(const float* x, const Tensor& w, const float* dy, int64_t T, Tensor& dw, Tensor& db, float* dx) {
  const int64_t K = w.dim(0), N = w.dim(1);
  gemm(Trans::yes, Trans::no, K, N, T, x, K, dy, N, 1.0f, dw.f32(), N);
  add_column_sums(dy, T, N, db.f32());
  if (dx) gemm(Trans::no, Trans::yes, T, K, N, dy, N, w.f32(), N, 0.0f, dx, K);
}

}  // namespace

struct GptModel::Block {
  // parameters and gradients; shapes in comments (D model, F dense hidden)
  Tensor ln1_g, ln1_b, ln2_g, ln2_b;  // [D]
  Tensor w_qkv, b_qkv;                // [D, 3D], [3D]
  Tensor w_proj, b_proj;              // [D, D], [D]
  Tensor w_fc, b_fc, w_out, b_out;    // dense: [D, F], [F], [F, D], [D]
  Tensor d_ln1_g, d_ln1_b, d_ln2_g, d_ln2_b, d_w_qkv, d_b_qkv, d_w_proj, d_b_proj, d_w_fc, d_b_fc, d_w_out, d_b_out;
  std::unique_ptr<MoeLayer> moe;      // MoE blocks only
  // activations of the last forward
  FloatBuffer x_in, ln1_out, ln1_mean, ln1_rstd, qkv, probs, attn, x_mid, ln2_out, ln2_mean, ln2_rstd, fc, act;
};

GptModel::GptModel(const ModelConfig& c, Communicator& comm, Executor& executor)
    : config_(c), comm_(comm), executor_(executor) {
  const int64_t V = c.vocab_size, S = c.seq_len, D = c.d_model, F = c.mlp_hidden;
  PM_CHECK(V > 0, "the model needs a vocabulary size");
  auto make = [](Tensor& value, Tensor& grad, Shape shape) {
    value = Tensor::zeros(shape);
    grad = Tensor::zeros(shape);
  };
  make(wte_, dwte_, {V, D});
  make(wpe_, dwpe_, {S, D});
  add_param("wte", wte_, dwte_, false, false);
  add_param("wpe", wpe_, dwpe_, false, false);
  for (int l = 0; l < c.layers; ++l) {
    auto b = std::make_unique<Block>();
    std::string p = "blocks." + std::to_string(l) + ".";
    make(b->ln1_g, b->d_ln1_g, {D});
    make(b->ln1_b, b->d_ln1_b, {D});
    make(b->w_qkv, b->d_w_qkv, {D, 3 * D});
    make(b->b_qkv, b->d_b_qkv, {3 * D});
    make(b->w_proj, b->d_w_proj, {D, D});
    make(b->b_proj, b->d_b_proj, {D});
    make(b->ln2_g, b->d_ln2_g, {D});
    make(b->ln2_b, b->d_ln2_b, {D});
    add_param(p + "ln1.g", b->ln1_g, b->d_ln1_g, false, false);
    add_param(p + "ln1.b", b->ln1_b, b->d_ln1_b, false, false);
    add_param(p + "attn.w_qkv", b->w_qkv, b->d_w_qkv, false, true);
    add_param(p + "attn.b_qkv", b->b_qkv, b->d_b_qkv, false, false);
    add_param(p + "attn.w_proj", b->w_proj, b->d_w_proj, false, true);
    add_param(p + "attn.b_proj", b->b_proj, b->d_b_proj, false, false);
    add_param(p + "ln2.g", b->ln2_g, b->d_ln2_g, false, false);
    add_param(p + "ln2.b", b->ln2_b, b->d_ln2_b, false, false);
    if (c.is_moe(l)) {
      b->moe = std::make_unique<MoeLayer>(
          MoeLayerConfig{D, c.expert_hidden, c.experts, c.top_k, c.capacity_factor}, comm, executor);
      MoeLayer& m = *b->moe;
      add_param(p + "moe.wg", m.wg, m.dwg, false, true);
      add_param(p + "moe.w1", m.w1, m.dw1, true, true);
      add_param(p + "moe.b1", m.b1, m.db1, true, false);
      add_param(p + "moe.w2", m.w2, m.dw2, true, true);
      add_param(p + "moe.b2", m.b2, m.db2, true, false);
    } else {
      make(b->w_fc, b->d_w_fc, {D, F});
      make(b->b_fc, b->d_b_fc, {F});
      make(b->w_out, b->d_w_out, {F, D});
      make(b->b_out, b->d_b_out, {D});
      add_param(p + "mlp.w_fc", b->w_fc, b->d_w_fc, false, true);
      add_param(p + "mlp.b_fc", b->b_fc, b->d_b_fc, false, false);
      add_param(p + "mlp.w_out", b->w_out, b->d_w_out, false, true);
      add_param(p + "mlp.b_out", b->b_out, b->d_b_out, false, false);
    }
    blocks_.push_back(std::move(b));
  }
  make(lnf_g_, dlnf_g_, {D});
  make(lnf_b_, dlnf_b_, {D});
  add_param("ln_f.g", lnf_g_, dlnf_g_, false, false);
  add_param("ln_f.b", lnf_b_, dlnf_b_, false, false);
}

GptModel::~GptModel() = default;

void GptModel::add_param(const std::string& name, Tensor& value, Tensor& grad, bool expert, bool decay) {
  params_.push_back({name, &value, &grad, expert, decay});
}

std::vector<MoeLayer*> GptModel::moe_layers() {
  std::vector<MoeLayer*> out;
  for (auto& b : blocks_)
    if (b->moe) out.push_back(b->moe.get());
  return out;
}

void GptModel::init_parameters(uint64_t seed) {
  const float std_w = 0.02f, std_residual = 0.02f / std::sqrt(2.0f * config_.layers);
  auto normal = [&](Tensor& t, float std, uint64_t kind, uint64_t a = 0, uint64_t b = 0) {
    Rng(seed, stream_id(kind, a, b)).fill_normal(t.f32(), t.numel(), 0.0f, std);
  };
  normal(wte_, std_w, 20);
  normal(wpe_, std_w, 21);
  lnf_g_.fill(1.0f);
  lnf_b_.zero();
  for (int l = 0; l < config_.layers; ++l) {
    Block& b = *blocks_[l];
    b.ln1_g.fill(1.0f), b.ln2_g.fill(1.0f);
    b.ln1_b.zero(), b.ln2_b.zero(), b.b_qkv.zero(), b.b_proj.zero();
    normal(b.w_qkv, std_w, 22, l);
    normal(b.w_proj, std_residual, 23, l);
    if (b.moe) {
      MoeLayer& m = *b.moe;
      normal(m.wg, std_w, 24, l);
      const int64_t M = config_.d_model, H = config_.expert_hidden;
      for (int le = 0; le < m.local_experts(); ++le) {
        uint64_t e = static_cast<uint64_t>(m.first_expert() + le);
        Rng(seed, stream_id(25, l, e)).fill_normal(m.w1.f32() + le * M * H, M * H, 0.0f, std_w);
        Rng(seed, stream_id(26, l, e)).fill_normal(m.w2.f32() + le * H * M, H * M, 0.0f, std_residual);
      }
      m.b1.zero(), m.b2.zero();
    } else {
      normal(b.w_fc, std_w, 27, l);
      normal(b.w_out, std_residual, 28, l);
      b.b_fc.zero(), b.b_out.zero();
    }
  }
}

void GptModel::set_trace(Trace* trace) {
  trace_ = trace;
  for (auto& b : blocks_)
    if (b->moe) b->moe->set_trace(trace);
}

void GptModel::zero_grads() {
  for (Parameter& p : params_) p.grad->zero();
}

double GptModel::forward(const int32_t* inputs, const int32_t* targets, int64_t B, float backward_scale) {
  const int64_t S = config_.seq_len, D = config_.d_model, V = config_.vocab_size, F = config_.mlp_hidden;
  const int64_t H = config_.heads, hd = D / H, T = B * S;
  B_ = B, T_ = T;
  backward_scale_ = backward_scale;
  inputs_.assign(inputs, inputs + T);
  if (targets) targets_.assign(targets, targets + T);

  if (trace_) trace_->set_category("forward");
  FloatBuffer h(T * D);
  std::optional<TraceSpan> span(std::in_place, trace_, "embed");
  for (int64_t t = 0; t < T; ++t) {
    PM_CHECK(inputs[t] >= 0 && inputs[t] < V, "token {} outside the vocabulary of {}", inputs[t], V);
    const float* e = wte_.f32() + inputs[t] * D;
    const float* p = wpe_.f32() + (t % S) * D;
    for (int64_t i = 0; i < D; ++i) h[t * D + i] = e[i] + p[i];
  }
  span.reset();
  for (auto& bp : blocks_) {
    Block& b = *bp;
    span.emplace(trace_, "attention");
    b.x_in = h;
    b.ln1_out.resize(T * D), b.ln1_mean.resize(T), b.ln1_rstd.resize(T);
    layernorm_forward(h.data(), b.ln1_g.f32(), b.ln1_b.f32(), T, D, kLayerNormEps, b.ln1_out.data(), b.ln1_mean.data(),
                      b.ln1_rstd.data());
    b.qkv.resize(T * 3 * D);
    linear_forward(b.ln1_out.data(), b.w_qkv, b.b_qkv, T, b.qkv.data());
    b.probs.resize(B * H * S * S), b.attn.resize(T * D);
    attention_forward(b.qkv.data(), B, S, H, hd, b.probs.data(), b.attn.data());
    b.x_mid.resize(T * D);
    linear_forward(b.attn.data(), b.w_proj, b.b_proj, T, b.x_mid.data());
    for (int64_t i = 0; i < T * D; ++i) b.x_mid[i] += h[i];
    b.ln2_out.resize(T * D), b.ln2_mean.resize(T), b.ln2_rstd.resize(T);
    layernorm_forward(b.x_mid.data(), b.ln2_g.f32(), b.ln2_b.f32(), T, D, kLayerNormEps, b.ln2_out.data(),
                      b.ln2_mean.data(), b.ln2_rstd.data());
    span.reset();
    if (b.moe) {
      b.moe->forward(b.ln2_out.data(), T, h.data());
      if (trace_) trace_->set_category("forward");
    } else {
      TraceSpan mlp(trace_, "mlp");
      b.fc.resize(T * F), b.act.resize(T * F);
      linear_forward(b.ln2_out.data(), b.w_fc, b.b_fc, T, b.fc.data());
      gelu_forward(b.fc.data(), b.act.data(), T * F);
      linear_forward(b.act.data(), b.w_out, b.b_out, T, h.data());
    }
    for (int64_t i = 0; i < T * D; ++i) h[i] += b.x_mid[i];
  }
  span.emplace(trace_, "head");
  h_final_ = h;
  lnf_out_.resize(T * D), lnf_mean_.resize(T), lnf_rstd_.resize(T);
  layernorm_forward(h.data(), lnf_g_.f32(), lnf_b_.f32(), T, D, kLayerNormEps, lnf_out_.data(), lnf_mean_.data(),
                    lnf_rstd_.data());
  logits_.resize(T * V);
  gemm(Trans::no, Trans::yes, T, V, D, lnf_out_.data(), D, wte_.f32(), D, 0.0f, logits_.data(), V);
  if (!targets) return 0.0;
  std::vector<float> losses(T);
  if (backward_scale > 0) dlogits_.resize(T * V);
  cross_entropy(logits_.data(), targets, T, V, losses.data(), backward_scale > 0 ? dlogits_.data() : nullptr,
                backward_scale / static_cast<float>(T));
  double sum = 0;
  for (float l : losses) sum += l;
  return sum / static_cast<double>(T);
}

void GptModel::backward() {
  PM_CHECK(backward_scale_ > 0 && !targets_.empty(), "backward needs a forward with targets and a backward scale");
  const int64_t S = config_.seq_len, D = config_.d_model, V = config_.vocab_size, F = config_.mlp_hidden;
  const int64_t H = config_.heads, hd = D / H, T = T_;
  if (trace_) trace_->set_category("backward");
  std::optional<TraceSpan> span(std::in_place, trace_, "head");
  // logits = lnf_out wte^T: d lnf_out = dlogits wte, d wte += dlogits^T lnf_out
  FloatBuffer dln(T * D), dh(T * D);
  gemm(Trans::no, Trans::no, T, D, V, dlogits_.data(), V, wte_.f32(), D, 0.0f, dln.data(), D);
  gemm(Trans::yes, Trans::no, V, D, T, dlogits_.data(), V, lnf_out_.data(), D, 1.0f, dwte_.f32(), D);
  layernorm_backward(h_final_.data(), lnf_g_.f32(), lnf_mean_.data(), lnf_rstd_.data(), dln.data(), T, D, dh.data(),
                     dlnf_g_.f32(), dlnf_b_.f32());
  FloatBuffer dx_mid(T * D), dtmp(T * D), dffn_in(T * D), dqkv(T * 3 * D), dact;
  const float aux_grad = static_cast<float>(config_.aux_coef) * backward_scale_;
  for (int l = config_.layers - 1; l >= 0; --l) {
    Block& b = *blocks_[l];
    // h' = x_mid + FFN(LN2(x_mid)): the residual carries dh to x_mid, the FFN adds its share
    span.reset();
    if (b.moe) {
      b.moe->backward(dh.data(), dffn_in.data(), aux_grad);
      if (trace_) trace_->set_category("backward");
    } else {
      TraceSpan mlp(trace_, "mlp");
      dact.resize(T * F);
      linear_backward(b.act.data(), b.w_out, dh.data(), T, b.d_w_out, b.d_b_out, dact.data());
      gelu_backward(b.fc.data(), dact.data(), dact.data(), T * F);
      linear_backward(b.ln2_out.data(), b.w_fc, dact.data(), T, b.d_w_fc, b.d_b_fc, dffn_in.data());
    }
    span.emplace(trace_, "attention");
    layernorm_backward(b.x_mid.data(), b.ln2_g.f32(), b.ln2_mean.data(), b.ln2_rstd.data(), dffn_in.data(), T, D,
                       dtmp.data(), b.d_ln2_g.f32(), b.d_ln2_b.f32());
    for (int64_t i = 0; i < T * D; ++i) dx_mid[i] = dh[i] + dtmp[i];
    // x_mid = x_in + Attn(LN1(x_in))
    FloatBuffer dattn(T * D);
    linear_backward(b.attn.data(), b.w_proj, dx_mid.data(), T, b.d_w_proj, b.d_b_proj, dattn.data());
    attention_backward(b.qkv.data(), b.probs.data(), dattn.data(), B_, S, H, hd, dqkv.data());
    linear_backward(b.ln1_out.data(), b.w_qkv, dqkv.data(), T, b.d_w_qkv, b.d_b_qkv, dtmp.data());
    layernorm_backward(b.x_in.data(), b.ln1_g.f32(), b.ln1_mean.data(), b.ln1_rstd.data(), dtmp.data(), T, D,
                       dh.data(), b.d_ln1_g.f32(), b.d_ln1_b.f32());
    for (int64_t i = 0; i < T * D; ++i) dh[i] += dx_mid[i];
    span.reset();
    if (grads_ready_) grads_ready_(l);
  }
  span.emplace(trace_, "embed");
  for (int64_t t = 0; t < T; ++t) {  // embeddings, in token order
    axpy(1.0f, dh.data() + t * D, dwte_.f32() + inputs_[t] * D, D);
    axpy(1.0f, dh.data() + t * D, dwpe_.f32() + (t % S) * D, D);
  }
  span.reset();
  if (grads_ready_) grads_ready_(-1);
}

double GptModel::aux_loss() const {
  double sum = 0;
  for (const auto& b : blocks_)
    if (b->moe) sum += b->moe->aux_loss();
  return sum;
}

double GptModel::exposed_moe_comm_ms() const {
  double ms = 0;
  for (const auto& b : blocks_) {
    if (!b->moe) continue;
    for (const LayerRunStats* s : {&b->moe->forward_stats(), &b->moe->backward_stats()})
      ms += std::max(0.0, s->wall_ms - s->compute_ms);
  }
  return ms;
}

}  // namespace pm
