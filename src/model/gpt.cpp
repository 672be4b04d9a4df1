#include "model/gpt.h"

#include <cmath>
#include <cstring>
#include <map>

#include "core/rng.h"

namespace pm {
namespace {

constexpr float kLayerNormEps = 1e-5f;

// y[T, N] = x[T, K] w[K, N] + b[N]
void linear_forward(Backend& k, const float* x, const Tensor& w, const Tensor& b, int64_t T, float* y) {
  const int64_t K = w.dim(0), N = w.dim(1);
  k.fill_rows(y, T, N, b.f32());
  k.gemm(Trans::no, Trans::no, T, N, K, x, K, w.f32(), N, 1.0f, y, N);
}

// From dy[T, N]: dw += x^T dy, db += colsum(dy), dx = dy w^T (dx may be null).
void linear_backward(Backend& k, const float* x, const Tensor& w, const float* dy, int64_t T, Tensor& dw, Tensor& db,
                     float* dx) {
  const int64_t K = w.dim(0), N = w.dim(1);
  k.gemm(Trans::yes, Trans::no, K, N, T, x, K, dy, N, 1.0f, dw.f32(), N);
  k.add_column_sums(dy, T, N, db.f32());
  if (dx) k.gemm(Trans::no, Trans::yes, T, K, N, dy, N, w.f32(), N, 0.0f, dx, K);
}

std::string indexed(const char* name, int i) { return std::string(name) + "[" + std::to_string(i) + "]"; }

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
  Buffer<float> x_in, ln1_out, ln1_mean, ln1_rstd, qkv, probs, attn, x_mid, ln2_out, ln2_mean, ln2_rstd, fc, act;
  std::shared_ptr<MoePass> moe_pass;  // what the MoE layer's backward needs
};

GptModel::GptModel(const ModelConfig& c, Communicator& comm, Executor& executor, Backend& backend)
    : config_(c), comm_(comm), executor_(executor), backend_(backend) {
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
  const MoeStrategy& strategy = moe_strategy(c.moe_strategy);
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
      const MoeShape shape{int64_t{1} * c.seq_len, D, c.expert_hidden, c.experts, c.top_k, c.capacity_factor,
                           comm.size()};
      b->moe = strategy.make_layer(shape, comm, backend);
      for (Parameter& mp : b->moe->parameters()) add_param(p + "moe." + mp.name, *mp.value, *mp.grad, mp.expert, mp.decay);
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
      std::map<std::string, Tensor*> moe;
      for (Parameter& p : b.moe->parameters()) moe[p.name] = p.value;
      normal(*moe.at("wg"), std_w, 24, l);
      const int64_t M = config_.d_model, H = config_.expert_hidden;
      Tensor &w1 = *moe.at("w1"), &w2 = *moe.at("w2");
      for (int le = 0; le < w1.dim(0); ++le) {
        uint64_t e = static_cast<uint64_t>(b.moe->first_expert() + le);
        Rng(seed, stream_id(25, l, e)).fill_normal(w1.f32() + le * M * H, M * H, 0.0f, std_w);
        Rng(seed, stream_id(26, l, e)).fill_normal(w2.f32() + le * H * M, H * M, 0.0f, std_residual);
      }
      moe.at("b1")->zero(), moe.at("b2")->zero();
    } else {
      normal(b.w_fc, std_w, 27, l);
      normal(b.w_out, std_residual, 28, l);
      b.b_fc.zero(), b.b_out.zero();
    }
  }
}

void GptModel::zero_grads() {
  for (Parameter& p : params_) p.grad->zero();
}

double GptModel::run(TaskGraph& graph, const char* category) {
  if (trace_) trace_->set_category(category);
  executor_.run(graph, trace_);
  const ExecutorStats& s = executor_.last_stats();
  return std::max(0.0, s.wall_s - s.busy(lanes::compute)) * 1e3;
}

