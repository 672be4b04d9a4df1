#include "model/gpt.h"

#include <cmath>
#include <cstring>
#include <map>
#include <variant>

#include "core/rng.h"
#include "model/expert_offload.h"

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

// A pass's graph is built from a list of steps: dense tasks in order, and the points where an
// MoE layer joins (its rows leave right there; its experts come after the dense steps of its slot).
struct DenseStep {
  std::string name;
  std::function<int(TaskGraph&, int last)> add;  // appends the task after `last` (-1: none); its id
  int needs_moe = -1;  // the MoE block whose output this step reads: its experts come before it
};
struct MoeJoin {
  int block;
};
using Step = std::variant<DenseStep, MoeJoin>;

std::vector<int> after(int last) { return last >= 0 ? std::vector<int>{last} : std::vector<int>{}; }
std::vector<int> plus(std::vector<int> a, std::initializer_list<int> more) {
  for (int m : more)
    if (m >= 0) a.push_back(m);
  return a;
}

}  // namespace

struct GptModel::Block {
  // parameters and gradients; shapes in comments (D model, F dense hidden, G shared-expert hidden)
  Tensor ln1_g, ln1_b, ln2_g, ln2_b;  // [D]
  Tensor w_qkv, b_qkv;                // [D, 3D], [3D]
  Tensor w_proj, b_proj;              // [D, D], [D]
  Tensor w_fc, b_fc, w_out, b_out;    // dense: [D, F], [F], [F, D], [D]
  Tensor se_w_fc, se_b_fc, se_w_out, se_b_out, se_w_cg, se_b_cg;  // shared expert: [D, G], [G], [G, D], [D], [D, 1], [1]
  Tensor ln_moe_g, ln_moe_b;          // ScMoE: the routed experts' own LayerNorm [D]
  Tensor d_ln1_g, d_ln1_b, d_ln2_g, d_ln2_b, d_w_qkv, d_b_qkv, d_w_proj, d_b_proj, d_w_fc, d_b_fc, d_w_out, d_b_out;
  Tensor d_se_w_fc, d_se_b_fc, d_se_w_out, d_se_b_out, d_se_w_cg, d_se_b_cg, d_ln_moe_g, d_ln_moe_b;
  std::unique_ptr<MoeLayer> moe;      // MoE blocks only
  // activations of the last forward
  Buffer<float> x_in, ln1_out, ln1_mean, ln1_rstd, qkv, probs, attn, x_mid, ln2_out, ln2_mean, ln2_rstd, fc, act;
  Buffer<float> se_fc, se_act, se_raw, coef, se_out;  // [T, G], [T, G], [T, D], [T], [T, D]
  Buffer<float> moe_in, moe_mean, moe_rstd, moe_out;  // ScMoE's LN of the tap [T, D], [T], [T]; the MoE's output [T, D]
  std::shared_ptr<MoePass> moe_pass;  // what the MoE layer's backward needs
  Buffer<float> k_cache, v_cache;     // inference: keys and values [rows, seq_len, D]
  // backward: ScMoE's own copy of the output gradient, the MoE's input gradient, and the tap's
  Buffer<float> moe_dy, dmoe_in, dtap;
};

GptModel::GptModel(const ModelConfig& c, Communicator& comm, Executor& executor, Backend& backend)
    : config_(c), comm_(comm), executor_(executor), backend_(backend) {
  const int64_t V = c.vocab_size, S = c.seq_len, D = c.d_model, F = c.mlp_hidden, G = c.shared_expert_hidden;
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
      MoeShape shape{int64_t{1} * c.seq_len, D, c.expert_hidden, c.experts, c.top_k, c.capacity_factor, comm.size()};
      shape.normalize_gates = c.gate_normalize;
      shape.balance_bias = c.router_bias_rate > 0;
      shape.activation = parse_activation(c.expert_activation, "configuration: 'expert_activation'");
      b->moe = strategy.make_layer(shape, comm, backend);
      for (Parameter& mp : b->moe->parameters()) add_param(p + "moe." + mp.name, *mp.value, *mp.grad, mp.expert, mp.decay);
      if (G > 0) {
        make(b->se_w_fc, b->d_se_w_fc, {D, G});
        make(b->se_b_fc, b->d_se_b_fc, {G});
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
        make(b->ln_moe_g, b->d_ln_moe_g, {D});
        make(b->ln_moe_b, b->d_ln_moe_b, {D});
        add_param(p + "ln_moe.g", b->ln_moe_g, b->d_ln_moe_g, false, false);
        add_param(p + "ln_moe.b", b->ln_moe_b, b->d_ln_moe_b, false, false);
      }
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
      if (config_.scmoe()) b.ln_moe_g.fill(1.0f), b.ln_moe_b.zero();
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
  for (const TaskRecord& r : s.records) seconds[r.task] = r.end_s - r.start_s;
  timing.task_s.clear();
  timing.moe_comm_s.clear();
  timing.moe_hidden.clear();
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
  }
  // Every rank keeps the same times, the slowest rank's: the choices made from them (slots, where
  // the gradient buckets go) are then the same on every rank, and so is the order in which every
  // rank adds its collectives. (Every rank's graph has the same task names.)
  std::vector<double> v;
  for (const auto& [name, seconds_] : timing.task_s) v.push_back(seconds_);
  for (const auto& [block, window] : timing.moe_comm_s) v.push_back(window.first), v.push_back(window.second);
  comm_.allreduce(v.data(), v.data(), static_cast<int64_t>(v.size()), DType::f64, ReduceOp::max);
  std::size_t at = 0;
  for (auto& [name, seconds_] : timing.task_s) seconds_ = v[at++];
  for (auto& [block, window] : timing.moe_comm_s) window.first = v[at++], window.second = v[at++];
}

