#include "model/gpt.h"

#include <cmath>
#include <cstring>
#include <map>

#include "core/rng.h"
#include "core/shard.h"
#include "model/expert_offload.h"

#include "model/gpt_internal.h"

namespace pm {

using namespace gpt_internal;  // the parts the model's source files share

GptModel::GptModel(const ModelConfig& c, Communicator& comm, Executor& executor, Backend& backend, StageSpan span)
    : config_(c),
      span_(span),
      precision_(parse_precision(c.dtype, "configuration: 'dtype'")),
      comm_(comm),
      executor_(executor),
      backend_(backend) {
  const int64_t V = c.vocab_size, S = c.seq_len, D = c.d_model, F = c.mlp_hidden, G = c.shared_expert_hidden;
  PM_CHECK(V > 0, "the model needs a vocabulary size");
  if (span_.end_block < 0) span_.end_block = c.layers;
  PM_CHECK(0 <= span_.first_block && span_.first_block < span_.end_block && span_.end_block <= c.layers,
           "blocks {} to {} of {}", span_.first_block, span_.end_block, c.layers);
  if (c.moe_strategy == "ppmoe") {
    PM_REQUIRE(comm.size() % c.tp == 0, "tp {} does not divide the {} ranks", c.tp, comm.size());
    tp_group_ = comm.split(comm.rank() / c.tp, comm.rank());
    expert_replicas_ = comm.split(comm.rank() % c.tp, comm.rank());
    dense_tp_ = c.dense_tp();
  }
  PM_REQUIRE(c.heads % dense_tp_ == 0 && F % dense_tp_ == 0,
             "{} heads and mlp_hidden {} must divide over the tensor-parallel group of {}", c.heads, F, dense_tp_);
  const int64_t Dl = D / dense_tp_, Fl = F / dense_tp_;  // this rank's attention columns and MLP hidden units
  const int64_t Dkvl = D / c.heads * c.kv_heads_or_all() / dense_tp_;  // and its key and value columns
  // a tensor-parallel weight: this rank's columns (dim 1) or rows (dim 0), q, k and v each split
  auto add_split = [&](const std::string& name, Tensor& value, Tensor& grad, bool decay, int dim, std::vector<int> parts) {
    if (dense_tp_ == 1) return add_param(name, value, grad, false, decay);
    add_param(name, value, grad, true, decay);
    params_.back().shard_dim = dim, params_.back().shard_parts = std::move(parts);
  };
  auto make = [](Tensor& value, Tensor& grad, Shape shape) {
    value = Tensor::zeros(shape);
    grad = Tensor::zeros(shape);
  };
  if (span_.first_stage || span_.last_stage) {  // the head is tied to the token embedding
    vocab_tp_ = dense_tp_ > 1 && V % dense_tp_ == 0 ? dense_tp_ : 1;
    make(wte_, dwte_, {V / vocab_tp_, D});
    add_param("wte", wte_, dwte_, vocab_tp_ > 1, false);  // split: this rank's rows of the vocabulary
  }
  if (span_.first_stage && !c.rope()) {
    make(wpe_, dwpe_, {S, D});
    add_param("wpe", wpe_, dwpe_, false, false);
  }
  if (c.rope()) {
    // cos and sin of every position's angles [S, hd / 2], from double (kernels/cpu/rope.h)
    const int64_t hd = D / c.heads, half = hd / 2;
    rope_cos_.resize(S * half), rope_sin_.resize(S * half);
    for (int64_t p = 0; p < S; ++p)
      for (int64_t i = 0; i < half; ++i) {
        const double angle = static_cast<double>(p) * std::pow(c.rope_theta, -2.0 * static_cast<double>(i) / hd);
        rope_cos_[p * half + i] = static_cast<float>(std::cos(angle));
        rope_sin_[p * half + i] = static_cast<float>(std::sin(angle));
      }
  }
  // a norm's gain, and its bias with LayerNorm (RMSNorm has none)
  auto add_norm = [&](const std::string& name, Tensor& g, Tensor& dg, Tensor& b, Tensor& db) {
    make(g, dg, {D});
    add_param(name + ".g", g, dg, false, false);
    if (c.rmsnorm()) return;
    make(b, db, {D});
    add_param(name + ".b", b, db, false, false);
  };
  const MoeStrategy& strategy = moe_strategy(c.moe_strategy);
  for (int l = 0; l < c.layers; ++l) {
    if (!holds(l)) {
      blocks_.push_back(nullptr);
      continue;
    }
    auto b = std::make_unique<Block>();
    std::string p = "blocks." + std::to_string(l) + ".";
    make(b->w_qkv, b->d_w_qkv, {D, Dl + 2 * Dkvl});  // [W_q | W_k | W_v]
    make(b->b_qkv, b->d_b_qkv, {Dl + 2 * Dkvl});
    make(b->w_proj, b->d_w_proj, {Dl, D});
    make(b->b_proj, b->d_b_proj, {D});
    add_norm(p + "ln1", b->ln1_g, b->d_ln1_g, b->ln1_b, b->d_ln1_b);
    add_split(p + "attn.w_qkv", b->w_qkv, b->d_w_qkv, true, 1, qkv_parts());
    add_split(p + "attn.b_qkv", b->b_qkv, b->d_b_qkv, false, 0, qkv_parts());
    add_split(p + "attn.w_proj", b->w_proj, b->d_w_proj, true, 0, {1});
    add_param(p + "attn.b_proj", b->b_proj, b->d_b_proj, false, false);
    add_norm(p + "ln2", b->ln2_g, b->d_ln2_g, b->ln2_b, b->d_ln2_b);
    if (c.is_moe(l)) {
      MoeShape shape{int64_t{1} * c.seq_len, D, c.expert_hidden, c.experts, c.top_k, c.capacity_factor,
                     expert_group().size()};
      shape.normalize_gates = c.gate_normalize;
      shape.routed_scale = c.routed_scaling_factor;
      shape.drop_policy = parse_drop_policy(c.drop_policy, "configuration: 'drop_policy'");
      shape.aux_seq_len = c.aux_loss == "sequence" ? c.seq_len : 0;
      shape.router_score = parse_router_score(c.router_score, "configuration: 'router_score'");
      shape.balance_bias = c.router_bias_rate > 0;
      shape.route_groups = c.route_groups;
      shape.route_top_groups = c.route_top_groups;
      shape.dedup_dispatch = c.dedup_dispatch;
      shape.recompute_experts = c.recompute_experts();
      shape.activation = parse_activation(c.expert_activation, "configuration: 'expert_activation'");
      shape.precision = precision_;
      b->moe = strategy.make_layer(shape, expert_group(), backend);
      for (Parameter& mp : b->moe->parameters()) add_param(p + "moe." + mp.name, *mp.value, *mp.grad, mp.expert, mp.decay);
      if (G > 0) {
        // SwiGLU: W_fc = [W_g | W_v], [D, 2G]
        const int64_t G1 = fc1_width(parse_activation(c.shared_expert_activation, "configuration: 'shared_expert_activation'"), G);
        make(b->se_w_fc, b->d_se_w_fc, {D, G1});
        make(b->se_b_fc, b->d_se_b_fc, {G1});
        make(b->se_w_out, b->d_se_w_out, {G, D});
        make(b->se_b_out, b->d_se_b_out, {D});
        add_param(p + "se.w_fc", b->se_w_fc, b->d_se_w_fc, false, true);
        add_param(p + "se.b_fc", b->se_b_fc, b->d_se_b_fc, false, false);
        add_param(p + "se.w_out", b->se_w_out, b->d_se_w_out, false, true);
        add_param(p + "se.b_out", b->se_b_out, b->d_se_b_out, false, false);
        if (c.coef_gate) {
          make(b->se_w_cg, b->d_se_w_cg, {D, 1});
          make(b->se_b_cg, b->d_se_b_cg, {1});
          add_param(p + "se.w_cg", b->se_w_cg, b->d_se_w_cg, false, true);
          add_param(p + "se.b_cg", b->se_b_cg, b->d_se_b_cg, false, false);
        }
      }
      if (c.scmoe()) {
        add_norm(p + "ln_moe", b->ln_moe_g, b->d_ln_moe_g, b->ln_moe_b, b->d_ln_moe_b);
      }
    } else {
      // SwiGLU: w_fc = [W_g | W_v], [D, 2F], each half split over the tensor-parallel group
      const std::vector<int> parts = mlp_swiglu() ? std::vector<int>{1, 1} : std::vector<int>{1};
      make(b->w_fc, b->d_w_fc, {D, static_cast<int64_t>(parts.size()) * Fl});
      make(b->b_fc, b->d_b_fc, {static_cast<int64_t>(parts.size()) * Fl});
      make(b->w_out, b->d_w_out, {Fl, D});
      make(b->b_out, b->d_b_out, {D});
      add_split(p + "mlp.w_fc", b->w_fc, b->d_w_fc, true, 1, parts);
      add_split(p + "mlp.b_fc", b->b_fc, b->d_b_fc, false, 0, parts);
      add_split(p + "mlp.w_out", b->w_out, b->d_w_out, true, 0, {1});
      add_param(p + "mlp.b_out", b->b_out, b->d_b_out, false, false);
    }
    blocks_.push_back(std::move(b));
  }
  if (span_.last_stage) {
    add_norm("ln_f", lnf_g_, dlnf_g_, lnf_b_, dlnf_b_);
  }
}

GptModel::~GptModel() = default;

void GptModel::add_param(const std::string& name, Tensor& value, Tensor& grad, bool expert, bool decay) {
  params_.push_back({name, &value, &grad, expert, decay});
}

std::vector<MoeLayer*> GptModel::moe_layers() {
  std::vector<MoeLayer*> out;
  for (auto& b : blocks_)
    if (b && b->moe) out.push_back(b->moe.get());
  return out;
}

std::vector<int> GptModel::moe_blocks() const {
  std::vector<int> out;
  for (std::size_t l = 0; l < blocks_.size(); ++l)
    if (blocks_[l] && blocks_[l]->moe) out.push_back(static_cast<int>(l));
  return out;
}

void GptModel::init_parameters(uint64_t seed) {
  const float std_w = 0.02f, std_residual = 0.02f / std::sqrt(2.0f * config_.layers);
  auto normal = [&](Tensor& t, float std, uint64_t kind, uint64_t a = 0, uint64_t b = 0) {
    Rng(seed, stream_id(kind, a, b)).fill_normal(t.f32(), t.numel(), 0.0f, std);
  };
  // a tensor-parallel weight: the whole tensor's values (the same as without the split), this
  // rank's slice kept
  auto normal_split = [&](Tensor& t, float std, uint64_t kind, uint64_t a, int dim, const std::vector<int>& parts,
                          int places) {
    if (places == 1) return normal(t, std, kind, a);
    Tensor whole = Tensor::zeros(whole_shape(t.shape(), dim, places));
    normal(whole, std, kind, a);
    take_shard(whole, t, dim, parts, tp_group_->rank(), places);
  };
  if (span_.first_stage || span_.last_stage) normal_split(wte_, std_w, 20, 0, 0, {1}, vocab_tp_);
  if (span_.first_stage && !config_.rope()) normal(wpe_, std_w, 21);
  const bool layernorm = !config_.rmsnorm();  // RMSNorm has no bias
  if (span_.last_stage) {
    lnf_g_.fill(1.0f);
    if (layernorm) lnf_b_.zero();
  }
  for (int l = span_.first_block; l < span_.end_block; ++l) {
    Block& b = *blocks_[l];
    b.ln1_g.fill(1.0f), b.ln2_g.fill(1.0f);
    if (layernorm) b.ln1_b.zero(), b.ln2_b.zero();
    b.b_qkv.zero(), b.b_proj.zero();
    normal_split(b.w_qkv, std_w, 22, l, 1, qkv_parts(), dense_tp_);
    normal_split(b.w_proj, std_residual, 23, l, 0, {1}, dense_tp_);
    if (b.moe) {
      std::map<std::string, Tensor*> moe;
      for (Parameter& p : b.moe->parameters()) moe[p.name] = p.value;
      normal(*moe.at("wg"), std_w, 24, l);
      const int64_t M = config_.d_model, H = config_.expert_hidden, H1 = b.moe->shape().fc1_width();
      Tensor &w1 = *moe.at("w1"), &w2 = *moe.at("w2");
      for (int le = 0; le < w1.dim(0); ++le) {
        uint64_t e = static_cast<uint64_t>(b.moe->first_expert() + le);
        Rng(seed, stream_id(25, l, e)).fill_normal(w1.f32() + le * M * H1, M * H1, 0.0f, std_w);
        Rng(seed, stream_id(26, l, e)).fill_normal(w2.f32() + le * H * M, H * M, 0.0f, std_residual);
      }
      moe.at("b1")->zero(), moe.at("b2")->zero();
      if (config_.shared_expert_hidden > 0) {
        normal(b.se_w_fc, std_w, 29, l);
        normal(b.se_w_out, std_residual, 30, l);
        b.se_b_fc.zero(), b.se_b_out.zero();
        if (config_.coef_gate) normal(b.se_w_cg, std_w, 31, l), b.se_b_cg.zero();
      }
      if (config_.scmoe()) {
        b.ln_moe_g.fill(1.0f);
        if (layernorm) b.ln_moe_b.zero();
      }
    } else {
      normal_split(b.w_fc, std_w, 27, l, 1, mlp_swiglu() ? std::vector<int>{1, 1} : std::vector<int>{1}, dense_tp_);
      normal_split(b.w_out, std_residual, 28, l, 0, {1}, dense_tp_);
      b.b_fc.zero(), b.b_out.zero();
    }
  }
}

void GptModel::rope(Backend& k, float* qkv, int64_t T, const int64_t* pos, int64_t S, bool inverse) const {
  const int64_t D = config_.d_model, hd = D / config_.heads;
  const int64_t Dl = D / dense_tp_, Dkvl = hd * config_.kv_heads_or_all() / dense_tp_;
  k.rope_rotate(qkv, T, Dl + 2 * Dkvl, Dl + Dkvl, hd, pos, S, rope_cos_.data(), rope_sin_.data(), inverse);
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

bool GptModel::tap_is(int block, const char* position) const {
  return config_.scmoe() && config_.is_moe(block) && config_.scmoe_tap == position;
}

int GptModel::choose_slot(int block, bool forward, const std::vector<std::string>& candidates) {
  const int n = static_cast<int>(candidates.size());
  if (config_.scmoe_slot >= 0) return std::min(config_.scmoe_slot, n);
  const auto& measured = forward ? last_forward_ : last_backward_;
  auto comm = measured.moe_comm_s.find(block);
  if (comm == measured.moe_comm_s.end()) return n;  // nothing measured yet: all the dense work beside the dispatch
  std::vector<double> d;
  for (const std::string& name : candidates) {
    auto it = measured.task_s.find(name);
    d.push_back(it == measured.task_s.end() ? 0.0 : it->second);
  }
  if (window_profile_) {
    // the planner: every (degree, slot) of this window simulated; the same inputs on every rank
    // (the profile, the slowest rank's times), so the same choice
    MoeLayer& layer = *blocks_[block]->moe;
    const int degree = forward ? layer.forward_degree() : layer.backward_degree();
    const double scale = comm_scale_for(*window_profile_, layer.shape(), degree, forward,
                                        comm->second.first + comm->second.second, layer.strategy());
    WindowPlan plan = plan_window(*window_profile_, layer.shape(), d, forward, kPlanTolerance, layer.strategy(), scale);
    plan.comm_scale = scale;
    if (forward)
      layer.set_degrees(plan.degree, layer.backward_degree()), windows_fwd_[block] = plan;
    else
      layer.set_degrees(layer.forward_degree(), plan.degree), windows_bwd_[block] = plan;
    return plan.slot;
  }
  // ScMoE's rule: the slot that balances the two windows, minimising
  // |compute before the experts - dispatch| + |compute after them - combine|
  double total = 0;
  for (double x : d) total += x;
  int best = 0;
  double best_cost = 0, before = 0;
  for (int s = 0; s <= n; ++s) {
    double cost = std::abs(before - comm->second.first) + std::abs(total - before - comm->second.second);
    if (s == 0 || cost < best_cost) best = s, best_cost = cost;
    if (s < n) before += d[s];
  }
  return best;
}

void GptModel::remember(const TaskGraph& graph, const std::map<int, PassTasks>& moe_tasks, PassTiming& timing) const {
  const ExecutorStats& s = executor_.last_stats();
  std::vector<double> seconds(graph.size(), 0.0);
  std::vector<double> start_s(graph.size(), 0.0), end_s(graph.size(), 0.0);
  for (const TaskRecord& r : s.records) seconds[r.task] = r.end_s - r.start_s, start_s[r.task] = r.start_s, end_s[r.task] = r.end_s;
  timing.task_s.clear();
  timing.moe_comm_s.clear();
  timing.moe_hidden.clear();
  timing.moe_span_s.clear();
  for (int id = 0; id < graph.size(); ++id) timing.task_s[graph.task(id).name] = seconds[id];
  // the MoE's communication before its experts (its way out) and after them (its way back)
  for (const auto& [block, tasks] : moe_tasks) {
    double out = 0, back = 0;
    bool experts_seen = false;
    for (int id : tasks.ids) {
      const Task& t = graph.task(id);
      if (t.lane == lanes::compute && t.chunk >= 0) experts_seen = true;
      if (t.lane == lanes::comm) (experts_seen ? back : out) += seconds[id];
    }
    timing.moe_comm_s[block] = {out, back};
    std::vector<int> comm;
    for (int id : tasks.ids)
      if (graph.task(id).lane == lanes::comm) comm.push_back(id);
    timing.moe_hidden[block] = hidden_behind_compute(graph, s, comm);
    double first = INFINITY, end = -INFINITY;
    for (int id : tasks.ids) first = std::min(first, start_s[id]), end = std::max(end, end_s[id]);
    timing.moe_span_s[block] = tasks.ids.empty() ? 0.0 : end - first;
  }
  timing.agreed = false;
}

void GptModel::agree_on_timings(bool forward, bool backward) {
  std::vector<PassTiming*> pending;
  if (forward && !last_forward_.agreed) pending.push_back(&last_forward_);
  if (backward && !last_backward_.agreed) pending.push_back(&last_backward_);
  if (pending.empty()) return;
  // (every rank ran the same passes: the same task names, the same sizes)
  std::vector<double> v;
  for (const PassTiming* t : pending) {
    for (const auto& [name, seconds] : t->task_s) v.push_back(seconds);
    for (const auto& [block, window] : t->moe_comm_s) v.push_back(window.first), v.push_back(window.second);
    for (const auto& [block, span] : t->moe_span_s) v.push_back(span);
  }
  comm_.allreduce(v.data(), v.data(), static_cast<int64_t>(v.size()), DType::f64, ReduceOp::max);
  std::size_t at = 0;
  for (PassTiming* t : pending) {
    for (auto& [name, seconds] : t->task_s) seconds = v[at++];
    for (auto& [block, window] : t->moe_comm_s) window.first = v[at++], window.second = v[at++];
    for (auto& [block, span] : t->moe_span_s) {
      span = v[at++];
      auto& both = moe_seconds_[block];
      (t == &last_forward_ ? both.first : both.second) += span;
    }
    t->agreed = true;
  }
}

std::vector<std::pair<double, double>> GptModel::take_moe_seconds() {
  agree_on_timings(true, true);
  std::vector<std::pair<double, double>> out;
  for (int block : moe_blocks()) {
    auto it = moe_seconds_.find(block);
    out.push_back(it == moe_seconds_.end() ? std::pair{0.0, 0.0} : it->second);
  }
  moe_seconds_.clear();
  return out;
}

Overlap GptModel::comm_hidden() const {
  Overlap all;
  for (const auto& [block, o] : hidden_by_block_) all += o;
  return all;
}


// Where the ScMoE tap of MoE block m lives while the forward is laid out: block m's input (pos1)
// and block m-1's input (pos3) are h_ at the join (copied to x_in only later), pos2 is block m-1's
// attention output.
const float* GptModel::scmoe_tap_now(int m) {
  if (config_.scmoe_tap == "pos2") return blocks_[m - 1]->x_mid.data();
  return h_.data();
}

// The same tap as saved for the backward (LN_moe's backward reads its input).
const float* GptModel::scmoe_tap_saved(int m) const {
  if (config_.scmoe_tap == "pos1") return blocks_[m]->x_in.data();
  if (config_.scmoe_tap == "pos2") return blocks_[m - 1]->x_mid.data();
  return blocks_[m - 1]->x_in.data();
}

// The shared expert's pre-activation and activation from its input (the block's LayerNorm 2
// output): the forward's, and with recompute_experts the backward's again, the same bits.
void GptModel::shared_expert_hidden(Block& b, Backend& k, int64_t T, int64_t G) {
  const bool swiglu = config_.shared_expert_activation == "swiglu";
  b.se_fc.resize(T * (swiglu ? 2 * G : G)), b.se_act.resize(T * G);
  linear_forward(k, precision_, b.ln2_out.data(), b.se_w_fc, b.se_b_fc, T, b.se_fc.data());
  activation_forward(k, swiglu, b.se_fc.data(), b.se_act.data(), T, G);
}

void GptModel::shared_expert_forward(Block& b, Backend& k, int64_t T, int64_t D, int64_t G) {
  b.se_raw.resize(T * D), b.se_out.resize(T * D);
  shared_expert_hidden(b, k, T, G);
  linear_forward(k, precision_, b.se_act.data(), b.se_w_out, b.se_b_out, T, b.se_raw.data());
  if (config_.recompute_experts() && inference_capacity_ == 0)  // training: the backward makes them again from ln2_out
    release(b.se_fc), release(b.se_act);  // (moe_layer.h)
  if (!config_.coef_gate) {
    b.se_out = b.se_raw;
    return;
  }
  // coef[t] = sigmoid(x_t . w_cg + b_cg) scales the shared expert's output per token
  b.coef.resize(T);
  linear_forward(k, precision_, b.ln2_out.data(), b.se_w_cg, b.se_b_cg, T, b.coef.data());
  for (int64_t t = 0; t < T; ++t) {
    b.coef[t] = 1.0f / (1.0f + std::exp(-b.coef[t]));
    for (int64_t i = 0; i < D; ++i) b.se_out[t * D + i] = b.coef[t] * b.se_raw[t * D + i];
  }
}

// From dout[T, D], the gradient of the shared expert's output: its parameters' gradients, and its
// input's gradient added to dx[T, D].
void GptModel::shared_expert_backward(Block& b, Backend& k, const float* dout, int64_t T, int64_t D, int64_t G,
                                      float* dx) {
  ScratchBuffer<float> draw(T * D), dact(T * G), dse_in(T * D);  // each written whole below before it is read
  if (config_.coef_gate) {
    ScratchBuffer<float> dlogit(T);
    for (int64_t t = 0; t < T; ++t) {
      double dcoef = 0;
      for (int64_t i = 0; i < D; ++i) {
        dcoef += static_cast<double>(dout[t * D + i]) * b.se_raw[t * D + i];
        draw[t * D + i] = dout[t * D + i] * b.coef[t];
      }
      dlogit[t] = static_cast<float>(dcoef) * b.coef[t] * (1.0f - b.coef[t]);
    }
    ScratchBuffer<float> dgate_in(T * D);
    linear_backward(k, precision_, b.ln2_out.data(), b.se_w_cg, dlogit.data(), T, b.d_se_w_cg, b.d_se_b_cg, dgate_in.data());
    for (int64_t i = 0; i < T * D; ++i) dx[i] += dgate_in[i];
  } else {
    std::memcpy(draw.data(), dout, T * D * sizeof(float));
  }
  const bool recomputed = b.se_act.empty();
  if (recomputed) shared_expert_hidden(b, k, T, G);  // recompute_experts: the forward kept only its input
  linear_backward(k, precision_, b.se_act.data(), b.se_w_out, draw.data(), T, b.d_se_w_out, b.d_se_b_out, dact.data());
  ScratchBuffer<float> dfc_swiglu;
  const float* dfc = activation_backward(k, config_.shared_expert_activation == "swiglu", b.se_fc.data(), dact.data(), T,
                                         G, dfc_swiglu);
  linear_backward(k, precision_, b.ln2_out.data(), b.se_w_fc, dfc, T, b.d_se_w_fc, b.d_se_b_fc, dse_in.data());
  for (int64_t i = 0; i < T * D; ++i) dx[i] += dse_in[i];
  if (recomputed)
    release(b.se_fc), release(b.se_act);  // (moe_layer.h)
}

void GptModel::offload_experts(const std::string& where, const std::string& model_file, int cache_slots,
                               OffloadMode mode) {
  PM_REQUIRE(where == "host" || where == "disk", "--offload-experts must be host or disk, got '{}'", where);
  auto file = std::make_shared<const MappedSafetensors>(model_file);
  const int64_t M = config_.d_model, H = config_.expert_hidden;
  for (int l = 0; l < config_.layers; ++l) {
    MoeLayer* moe = blocks_[l] ? blocks_[l]->moe.get() : nullptr;
    if (!moe) continue;
    const std::string prefix = "blocks." + std::to_string(l) + ".moe.";
    const int E = config_.experts, El = moe->shape().local_experts(), first = moe->first_expert();
    const int64_t H1 = moe->shape().fc1_width();
    auto mapped = std::make_shared<const MappedExpertStore>(file, prefix, E, first, El, M, H, H1);
    std::shared_ptr<const ExpertStore> store = mapped;
    if (where == "host") {
      const ExpertWeightsView w = mapped->expert(0);  // this rank's experts are consecutive
      store = std::make_shared<const HostExpertStore>(w.w1, w.b1, w.w2, w.b2, El, M, H, H1);
    }
    moe->offload_experts(store, cache_slots, mode);
  }
  // the routed experts are the layers' no more: checkpoints and optimizers leave them alone
  std::vector<Parameter> kept;
  for (const Parameter& p : params_)
    if (!p.expert) kept.push_back(p);
  params_ = kept;
}

std::vector<const MoePass*> GptModel::moe_passes() const {
  std::vector<const MoePass*> out;
  for (const auto& b : blocks_)
    if (b && b->moe_pass) out.push_back(b->moe_pass.get());
  return out;
}

double GptModel::aux_loss() const {
  double sum = 0;
  for (const auto& b : blocks_)
    if (b && b->moe_pass) sum += b->moe_pass->aux_loss();
  return sum;
}

double GptModel::z_loss() const {
  double sum = 0;
  for (const auto& b : blocks_)
    if (b && b->moe_pass) sum += b->moe_pass->z_loss();
  return sum;
}

void GptModel::update_balance_bias() {
  if (config_.router_bias_rate <= 0) return;
  for (const auto& b : blocks_) {
    if (!b || !b->moe || !b->moe_pass) continue;
    // the load of every rank's tokens: the bias is replicated, so every rank moves it alike
    std::vector<double> load(config_.experts, 0.0);
    add_expert_load(b->moe_pass->routing(), load.data());
    comm_.allreduce(load.data(), load.data(), config_.experts, DType::f64, ReduceOp::sum);
    for (const Parameter& p : b->moe->parameters())
      if (p.name == "router_bias") pm::update_balance_bias(p.value->f32(), load.data(), config_.experts,
                                                           config_.router_bias_rate);
  }
}

}  // namespace pm
