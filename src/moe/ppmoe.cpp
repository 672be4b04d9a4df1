#include "moe/ppmoe.h"

#include <algorithm>
#include <cstring>

#include "comm/bf16_allreduce.h"
#include "moe/layer_weights.h"
#include "moe/gate.h"
#include "moe/ppmoe_graph.h"
#include "moe/row_buffer.h"

namespace pm {
namespace {

// This rank's kept choices of one pass, in canonical order: by local expert, then slot. A local
// expert's slots fill choice by choice and token by token (routing.h), so the rows of one
// (local expert, choice) are consecutive and in token order: a chunk of tokens is a sub-range.
struct LocalRows {
  int top_k = 1;
  std::vector<int64_t> run_first;  // [El k + 1] first row of each (local expert, choice)
  std::vector<int64_t> token;      // [rows] the token of each row
  std::vector<int64_t> positions;  // [T, k] the row of each choice this rank computes; -1 otherwise
  int64_t rows() const { return run_first.back(); }
  // The rows of (local expert, choice) whose tokens lie in [t0, t1).
  std::pair<int64_t, int64_t> rows_in(int le, int j, int64_t t0, int64_t t1) const {
    const auto begin = token.begin() + run_first[le * top_k + j], end = token.begin() + run_first[le * top_k + j + 1];
    return {std::lower_bound(begin, end, t0) - token.begin(), std::lower_bound(begin, end, t1) - token.begin()};
  }
};

LocalRows local_rows(const Routing& r, int first_expert, int local_experts) {
  const int k = r.top_k;
  LocalRows out;
  out.top_k = k;
  std::vector<int64_t> count(static_cast<size_t>(local_experts) * k, 0);
  for (int64_t i = 0; i < r.tokens * k; ++i) {
    const int le = r.expert[i] - first_expert;
    if (r.slot[i] >= 0 && le >= 0 && le < local_experts) ++count[le * k + i % k];
  }
  out.run_first.assign(count.size() + 1, 0);
  for (size_t i = 0; i < count.size(); ++i) out.run_first[i + 1] = out.run_first[i] + count[i];
  out.token.resize(out.rows());
  out.positions.assign(r.tokens * k, -1);
  for (int64_t i = 0; i < r.tokens * k; ++i) {
    const int le = r.expert[i] - first_expert;
    if (r.slot[i] < 0 || le < 0 || le >= local_experts) continue;
    const int64_t row = out.run_first[le * k] + r.slot[i];  // slot order within the expert
    out.positions[i] = row;
    out.token[row] = i / k;
  }
  return out;
}

struct ForwardPass final : MoePass, std::enable_shared_from_this<ForwardPass> {
  const float* x = nullptr;  // [T, M] the input (the same on every rank of the group), kept by the caller
  float* y = nullptr;        // [T, M] the output
  int64_t tokens = 0;
  Gating gating;                    // gate
  LocalRows local;                  // gate
  RowList u_at;                     // gate: [rows] where each row's input sits in x (expert); saved
  RowBuffer act;                    // gate: [rows, H] canonical order (expert); saved (bf16 in a bf16 layer)
  ScratchBuffer<float> fc1_saved, out;   // gate: [rows, H1|M] canonical order (expert); saved (fc1_saved: expert_forward's)
  // (recompute_experts: act and fc1_saved hold one run of rows at a time, gone after the last chunk:
  // the backward makes its own)