Overlap GptModel::comm_hidden() const {
  Overlap all;
  for (const auto& [block, o] : hidden_by_block_) all += o;
  return all;
}

// Lays the steps into the graph; at each MoE join the layer's tasks go in, with up to `slot`
// following dense steps between its way out and its experts (never past the step that reads its
// output).
template <typename Join>
void lay_out(TaskGraph& g, std::vector<Step>& steps, Join&& join) {
  int last = -1;
  for (std::size_t i = 0; i < steps.size();) {
    if (auto* d = std::get_if<DenseStep>(&steps[i])) {
      last = d->add(g, last);
      ++i;
      continue;
    }
    const int block = std::get<MoeJoin>(steps[i]).block;
    std::size_t next = i + 1;
    std::vector<std::string> candidates;  // the dense steps the slot may take
    for (std::size_t j = next; j < steps.size(); ++j) {
      auto* d = std::get_if<DenseStep>(&steps[j]);
      if (!d || d->needs_moe == block) break;
      candidates.push_back(d->name);
    }
    auto between = [&](TaskGraph& graph, int slot) {
      for (int k = 0; k < slot; ++k) last = std::get<DenseStep>(steps[next++]).add(graph, last);
    };
    join(block, last, candidates, between);
    i = next;
  }
}

double GptModel::forward(const int32_t* inputs, const int32_t* targets, int64_t B, float backward_scale) {
  return run_forward(inputs, targets, B, config_.seq_len, backward_scale, -1, false);
}

void GptModel::start_inference(int64_t rows) {
  PM_REQUIRE(rows >= 1, "inference needs at least one sequence, got {}", rows);
  const int64_t S = config_.seq_len, D = config_.d_model;
  for (auto& b : blocks_) {
    b->k_cache.assign(rows * S * D, 0.0f);
    b->v_cache.assign(rows * S * D, 0.0f);
    if (b->moe) b->moe->set_capacity_factor(0);  // dropless: a token's output never depends on the others
  }
  positions_.assign(rows, 0);
}

const float* GptModel::prefill(int64_t row, const int32_t* tokens, int64_t n) {
  PM_CHECK(row >= 0 && row < static_cast<int64_t>(positions_.size()), "row {} of {} sequences", row, positions_.size());
  PM_REQUIRE(n >= 1 && n <= config_.seq_len, "a prompt of {} tokens: the model takes 1 to {}", n, config_.seq_len);
  run_forward(tokens, nullptr, 1, n, 0.0f, row, false);
  positions_[row] = n;
  return logits_.data() + (n - 1) * config_.vocab_size;
}

const float* GptModel::decode(const int32_t* tokens) {
  const int64_t rows = static_cast<int64_t>(positions_.size());
  for (int64_t p : positions_)
    PM_CHECK(p >= 1 && p < config_.seq_len, "decoding at position {} of a window of {}", p, config_.seq_len);
  run_forward(tokens, nullptr, rows, 1, 0.0f, -1, true);
  for (int64_t& p : positions_) ++p;
  return logits_.data();
}