double GptModel::forward(const int32_t* inputs, const int32_t* targets, int64_t B, float backward_scale) {
  const int64_t S = config_.seq_len, D = config_.d_model, V = config_.vocab_size, F = config_.mlp_hidden;
  const int64_t H = config_.heads, hd = D / H, T = B * S;
  B_ = B, T_ = T;
  backward_scale_ = backward_scale;
  inputs_.assign(inputs, inputs + T);
  if (targets) targets_.assign(targets, targets + T);
  const bool has_targets = targets != nullptr;
  for (auto& bp : blocks_) bp->moe_pass.reset();  // the last backward is done: free the saved tensors
  h_.resize(T * D);
  Backend& k = backend_;
  const double Td = static_cast<double>(T), Dd = static_cast<double>(D);

  // Each task reads what the task before it wrote; the MoE layers' tasks fit between.
  TaskGraph g;
  int last = g.add({"embed", lanes::compute, "embed", -1, {1, 0, 3 * Td * Dd * 4}, {}, [this, T, D, S, V] {
                      for (int64_t t = 0; t < T; ++t) {
                        PM_CHECK(inputs_[t] >= 0 && inputs_[t] < V, "token {} outside the vocabulary of {}", inputs_[t], V);
                        const float* e = wte_.f32() + inputs_[t] * D;
                        const float* p = wpe_.f32() + (t % S) * D;
                        for (int64_t i = 0; i < D; ++i) h_[t * D + i] = e[i] + p[i];
                      }
                    }});
  for (int l = 0; l < config_.layers; ++l) {
    Block& b = *blocks_[l];
    const TaskWork attention_work{6, 8 * Td * Dd * Dd + 4 * Td * S * Dd, 12 * Td * Dd * 4};
    last = g.add({indexed("attention", l), lanes::compute, "attention", -1, attention_work, {last}, [&b, &k, this, T, D, B, S, H, hd] {
      b.x_in = h_;
      b.ln1_out.resize(T * D), b.ln1_mean.resize(T), b.ln1_rstd.resize(T);
      k.layernorm_forward(h_.data(), b.ln1_g.f32(), b.ln1_b.f32(), T, D, kLayerNormEps, b.ln1_out.data(),
                          b.ln1_mean.data(), b.ln1_rstd.data());
      b.qkv.resize(T * 3 * D);
      linear_forward(k, b.ln1_out.data(), b.w_qkv, b.b_qkv, T, b.qkv.data());
      b.probs.resize(B * H * S * S), b.attn.resize(T * D);
      k.attention_forward(b.qkv.data(), B, S, H, hd, b.probs.data(), b.attn.data());
      b.x_mid.resize(T * D);
      linear_forward(k, b.attn.data(), b.w_proj, b.b_proj, T, b.x_mid.data());
      for (int64_t i = 0; i < T * D; ++i) b.x_mid[i] += h_[i];
      b.ln2_out.resize(T * D), b.ln2_mean.resize(T), b.ln2_rstd.resize(T);
      k.layernorm_forward(b.x_mid.data(), b.ln2_g.f32(), b.ln2_b.f32(), T, D, kLayerNormEps, b.ln2_out.data(),
                          b.ln2_mean.data(), b.ln2_rstd.data());
    }});
    // the feed-forward's output goes to h, then the residual is added
    auto residual = [&b, this, T, D] {
      for (int64_t i = 0; i < T * D; ++i) h_[i] += b.x_mid[i];
    };
    if (b.moe) {
      b.ln2_out.resize(T * D);  // the layer's input: its address must be known when its tasks are added
      MoeForward f = b.moe->append_forward(g, {last}, b.ln2_out.data(), T, h_.data());
      b.moe_pass = f.pass;
      last = g.add({indexed("residual", l), lanes::compute, "residual", -1, {1, Td * Dd, 3 * Td * Dd * 4},
                    {f.tasks.output}, residual});
    } else {
      const TaskWork mlp_work{3, 4 * Td * Dd * F, (4 * Td * F + 4 * Td * Dd) * 4};
      last = g.add({indexed("mlp", l), lanes::compute, "mlp", -1, mlp_work, {last}, [&b, &k, this, T, F, residual] {
        b.fc.resize(T * F), b.act.resize(T * F);
        linear_forward(k, b.ln2_out.data(), b.w_fc, b.b_fc, T, b.fc.data());
        k.gelu_forward(b.fc.data(), b.act.data(), T * F);
        linear_forward(k, b.act.data(), b.w_out, b.b_out, T, h_.data());
        residual();
      }});
    }
  }
  const TaskWork head_work{2, 2 * Td * Dd * V, (2 * Td * V + 3 * Td * Dd) * 4};
  g.add({"head", lanes::compute, "head", -1, head_work, {last}, [this, T, D, V, has_targets, backward_scale, &k] {
           h_final_ = h_;
           lnf_out_.resize(T * D), lnf_mean_.resize(T), lnf_rstd_.resize(T);
           k.layernorm_forward(h_.data(), lnf_g_.f32(), lnf_b_.f32(), T, D, kLayerNormEps, lnf_out_.data(),
                               lnf_mean_.data(), lnf_rstd_.data());
           logits_.resize(T * V);
           k.gemm(Trans::no, Trans::yes, T, V, D, lnf_out_.data(), D, wte_.f32(), D, 0.0f, logits_.data(), V);
           loss_ = 0;
           if (!has_targets) return;
           std::vector<float> losses(T);
           if (backward_scale > 0) dlogits_.resize(T * V);
           k.cross_entropy(logits_.data(), targets_.data(), T, V, losses.data(),
                           backward_scale > 0 ? dlogits_.data() : nullptr, backward_scale / static_cast<float>(T));
           double sum = 0;
           for (float l : losses) sum += l;
           loss_ = sum / static_cast<double>(T);
         }});
  forward_exposed_ms_ = run(g, "forward");
  backward_exposed_ms_ = 0;
  return loss_;
}