  double aux_loss() const override { return gating.aux_loss; }
  double z_loss() const override { return gating.z_loss(); }
  int64_t expert_rows() const override { return local.rows(); }
  const Routing& routing() const override { return gating.routing; }
  int64_t held_bytes() const override {
    return u_at.bytes() + act.bytes() + static_cast<int64_t>((fc1_saved.size() + out.size()) * sizeof(float));
  }
};

struct BackwardPass {
  const float* dy = nullptr;  // [T, M] (the same on every rank of the group)
  float* dx = nullptr;        // [T, M]
  std::vector<float> dgate;   // [T, k] (dgate, then reduce_dgate)
  ScratchBuffer<float> dx_gate;             // [T, M] the gate's share of dx (gate_bwd)
  ScratchBuffer<float> dy_rows, dhpre, du;  // [rows, M|H1|M] canonical order (expert_dgrad)
  // recompute_experts: the experts' saved values and activations made again from their inputs
  ScratchBuffer<float> fc1_saved;           // [rows, H1] canonical order (expert_dgrad)
  RowBuffer act;                            // [rows, H]
};

PpmoeRows measured_rows(const MoeShape& shape, const LocalRows& local, int degree) {
  PpmoeRows r;
  r.shape = shape;
  r.degree = degree;
  const int El = shape.local_experts();
  for (int c = 0; c < degree; ++c) {
    const int64_t t0 = ppmoe_chunk_begin(shape.tokens, degree, c), t1 = ppmoe_chunk_begin(shape.tokens, degree, c + 1);
    int64_t rows = 0;
    for (int le = 0; le < El; ++le)
      for (int j = 0; j < shape.top_k; ++j) {
        auto [a, b] = local.rows_in(le, j, t0, t1);
        rows += b - a;
      }
    r.chunk_rows.push_back(rows);
    r.chunk_tokens.push_back(t1 - t0);
  }
  return r;
}

class PpmoeLayer final : public MoeLayer {
 public:
  PpmoeLayer(const PpmoeStrategy& strategy, const MoeShape& shape, Communicator& group, Backend& backend)
      : strategy_(strategy), shape_(shape), group_(group), backend_(backend), w_(shape) {
    shape_.validate();
    PM_CHECK(shape_.ranks == group.size(), "a layer for {} ranks on a group of {}", shape_.ranks, group.size());
    for (int le = 0; le < shape_.local_experts(); ++le) packed_.experts.push_back(backend.new_packed_expert(shape_.activation, shape_.precision));
  }

  const MoeStrategy& strategy() const override { return strategy_; }
  const MoeShape& shape() const override { return shape_; }
  int first_expert() const override { return group_.rank() * shape_.local_experts(); }
  std::vector<Parameter> parameters() override { return w_.parameters(true); }
  void init_parameters(uint64_t seed) override { w_.init(seed, shape_, first_expert(), true); }

  void set_inference() override { inference_ = true; }
  // The forward keeps only the experts' inputs; the backward makes the rest again.
  bool recomputes() const { return shape_.recompute_experts && !inference_; }
  void set_capacity_factor(double capacity_factor) override {
    MoeShape s = shape_;
    s.capacity_factor = capacity_factor;
    s.validate();
    shape_ = s;
  }
  void offload_experts(std::shared_ptr<const ExpertStore>, int, OffloadMode) override {
    PM_REQUIRE(false, "offloading experts needs the expert-parallel strategy (ep), not {}", strategy_.name());
  }
  int64_t weight_packings() const override { return packed_.packings; }
  const ExpertCache* expert_cache() const override { return nullptr; }

  void set_degrees(int forward_degree, int backward_degree) override { degrees_.set(forward_degree, backward_degree); }
  int forward_degree() const override { return degrees_.forward; }
  int backward_degree() const override { return degrees_.backward; }

  PassTasks plan_pass(TaskGraph& graph, const MoePass& pass, int degree, bool forward) const override {
    const auto* f = dynamic_cast<const ForwardPass*>(&pass);
    PM_CHECK(f != nullptr, "planning from a pass that is not a PPMoE forward");
    const PpmoeRows rows = measured_rows(shape_.with_tokens(f->tokens), f->local, degree);
    return forward ? append_ppmoe_forward(graph, {}, rows, nullptr) : append_ppmoe_backward(graph, {}, rows, nullptr);
  }

  MoeForward append_forward(TaskGraph& graph, const std::vector<int>& after, const float* x, int64_t tokens,
                            float* y, const Between& between) override;
  PassTasks append_backward(TaskGraph& graph, const std::vector<int>& after, const MoePass& pass, const float* dy,
                            float* dx, RouterLossGrads loss_grads, const Between& between) override;

 private:
  // The group's sum of each rank's share of the outputs (or input gradients), in place: in a bf16
  // layer as bf16 on the wire, each share rounded and summed in float32 in rank order (the
  // all-to-all layer's rows cross as bf16 too); else float32.
  void sum_over_group(float* data, int64_t n) {
    if (shape_.precision == Precision::bf16)
      allreduce_sum_bf16_wire(group_, data, n);
    else
      group_.allreduce(data, data, n, DType::f32, ReduceOp::sum);
  }