double GptModel::run_forward(const int32_t* inputs, const int32_t* targets, int64_t B, int64_t S, float backward_scale,
                             int64_t cache_row, bool decode) {
  const int64_t D = config_.d_model, V = config_.vocab_size, F = config_.mlp_hidden, S_max = config_.seq_len;
  const int64_t G = config_.shared_expert_hidden, H = config_.heads, hd = D / H, T = B * S;
  const int L = config_.layers;
  B_ = B, T_ = T;
  backward_scale_ = backward_scale;
  inputs_.assign(inputs, inputs + T);
  if (targets) targets_.assign(targets, targets + T);
  const bool has_targets = targets != nullptr;
  for (auto& bp : blocks_) bp->moe_pass.reset();  // the last backward is done: free the saved tensors
  h_.resize(T * D);
  Backend& k = backend_;
  const double Td = static_cast<double>(T), Dd = static_cast<double>(D);
  std::vector<int> moe_output(L, -1), moe_ln(L, -1);  // task ids, once laid out

  // The pass as steps; each dense task reads what the step before it wrote.
  std::vector<Step> steps;
  steps.push_back(DenseStep{"embed", [this, T, D, S, V, Td, Dd, decode](TaskGraph& g, int last) {
                              return g.add({"embed", lanes::compute, "embed", -1, {1, 0, 3 * Td * Dd * 4}, after(last), [=, this] {
                                              for (int64_t t = 0; t < T; ++t) {
                                                PM_CHECK(inputs_[t] >= 0 && inputs_[t] < V,
                                                         "token {} outside the vocabulary of {}", inputs_[t], V);
                                                const float* e = wte_.f32() + inputs_[t] * D;
                                                const int64_t position = decode ? positions_[t] : t % S;
                                                const float* p = wpe_.f32() + position * D;
                                                for (int64_t i = 0; i < D; ++i) h_[t * D + i] = e[i] + p[i];
                                              }
                                            }});
                            }});
  for (int l = 0; l < L; ++l) {
    Block& b = *blocks_[l];
    b.x_in.resize(T * D), b.x_mid.resize(T * D);  // a ScMoE tap's address is taken when the graph is built
    // ScMoE taps at the block's input: this block's own MoE (pos1), the next one's (pos3)
    if (tap_is(l, "pos1")) steps.push_back(MoeJoin{l});
    if (l + 1 < L && tap_is(l + 1, "pos3")) steps.push_back(MoeJoin{l + 1});
    const TaskWork attention_work{6, 8 * Td * Dd * Dd + 4 * Td * S * Dd, 12 * Td * Dd * 4};
    steps.push_back(DenseStep{indexed("attention", l), [&b, &k, this, l, T, D, B, S, H, hd, attention_work, decode, cache_row, S_max](TaskGraph& g, int last) {
      return g.add({indexed("attention", l), lanes::compute, "attention", -1, attention_work, after(last),
                    [&b, &k, this, T, D, B, S, H, hd, decode, cache_row, S_max] {
                      b.x_in = h_;
                      b.ln1_out.resize(T * D), b.ln1_mean.resize(T), b.ln1_rstd.resize(T);
                      k.layernorm_forward(h_.data(), b.ln1_g.f32(), b.ln1_b.f32(), T, D, kLayerNormEps, b.ln1_out.data(),
                                          b.ln1_mean.data(), b.ln1_rstd.data());
                      b.qkv.resize(T * 3 * D);
                      linear_forward(k, b.ln1_out.data(), b.w_qkv, b.b_qkv, T, b.qkv.data());
                      b.attn.resize(T * D);
                      if (decode) {  // one token per sequence against its cached keys and values
                        k.attention_decode(b.qkv.data(), b.k_cache.data(), b.v_cache.data(), positions_.data(), B,
                                           S_max, H, hd, b.attn.data());
                      } else {
                        b.probs.resize(B * H * S * S);
                        k.attention_forward(b.qkv.data(), B, S, H, hd, b.probs.data(), b.attn.data());
                      }
                      if (cache_row >= 0)  // a prompt: its keys and values stay for the tokens that follow
                        for (int64_t t = 0; t < S; ++t)
                          for (int64_t i = 0; i < D; ++i) {
                            b.k_cache[(cache_row * S_max + t) * D + i] = b.qkv[t * 3 * D + D + i];
                            b.v_cache[(cache_row * S_max + t) * D + i] = b.qkv[t * 3 * D + 2 * D + i];
                          }
                      b.x_mid.resize(T * D);
                      linear_forward(k, b.attn.data(), b.w_proj, b.b_proj, T, b.x_mid.data());
                      for (int64_t i = 0; i < T * D; ++i) b.x_mid[i] += h_[i];
                      b.ln2_out.resize(T * D), b.ln2_mean.resize(T), b.ln2_rstd.resize(T);
                      k.layernorm_forward(b.x_mid.data(), b.ln2_g.f32(), b.ln2_b.f32(), T, D, kLayerNormEps,
                                          b.ln2_out.data(), b.ln2_mean.data(), b.ln2_rstd.data());
                    }});
    }});
    if (l + 1 < L && tap_is(l + 1, "pos2")) steps.push_back(MoeJoin{l + 1});
    // the task that writes this block's output into h_ must wait for a pos3 tap that reads h_
    const int pos3_reader = l + 1 < L && tap_is(l + 1, "pos3") ? l + 1 : -1;
    if (b.moe) {
      if (!config_.scmoe()) steps.push_back(MoeJoin{l});  // the experts read this block's own LN2 output
      if (G > 0) {
        const TaskWork se_work{4, 4 * Td * Dd * G, (4 * Td * G + 4 * Td * Dd) * 4};
        steps.push_back(DenseStep{indexed("shared_expert", l), [&b, &k, this, l, T, D, G, se_work](TaskGraph& g, int last) {
          return g.add({indexed("shared_expert", l), lanes::compute, "shared_expert", -1, se_work, after(last),
                        [&b, &k, this, T, D, G] { shared_expert_forward(b, k, T, D, G); }});
        }});
      }
      steps.push_back(DenseStep{indexed("residual", l), [&b, &moe_output, &moe_ln, this, l, T, D, G, pos3_reader, Td, Dd](TaskGraph& g, int last) {
        std::vector<int> deps = plus(after(last), {moe_output[l], pos3_reader >= 0 ? moe_ln[pos3_reader] : -1});
        return g.add({indexed("residual", l), lanes::compute, "residual", -1, {1, 2 * Td * Dd, 4 * Td * Dd * 4}, deps,
                      [&b, this, T, D, G] {
                        if (G > 0)
                          for (int64_t i = 0; i < T * D; ++i) h_[i] = (b.se_out[i] + b.moe_out[i]) + b.x_mid[i];
                        else
                          for (int64_t i = 0; i < T * D; ++i) h_[i] = b.moe_out[i] + b.x_mid[i];
                      }});
      }, l});
    } else {
      const TaskWork mlp_work{3, 4 * Td * Dd * F, (4 * Td * F + 4 * Td * Dd) * 4};
      steps.push_back(DenseStep{indexed("mlp", l), [&b, &k, &moe_ln, this, l, T, D, F, pos3_reader, mlp_work](TaskGraph& g, int last) {
        std::vector<int> deps = plus(after(last), {pos3_reader >= 0 ? moe_ln[pos3_reader] : -1});
        return g.add({indexed("mlp", l), lanes::compute, "mlp", -1, mlp_work, deps, [&b, &k, this, T, D, F] {
                        b.fc.resize(T * F), b.act.resize(T * F);
                        linear_forward(k, b.ln2_out.data(), b.w_fc, b.b_fc, T, b.fc.data());
                        k.gelu_forward(b.fc.data(), b.act.data(), T * F);
                        linear_forward(k, b.act.data(), b.w_out, b.b_out, T, h_.data());
                        for (int64_t i = 0; i < T * D; ++i) h_[i] += b.x_mid[i];
                      }});
      }});
    }
  }
  const TaskWork head_work{2, 2 * Td * Dd * V, (2 * Td * V + 3 * Td * Dd) * 4};
  steps.push_back(DenseStep{"head", [this, T, D, V, has_targets, backward_scale, &k, head_work](TaskGraph& g, int last) {
    return g.add({"head", lanes::compute, "head", -1, head_work, after(last),
                  [this, T, D, V, has_targets, backward_scale, &k] {
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
  }});

  TaskGraph g;
  std::map<int, PassTasks> moe_tasks;
  lay_out(g, steps, [&](int block, int& last, const std::vector<std::string>& candidates, auto between) {
    Block* bp = blocks_[block].get();
    Block& b = *bp;
    b.moe_out.resize(T * D);
    std::vector<int> front = after(last);
    const float* moe_input = b.ln2_out.data();
    if (config_.scmoe()) {
      // the routed experts' own LayerNorm of the tapped representation, read where it is now
      const float* tap = scmoe_tap_now(block);
      b.moe_in.resize(T * D), b.moe_mean.resize(T), b.moe_rstd.resize(T);
      moe_ln[block] = g.add({indexed("moe_ln", block), lanes::compute, "layernorm", -1, {1, 8 * Td * Dd, 3 * Td * Dd * 4},
                             front, [bp, &k, tap, T, D] {
                               k.layernorm_forward(tap, bp->ln_moe_g.f32(), bp->ln_moe_b.f32(), T, D, kLayerNormEps,
                                                   bp->moe_in.data(), bp->moe_mean.data(), bp->moe_rstd.data());
                             }});
      front = {moe_ln[block]};
      moe_input = b.moe_in.data();
    } else {
      b.ln2_out.resize(T * D);  // the layer's input: its address must be known when its tasks are added
      moe_input = b.ln2_out.data();
    }
    const int slot = choose_slot(block, /*forward=*/true, candidates);
    MoeForward f = b.moe->append_forward(g, front, moe_input, T, b.moe_out.data(),
                                         [&](TaskGraph& graph) { between(graph, slot); });
    b.moe_pass = f.pass;
    moe_output[block] = f.tasks.output;
    moe_tasks[block] = f.tasks;
    slots_fwd_[block] = slot;
  });
  forward_exposed_ms_ = run(g, "forward");
  remember(g, moe_tasks, last_forward_);
  backward_exposed_ms_ = 0;
  hidden_by_block_ = last_forward_.moe_hidden;
  return loss_;
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

void GptModel::shared_expert_forward(Block& b, Backend& k, int64_t T, int64_t D, int64_t G) {
  b.se_fc.resize(T * G), b.se_act.resize(T * G), b.se_raw.resize(T * D), b.se_out.resize(T * D);
  linear_forward(k, b.ln2_out.data(), b.se_w_fc, b.se_b_fc, T, b.se_fc.data());
  k.gelu_forward(b.se_fc.data(), b.se_act.data(), T * G);
  linear_forward(k, b.se_act.data(), b.se_w_out, b.se_b_out, T, b.se_raw.data());
  if (!config_.coef_gate) {
    b.se_out = b.se_raw;
    return;
  }
  // coef[t] = sigmoid(x_t . w_cg + b_cg) scales the shared expert's output per token
  b.coef.resize(T);
  linear_forward(k, b.ln2_out.data(), b.se_w_cg, b.se_b_cg, T, b.coef.data());
  for (int64_t t = 0; t < T; ++t) {
    b.coef[t] = 1.0f / (1.0f + std::exp(-b.coef[t]));
    for (int64_t i = 0; i < D; ++i) b.se_out[t * D + i] = b.coef[t] * b.se_raw[t * D + i];
  }
}

// From dout[T, D], the gradient of the shared expert's output: its parameters' gradients, and its
// input's gradient added to dx[T, D].
void GptModel::shared_expert_backward(Block& b, Backend& k, const float* dout, int64_t T, int64_t D, int64_t G,
                                      float* dx) {
  Buffer<float> draw(T * D), dact(T * G), dse_in(T * D);
  if (config_.coef_gate) {
    Buffer<float> dlogit(T);
    for (int64_t t = 0; t < T; ++t) {
      double dcoef = 0;
      for (int64_t i = 0; i < D; ++i) {
        dcoef += static_cast<double>(dout[t * D + i]) * b.se_raw[t * D + i];
        draw[t * D + i] = dout[t * D + i] * b.coef[t];
      }
      dlogit[t] = static_cast<float>(dcoef) * b.coef[t] * (1.0f - b.coef[t]);
    }
    Buffer<float> dgate_in(T * D);
    linear_backward(k, b.ln2_out.data(), b.se_w_cg, dlogit.data(), T, b.d_se_w_cg, b.d_se_b_cg, dgate_in.data());
    for (int64_t i = 0; i < T * D; ++i) dx[i] += dgate_in[i];
  } else {
    std::memcpy(draw.data(), dout, T * D * sizeof(float));
  }
  linear_backward(k, b.se_act.data(), b.se_w_out, draw.data(), T, b.d_se_w_out, b.d_se_b_out, dact.data());
  k.gelu_backward(b.se_fc.data(), dact.data(), dact.data(), T * G);
  linear_backward(k, b.ln2_out.data(), b.se_w_fc, dact.data(), T, b.d_se_w_fc, b.d_se_b_fc, dse_in.data());
  for (int64_t i = 0; i < T * D; ++i) dx[i] += dse_in[i];
}

void GptModel::backward() {
  PM_CHECK(backward_scale_ > 0 && !targets_.empty(), "backward needs a forward with targets and a backward scale");
  const int64_t S = config_.seq_len, D = config_.d_model, V = config_.vocab_size, F = config_.mlp_hidden;
  const int64_t G = config_.shared_expert_hidden, H = config_.heads, hd = D / H, T = T_, B = B_;
  const int L = config_.layers;
  const double Td = static_cast<double>(T), Dd = static_cast<double>(D);
  Backend& k = backend_;
  const bool scmoe = config_.scmoe();
  // the backward's own buffers: alive until its graph has run
  Buffer<float> dln(T * D), dh(T * D), dx_mid(T * D), dtmp(T * D), dffn_in(T * D), dqkv(T * 3 * D), dattn(T * D), dact;
  const RouterLossGrads router_grads{static_cast<float>(config_.aux_coef) * backward_scale_,
                                 static_cast<float>(config_.z_loss_coef) * backward_scale_};
  std::vector<int> moe_done(L, -1), moe_ln_bwd(L, -1);  // MoE output (dx) or ScMoE's LN backward; task ids
  std::vector<std::vector<int>> moe_grads(L);

  // Which MoE block's tap gradient each block's attention backward adds: into its input's gradient
  // (pos1 of this block, pos3 of the next) or its attention output's (pos2 of the next).
  auto input_tap = [&](int l) { return tap_is(l, "pos1") ? l : (l + 1 < L && tap_is(l + 1, "pos3") ? l + 1 : -1); };
  auto mid_tap = [&](int l) { return l + 1 < L && tap_is(l + 1, "pos2") ? l + 1 : -1; };

  std::vector<Step> steps;
  // logits = lnf_out wte^T: d lnf_out = dlogits wte, d wte += dlogits^T lnf_out
  const TaskWork head_work{3, 4 * Td * Dd * V, (2 * Td * V + 3 * Td * Dd) * 4};
  steps.push_back(DenseStep{"head_bwd", [&, T, D, V, head_work](TaskGraph& g, int last) {
    return g.add({"head_bwd", lanes::compute, "head_bwd", -1, head_work, after(last), [&, T, D, V] {
                    k.gemm(Trans::no, Trans::no, T, D, V, dlogits_.data(), V, wte_.f32(), D, 0.0f, dln.data(), D);
                    k.gemm(Trans::yes, Trans::no, V, D, T, dlogits_.data(), V, lnf_out_.data(), D, 1.0f, dwte_.f32(), D);
                    k.layernorm_backward(h_final_.data(), lnf_g_.f32(), lnf_mean_.data(), lnf_rstd_.data(), dln.data(),
                                         T, D, dh.data(), dlnf_g_.f32(), dlnf_b_.f32());
                  }});
  }});
  for (int l = L - 1; l >= 0; --l) {
    Block& b = *blocks_[l];
    // h' = x_mid + FFN(LN2(x_mid)): the residual carries dh to x_mid, the FFN adds its share
    if (b.moe) {
      if (scmoe) {
        // the MoE's output gradient is dh here; the blocks below overwrite dh while its backward runs
        steps.push_back(DenseStep{indexed("moe_dy", l), [&b, &dh, T, D, l, Td, Dd](TaskGraph& g, int last) {
          return g.add({indexed("moe_dy", l), lanes::compute, "copy", -1, {1, 0, 2 * Td * Dd * 4}, after(last),
                        [&b, &dh, T, D] { b.moe_dy = dh; }});
        }});
        steps.push_back(MoeJoin{l});
        if (G > 0)
          steps.push_back(DenseStep{indexed("shared_expert_bwd", l), [&, l, T, D, G](TaskGraph& g, int last) {
            return g.add({indexed("shared_expert_bwd", l), lanes::compute, "shared_expert_bwd", -1,
                          {6, 8 * Td * Dd * G, (8 * Td * G + 6 * Td * Dd) * 4}, after(last), [&, T, D, G] {
                            std::memset(dffn_in.data(), 0, T * D * sizeof(float));
                            shared_expert_backward(b, k, dh.data(), T, D, G, dffn_in.data());
                          }});
          }});
      } else {
        steps.push_back(MoeJoin{l});  // reads dh, writes dffn_in
        if (G > 0)
          steps.push_back(DenseStep{indexed("shared_expert_bwd", l), [&, l, T, D, G](TaskGraph& g, int last) {
            return g.add({indexed("shared_expert_bwd", l), lanes::compute, "shared_expert_bwd", -1,
                          {6, 8 * Td * Dd * G, (8 * Td * G + 6 * Td * Dd) * 4}, plus(after(last), {moe_done[l]}),
                          [&, T, D, G] { shared_expert_backward(b, k, dh.data(), T, D, G, dffn_in.data()); }});
          }, l});
      }
    } else {
      const TaskWork mlp_work{6, 8 * Td * Dd * F, (8 * Td * F + 6 * Td * Dd) * 4};
      steps.push_back(DenseStep{indexed("mlp_bwd", l), [&, l, T, F, mlp_work](TaskGraph& g, int last) {
        return g.add({indexed("mlp_bwd", l), lanes::compute, "mlp_bwd", -1, mlp_work, after(last), [&, T, F] {
                        dact.resize(T * F);
                        linear_backward(k, b.act.data(), b.w_out, dh.data(), T, b.d_w_out, b.d_b_out, dact.data());
                        k.gelu_backward(b.fc.data(), dact.data(), dact.data(), T * F);
                        linear_backward(k, b.ln2_out.data(), b.w_fc, dact.data(), T, b.d_w_fc, b.d_b_fc, dffn_in.data());
                      }});
      }});
    }
    const int in_tap = input_tap(l), mid = mid_tap(l);
    // the step reads the MoE's input gradient: its own MoE's (not ScMoE), or a tap's
    const int needs = b.moe && !scmoe ? l : (mid >= 0 ? mid : in_tap);
    const TaskWork attention_work{10, 16 * Td * Dd * Dd + 8 * Td * S * Dd, 20 * Td * Dd * 4};
    steps.push_back(DenseStep{indexed("attention_bwd", l), [&, l, T, D, B, S, H, hd, in_tap, mid, attention_work](TaskGraph& g, int last) {
      std::vector<int> deps = plus(after(last), {b.moe && !scmoe ? moe_done[l] : -1, in_tap >= 0 ? moe_ln_bwd[in_tap] : -1,
                                                 mid >= 0 ? moe_ln_bwd[mid] : -1});
      return g.add({indexed("attention_bwd", l), lanes::compute, "attention_bwd", -1, attention_work, deps,
                    [&, T, D, B, S, H, hd, in_tap, mid] {
                      k.layernorm_backward(b.x_mid.data(), b.ln2_g.f32(), b.ln2_mean.data(), b.ln2_rstd.data(),
                                           dffn_in.data(), T, D, dtmp.data(), b.d_ln2_g.f32(), b.d_ln2_b.f32());
                      for (int64_t i = 0; i < T * D; ++i) dx_mid[i] = dh[i] + dtmp[i];
                      if (mid >= 0)  // ScMoE pos2: the next block's experts read this attention output
                        for (int64_t i = 0; i < T * D; ++i) dx_mid[i] += blocks_[mid]->dtap[i];
                      // x_mid = x_in + Attn(LN1(x_in))
                      linear_backward(k, b.attn.data(), b.w_proj, dx_mid.data(), T, b.d_w_proj, b.d_b_proj, dattn.data());
                      k.attention_backward(b.qkv.data(), b.probs.data(), dattn.data(), B, S, H, hd, dqkv.data());
                      linear_backward(k, b.ln1_out.data(), b.w_qkv, dqkv.data(), T, b.d_w_qkv, b.d_b_qkv, dtmp.data());
                      k.layernorm_backward(b.x_in.data(), b.ln1_g.f32(), b.ln1_mean.data(), b.ln1_rstd.data(),
                                           dtmp.data(), T, D, dh.data(), b.d_ln1_g.f32(), b.d_ln1_b.f32());
                      for (int64_t i = 0; i < T * D; ++i) dh[i] += dx_mid[i];
                      if (in_tap >= 0)  // ScMoE pos1 / pos3: experts read this block's input
                        for (int64_t i = 0; i < T * D; ++i) dh[i] += blocks_[in_tap]->dtap[i];
                    }});
    }, needs});
  }
  steps.push_back(DenseStep{"embed_bwd", [&, T, D, S](TaskGraph& g, int last) {
    return g.add({"embed_bwd", lanes::compute, "embed_bwd", -1, {1, 4 * Td * Dd, 6 * Td * Dd * 4}, after(last), [&, T, D, S] {
                    for (int64_t t = 0; t < T; ++t) {  // embeddings, in token order
                      k.axpy(1.0f, dh.data() + t * D, dwte_.f32() + inputs_[t] * D, D);
                      k.axpy(1.0f, dh.data() + t * D, dwpe_.f32() + (t % S) * D, D);
                    }
                  }});
  }});

  // A block's replicated gradients are final once its attention backward and its MoE's backward
  // (the gate, ScMoE's LayerNorm, its shared expert) are in: then its all-reduce joins the graph.
  // The communication lane runs its tasks in the order added, so a bucket added before the next
  // MoE's all-to-alls would hold them up, and those are on the critical path (the experts wait
  // for them) while the buckets can wait until the optimizer: a bucket joins after the next MoE
  // join that follows its block in the step list, or, past the last join, as soon as both that
  // join is in and the block's steps are. Where it joins must not depend on the slots: each rank
  // measures its own times and may lay a dense step inside a join's slot or after it, but every
  // rank must add its collectives in the same order. Both rules add the buckets in step order,
  // after the same communication tasks, whatever the slots.
  std::vector<int> flush_join(L, -1);  // step index of the join after which bucket l joins; -1: past the last
  for (int l = 0; l < L; ++l) {
    std::size_t at = 0;
    while (at < steps.size() && !(std::holds_alternative<DenseStep>(steps[at]) &&
                                  std::get<DenseStep>(steps[at]).name == indexed("attention_bwd", l)))
      ++at;
    for (std::size_t j = at + 1; j < steps.size() && flush_join[l] < 0; ++j)
      if (std::holds_alternative<MoeJoin>(steps[j])) flush_join[l] = static_cast<int>(j);
  }
  // A bucket whose all-reduce the last backward showed to fit before the next MoE join's rows
  // leave (the dense steps in between take longer than it, and than the buckets before it) goes
  // at once: it uses a link that would idle, and holds nothing up. (The times are every rank's
  // slowest, so every rank decides the same.)
  std::vector<char> at_once(L, 0);
  {
    std::map<int, double> window_left;  // per join: dense time before it not yet filled by a bucket
    for (int l = L - 1; l >= 0; --l) {
      if (flush_join[l] < 0 || last_backward_.task_s.empty()) continue;
      auto bucket = last_backward_.task_s.find(fmt::format("all-reduce block {} grads", l));
      if (bucket == last_backward_.task_s.end()) continue;
      if (!window_left.count(flush_join[l])) {
        std::size_t at = 0;
        while (std::get_if<DenseStep>(&steps[at]) == nullptr ||
               std::get<DenseStep>(steps[at]).name != indexed("attention_bwd", l))
          ++at;
        double dense = 0;
        for (std::size_t j = at + 1; j < static_cast<std::size_t>(flush_join[l]); ++j)
          if (auto* d = std::get_if<DenseStep>(&steps[j])) {
            auto t = last_backward_.task_s.find(d->name);
            if (t != last_backward_.task_s.end()) dense += t->second;
          }
        window_left[flush_join[l]] = dense;
      }
      double& left = window_left[flush_join[l]];
      if (bucket->second <= left) at_once[l] = 1, left -= bucket->second;
    }
  }
  int joins_left = 0;
  for (const Step& s : steps) joins_left += std::holds_alternative<MoeJoin>(s);
  TaskGraph g;
  std::map<int, PassTasks> moe_tasks;
  std::map<std::string, int> added;  // dense steps laid out so far, by name
  std::vector<char> announced(L, 0);
  // A block is ready once its attention backward is laid out and, for an MoE block, its MoE's
  // whole backward (the join returns only then: a step laid inside the join's slot is not enough).
  auto announce = [&](TaskGraph& graph, int l) {
    if (!grads_ready_ || announced[l] || !added.count(indexed("attention_bwd", l)) ||
        (blocks_[l]->moe && moe_done[l] < 0))
      return;
    std::vector<int> ready = moe_grads[l];
    ready.push_back(added.at(indexed("attention_bwd", l)));
    if (moe_ln_bwd[l] >= 0) ready.push_back(moe_ln_bwd[l]);
    if (auto se = added.find(indexed("shared_expert_bwd", l)); se != added.end()) ready.push_back(se->second);
    grads_ready_(graph, l, ready);
    announced[l] = 1;
  };
  for (Step& s : steps)
    if (auto* d = std::get_if<DenseStep>(&s)) {
      auto add = d->add;
      const std::string name = d->name;
      int block = -1;  // the block whose gradients this step completes
      for (int l = 0; l < L; ++l)
        if (name == indexed("attention_bwd", l)) block = l;
      d->add = [&, add, name, block](TaskGraph& graph, int last) {
        int id = add(graph, last);
        added[name] = id;
        if (block >= 0 && (at_once[block] || (flush_join[block] < 0 && joins_left == 0))) announce(graph, block);
        return id;
      };
    }
  std::vector<int> join_index(L, -1);  // the step index of each block's MoE join
  for (std::size_t j = 0; j < steps.size(); ++j)
    if (auto* m = std::get_if<MoeJoin>(&steps[j])) join_index[m->block] = static_cast<int>(j);
  lay_out(g, steps, [&](int block, int& last, const std::vector<std::string>& candidates, auto between) {
    Block* bp = blocks_[block].get();
    Block& b = *bp;
    const int slot = scmoe ? choose_slot(block, /*forward=*/false, candidates) : 0;
    PassTasks t;
    if (scmoe) {
      b.moe_dy.resize(T * D);  // the moe_dy task copies into it: its address is taken now
      b.dmoe_in.resize(T * D);
      t = b.moe->append_backward(g, after(last), *b.moe_pass, b.moe_dy.data(), b.dmoe_in.data(), router_grads,
                                 [&](TaskGraph& graph) { between(graph, slot); });
      // the routed experts' LayerNorm: its parameters' gradients, and the tap's
      b.dtap.resize(T * D);
      const float* tap = scmoe_tap_saved(block);
      moe_ln_bwd[block] = g.add({indexed("moe_ln_bwd", block), lanes::compute, "layernorm_bwd", -1,
                                 {1, 10 * Td * Dd, 4 * Td * Dd * 4}, {t.output}, [bp, &k, tap, T, D] {
                                   k.layernorm_backward(tap, bp->ln_moe_g.f32(), bp->moe_mean.data(), bp->moe_rstd.data(),
                                                        bp->dmoe_in.data(), T, D, bp->dtap.data(), bp->d_ln_moe_g.f32(),
                                                        bp->d_ln_moe_b.f32());
                                 }});
    } else {
      t = b.moe->append_backward(g, after(last), *b.moe_pass, dh.data(), dffn_in.data(), router_grads,
                                 [&](TaskGraph& graph) { between(graph, slot); });
    }
    moe_done[block] = t.output;
    moe_grads[block] = t.grads;
    moe_tasks[block] = t;
    slots_bwd_[block] = slot;
    --joins_left;
    for (int l = L - 1; l >= 0; --l)  // in step order (the backward's steps run from the last block)
      if (flush_join[l] == join_index[block] || at_once[l] || (flush_join[l] < 0 && joins_left == 0)) announce(g, l);
  });
  if (grads_ready_) grads_ready_(g, -1, {added.at("embed_bwd")});  // the rest (head_bwd is before it)
  backward_exposed_ms_ = run(g, "backward");
  remember(g, moe_tasks, last_backward_);
  for (const auto& [block, o] : last_backward_.moe_hidden) hidden_by_block_[block] += o;
}

void GptModel::offload_experts(const std::string& where, const std::string& model_file, int cache_slots,
                               OffloadMode mode) {
  PM_REQUIRE(where == "host" || where == "disk", "--offload-experts must be host or disk, got '{}'", where);
  auto file = std::make_shared<const MappedSafetensors>(model_file);
  const int64_t M = config_.d_model, H = config_.expert_hidden;
  for (int l = 0; l < config_.layers; ++l) {
    MoeLayer* moe = blocks_[l]->moe.get();
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
    if (b->moe_pass) out.push_back(b->moe_pass.get());
  return out;
}

double GptModel::aux_loss() const {
  double sum = 0;
  for (const auto& b : blocks_)
    if (b->moe_pass) sum += b->moe_pass->aux_loss();
  return sum;
}

double GptModel::z_loss() const {
  double sum = 0;
  for (const auto& b : blocks_)
    if (b->moe_pass) sum += b->moe_pass->z_loss();
  return sum;
}

void GptModel::update_balance_bias() {
  if (config_.router_bias_rate <= 0) return;
  for (const auto& b : blocks_) {
    if (!b->moe || !b->moe_pass) continue;
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