void GptModel::backward() {
  PM_CHECK(backward_scale_ > 0 && !targets_.empty(), "backward needs a forward with targets and a backward scale");
  const int64_t S = config_.seq_len, D = config_.d_model, V = config_.vocab_size, F = config_.mlp_hidden;
  const int64_t H = config_.heads, hd = D / H, T = T_, B = B_;
  const double Td = static_cast<double>(T), Dd = static_cast<double>(D);
  Backend& k = backend_;
  // the backward's own buffers: alive until its graph has run
  Buffer<float> dln(T * D), dh(T * D), dx_mid(T * D), dtmp(T * D), dffn_in(T * D), dqkv(T * 3 * D), dattn(T * D), dact;
  const float aux_grad = static_cast<float>(config_.aux_coef) * backward_scale_;

  TaskGraph g;
  // logits = lnf_out wte^T: d lnf_out = dlogits wte, d wte += dlogits^T lnf_out
  const TaskWork head_work{3, 4 * Td * Dd * V, (2 * Td * V + 3 * Td * Dd) * 4};
  int last = g.add({"head_bwd", lanes::compute, "head_bwd", -1, head_work, {}, [&] {
                      k.gemm(Trans::no, Trans::no, T, D, V, dlogits_.data(), V, wte_.f32(), D, 0.0f, dln.data(), D);
                      k.gemm(Trans::yes, Trans::no, V, D, T, dlogits_.data(), V, lnf_out_.data(), D, 1.0f, dwte_.f32(), D);
                      k.layernorm_backward(h_final_.data(), lnf_g_.f32(), lnf_mean_.data(), lnf_rstd_.data(),
                                           dln.data(), T, D, dh.data(), dlnf_g_.f32(), dlnf_b_.f32());
                    }});
  for (int l = config_.layers - 1; l >= 0; --l) {
    Block& b = *blocks_[l];
    // h' = x_mid + FFN(LN2(x_mid)): the residual carries dh to x_mid, the FFN adds its share
    std::vector<int> grads_done;
    if (b.moe) {
      PassTasks moe = b.moe->append_backward(g, {last}, *b.moe_pass, dh.data(), dffn_in.data(), aux_grad);
      last = moe.output;
      grads_done = moe.grads;
    } else {
      const TaskWork mlp_work{6, 8 * Td * Dd * F, (8 * Td * F + 6 * Td * Dd) * 4};
      last = g.add({indexed("mlp_bwd", l), lanes::compute, "mlp_bwd", -1, mlp_work, {last}, [&, T, F] {
        dact.resize(T * F);
        linear_backward(k, b.act.data(), b.w_out, dh.data(), T, b.d_w_out, b.d_b_out, dact.data());
        k.gelu_backward(b.fc.data(), dact.data(), dact.data(), T * F);
        linear_backward(k, b.ln2_out.data(), b.w_fc, dact.data(), T, b.d_w_fc, b.d_b_fc, dffn_in.data());
      }});
    }
    const TaskWork attention_work{10, 16 * Td * Dd * Dd + 8 * Td * S * Dd, 20 * Td * Dd * 4};
    last = g.add({indexed("attention_bwd", l), lanes::compute, "attention_bwd", -1, attention_work, {last},
                  [&, T, D, B, S, H, hd] {
                    k.layernorm_backward(b.x_mid.data(), b.ln2_g.f32(), b.ln2_mean.data(), b.ln2_rstd.data(),
                                         dffn_in.data(), T, D, dtmp.data(), b.d_ln2_g.f32(), b.d_ln2_b.f32());
                    for (int64_t i = 0; i < T * D; ++i) dx_mid[i] = dh[i] + dtmp[i];
                    // x_mid = x_in + Attn(LN1(x_in))
                    linear_backward(k, b.attn.data(), b.w_proj, dx_mid.data(), T, b.d_w_proj, b.d_b_proj, dattn.data());
                    k.attention_backward(b.qkv.data(), b.probs.data(), dattn.data(), B, S, H, hd, dqkv.data());
                    linear_backward(k, b.ln1_out.data(), b.w_qkv, dqkv.data(), T, b.d_w_qkv, b.d_b_qkv, dtmp.data());
                    k.layernorm_backward(b.x_in.data(), b.ln1_g.f32(), b.ln1_mean.data(), b.ln1_rstd.data(),
                                         dtmp.data(), T, D, dh.data(), b.d_ln1_g.f32(), b.d_ln1_b.f32());
                    for (int64_t i = 0; i < T * D; ++i) dh[i] += dx_mid[i];
                  }});
    grads_done.push_back(last);
    if (grads_ready_) grads_ready_(g, l, grads_done);
  }
  last = g.add({"embed_bwd", lanes::compute, "embed_bwd", -1, {1, 4 * Td * Dd, 6 * Td * Dd * 4}, {last}, [&, T, D, S] {
                  for (int64_t t = 0; t < T; ++t) {  // embeddings, in token order
                    k.axpy(1.0f, dh.data() + t * D, dwte_.f32() + inputs_[t] * D, D);
                    k.axpy(1.0f, dh.data() + t * D, dwpe_.f32() + (t % S) * D, D);
                  }
                }});
  if (grads_ready_) grads_ready_(g, -1, {last});
  backward_exposed_ms_ = run(g, "backward");
}

std::vector<const MoePass*> GptModel::moe_passes() const {
  std::vector<const MoePass*> out;
  for (const auto& b : blocks_)
    if (b->moe_pass) out.push_back(b->moe_pass.get());
  return out;
}

double GptModel::aux_loss() const {
  double sum = 0;
  for (const auto& b : blocks_)
    if (b->moe_pass) sum += b->moe_pass->aux_loss();
  return sum;
}

}  // namespace pm