  void check_degrees(const MoeShape& shape) const {
    const int d = std::max(degrees_.forward, degrees_.backward);
    PM_REQUIRE(d <= shape.tokens, "ppmoe chunks the tokens: degree {} is more than the {} tokens", d, shape.tokens);
  }

  const PpmoeStrategy& strategy_;
  MoeShape shape_;
  Communicator& group_;
  Backend& backend_;
  LayerWeights w_;
  PipelineDegrees degrees_;
  PackedExperts packed_;  // this rank's experts, packed for the passes
  bool inference_ = false;  // set_inference
  std::shared_ptr<ForwardPass> last_forward_;
  std::shared_ptr<BackwardPass> last_backward_;
};

MoeForward PpmoeLayer::append_forward(TaskGraph& graph, const std::vector<int>& after, const float* x, int64_t tokens,
                                      float* y, const Between& between) {
  PM_REQUIRE(tokens > 0, "number of tokens must be positive, got {}", tokens);
  const MoeShape shape = shape_.with_tokens(tokens);
  check_degrees(shape);
  std::shared_ptr<ForwardPass> p = reuse_pass(last_forward_);
  p->x = x;
  p->y = y;
  p->tokens = tokens;
  const int64_t M = shape.model_dim, H = shape.hidden, H1 = shape.fc1_width();
  const int degree = degrees_.forward, k = shape.top_k, El = shape.local_experts();
  auto tasks = std::make_shared<PassTasks>();

  PpmoeForwardSteps steps;
  steps.gate = [this, p, shape, tasks, &graph, degree, M, H, H1] {
    p->gating = gate_forward(backend_, p->x, w_.wg.f32(), p->tokens, shape,
                             shape.balance_bias ? w_.router_bias.f32() : nullptr,
                             inference_ ? RouterLosses::skip : RouterLosses::compute);
    p->local = local_rows(p->gating.routing, first_expert(), shape.local_experts());
    const int64_t rows = p->local.rows();
    // the experts read their inputs in x, where every rank has them (a bf16 expert's GEMMs round
    // them as they pack them: the bits of a copy rounded to bf16)
    p->u_at.resize(rows, Precision::fp32);
    // recomputed in the backward: room for the longest run of rows, what the second GEMM reads
    int64_t kept_rows = rows;
    if (recomputes()) {
      kept_rows = 0;
      for (int c = 0; c < degree; ++c)
        for (int le = 0; le < shape.local_experts(); ++le)
          for (int j = 0; j < shape.top_k; ++j) {
            auto [a, b] = p->local.rows_in(le, j, ppmoe_chunk_begin(p->tokens, degree, c),
                                           ppmoe_chunk_begin(p->tokens, degree, c + 1));
            kept_rows = std::max(kept_rows, b - a);
          }
    }
    p->fc1_saved.resize(kept_rows * H1);
    p->act.resize(kept_rows, H, shape.precision);
    p->out.resize(rows * M);
    set_ppmoe_forward_work(graph, *tasks, measured_rows(shape, p->local, degree));
  };
  steps.pack_weights = [this] { w_.pack_forward(backend_, shape_, packed_); };
  steps.expert = [this, p, degree, M, H, H1, k, El](int c) {
    const int64_t t0 = ppmoe_chunk_begin(p->tokens, degree, c), t1 = ppmoe_chunk_begin(p->tokens, degree, c + 1);
    for (int le = 0; le < El; ++le)
      for (int j = 0; j < k; ++j) {
        auto [a, b] = p->local.rows_in(le, j, t0, t1);
        if (a == b) continue;
        for (int64_t row = a; row < b; ++row) p->u_at.set(row, p->x + p->local.token[row] * M);
        const int64_t s = recomputes() ? 0 : a;  // recomputed: the run's rows from the top
        backend_.expert_forward(packed_[le], b - a, M, H, p->u_at.from(a), &p->fc1_saved[s * H1], p->act.out(s), &p->out[a * M],
                                inference_ || recomputes() ? ForwardFor::inference : ForwardFor::backward);
      }
    if (recomputes() && c == degree - 1) {  // the backward makes its own
      p->act.release();
      release(p->fc1_saved);
    }
    // this rank's share of the chunk's outputs: its choices in order, the others skipped
    backend_.combine_rows(p->out.data(), p->gating.gate.data() + t0 * k, t1 - t0, M, k, p->local.positions.data() + t0 * k,
                          p->y + t0 * M);
  };
  steps.reduce = [this, p, degree, M](int c) {
    const int64_t t0 = ppmoe_chunk_begin(p->tokens, degree, c), t1 = ppmoe_chunk_begin(p->tokens, degree, c + 1);
    sum_over_group(p->y + t0 * M, (t1 - t0) * M);
  };

  *tasks = append_ppmoe_forward(graph, after, balanced_ppmoe_rows(shape, degree), &steps, between);
  return {*tasks, p};
}

PassTasks PpmoeLayer::append_backward(TaskGraph& graph, const std::vector<int>& after, const MoePass& pass,
                                      const float* dy, float* dx, RouterLossGrads loss_grads, const Between& between) {
  const auto* f = dynamic_cast<const ForwardPass*>(&pass);
  PM_CHECK(f != nullptr, "backward of a pass that is not a PPMoE forward");
  PM_REQUIRE(!inference_, "a backward of a layer set for inference");
  std::shared_ptr<ForwardPass> fp = std::const_pointer_cast<ForwardPass>(f->shared_from_this());
  std::shared_ptr<BackwardPass> b = reuse_pass(last_backward_);
  b->dy = dy;
  b->dx = dx;
  const MoeShape shape = shape_.with_tokens(fp->tokens);
  const int64_t M = shape.model_dim, H = shape.hidden, H1 = shape.fc1_width(), T = fp->tokens;
  const int degree = degrees_.backward, k = shape.top_k, El = shape.local_experts();
  auto tasks = std::make_shared<PassTasks>();

  PpmoeBackwardSteps steps;
  steps.dgate = [this, fp, b, shape, tasks, &graph, degree, M, H1, T, k] {
    const int64_t rows = fp->local.rows();
    b->dy_rows.resize(rows * M);
    b->dhpre.resize(rows * H1);
    b->du.resize(rows * M);
    if (recomputes()) {
      b->fc1_saved.resize(rows * H1);
      b->act.resize(rows, shape.hidden, shape.precision);
    }
    // d loss / d gate value = <dy_t, FFN_e(x_t)> for the choices this rank computed; 0 for the others
    b->dgate.resize(T * k);
    backend_.combine_rows_backward_gate(b->dy, fp->out.data(), T, M, k, fp->local.positions.data(), b->dgate.data());
    set_ppmoe_backward_work(graph, *tasks, measured_rows(shape, fp->local, degree));
  };
  steps.pack_weights = [this] { w_.pack_backward(backend_, shape_, packed_); };
  // each choice has one owner and zeros elsewhere: the sum is exact
  steps.reduce_dgate = [this, b] {
    group_.allreduce(b->dgate.data(), b->dgate.data(), static_cast<int64_t>(b->dgate.size()), DType::f32, ReduceOp::sum);
  };
  steps.gate_backward = [this, fp, b, shape, loss_grads, M, T] {
    b->dx_gate.resize(T * M);
    gate_backward(backend_, fp->x, w_.wg.f32(), shape, fp->gating, b->dgate.data(), loss_grads, w_.dwg.f32(),
                  b->dx_gate.data());
  };
  steps.expert_dgrad = [this, fp, b, degree, M, H, H1, k, El](int c) {
    const int64_t t0 = ppmoe_chunk_begin(fp->tokens, degree, c), t1 = ppmoe_chunk_begin(fp->tokens, degree, c + 1);
    backend_.combine_rows_backward_slots(b->dy + t0 * M, fp->gating.gate.data() + t0 * k, t1 - t0, M, k,
                                         fp->local.positions.data() + t0 * k, b->dy_rows.data());
    for (int le = 0; le < El; ++le)
      for (int j = 0; j < k; ++j) {
        auto [first, last] = fp->local.rows_in(le, j, t0, t1);
        if (first == last) continue;
        const float* saved = fp->fc1_saved.data();
        if (recomputes()) {  // the first GEMM and the activation again, on the inputs the forward kept
          backend_.expert_forward(packed_[le], last - first, M, H, fp->u_at.from(first), &b->fc1_saved[first * H1],
                                  b->act.out(first), nullptr, ForwardFor::backward);
          saved = b->fc1_saved.data();
        }
        std::vector<const float*> saved_rows;
        for (int64_t row = first; row < last; ++row) saved_rows.push_back(saved + row * H1);
        backend_.expert_backward_input(packed_[le], last - first, M, H, &b->dy_rows[first * M], saved_rows.data(),
                                       &b->dhpre[first * H1], &b->du[first * M]);
      }
  };
  steps.sum_dx = [this, fp, b, degree, M, k, El](int c) {
    const int64_t t0 = ppmoe_chunk_begin(fp->tokens, degree, c), t1 = ppmoe_chunk_begin(fp->tokens, degree, c + 1);
    const Routing& r = fp->gating.routing;
    for (int64_t t = t0; t < t1; ++t) {
      // the gate's share is added by the rank that owns the token's first kept choice (rank 0 when
      // none is kept), first: the one-rank layer's order of summation
      int owner = 0;
      for (int j = 0; j < k; ++j)
        if (r.slot[t * k + j] >= 0) {
          owner = r.expert[t * k + j] / El;
          break;
        }
      if (owner == group_.rank()) std::memcpy(b->dx + t * M, &b->dx_gate[t * M], M * sizeof(float));
      else std::memset(b->dx + t * M, 0, M * sizeof(float));
    }
    backend_.dispatch_rows_backward(b->du.data(), t1 - t0, M, k, fp->local.positions.data() + t0 * k, b->dx + t0 * M);
  };
  steps.reduce_dx = [this, fp, b, degree, M](int c) {
    const int64_t t0 = ppmoe_chunk_begin(fp->tokens, degree, c), t1 = ppmoe_chunk_begin(fp->tokens, degree, c + 1);
    sum_over_group(b->dx + t0 * M, (t1 - t0) * M);
  };
  steps.expert_wgrad = [this, fp, b, M, H, H1, k, El] {
    for (int le = 0; le < El; ++le) {
      ExpertRows rows;
      std::vector<int64_t> positions;
      for (int64_t row = fp->local.run_first[le * k]; row < fp->local.run_first[(le + 1) * k]; ++row) {
        positions.push_back(row);
        rows.dhpre.push_back(&b->dhpre[row * H1]);
        rows.dy.push_back(&b->dy_rows[row * M]);
      }
      fp->u_at.add_rows(positions, rows.u, rows.u_bf16);
      (recomputes() ? b->act : fp->act).add_rows(positions, rows.act, rows.act_bf16);
      backend_.expert_weight_grads(w_.grads_of(shape_, le), shape_.activation, shape_.precision, M, H, rows);
    }
    // after every expert_dgrad (its dependencies), their only other reader
    for (ScratchBuffer<float>* done : {&b->dy_rows, &b->dhpre, &b->fc1_saved}) release(*done);
    b->act.release();
  };

  *tasks = append_ppmoe_backward(graph, after, balanced_ppmoe_rows(shape, degree), &steps, between);
  return *tasks;
}

}  // namespace

PassTasks PpmoeStrategy::plan_forward(TaskGraph& graph, const std::vector<int>& after, const MoeShape& shape,
                                      int degree, const Between& between) const {
  return append_ppmoe_forward(graph, after, balanced_ppmoe_rows(shape, degree), nullptr, between);
}

PassTasks PpmoeStrategy::plan_backward(TaskGraph& graph, const std::vector<int>& after, const MoeShape& shape,
                                       int degree, const Between& between) const {
  return append_ppmoe_backward(graph, after, balanced_ppmoe_rows(shape, degree), nullptr, between);
}

std::unique_ptr<MoeLayer> PpmoeStrategy::make_layer(const MoeShape& shape, Communicator& group, Backend& backend) const {
  return std::make_unique<PpmoeLayer>(*this, shape, group, backend);
}

}  // namespace pm
