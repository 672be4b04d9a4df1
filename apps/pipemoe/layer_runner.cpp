#include "apps/pipemoe/layer_runner.h"

#include <algorithm>

#include "core/rng.h"

namespace pm::cli {

LayerData make_layer_data(int64_t tokens, int64_t model_dim, uint64_t seed, int rank) {
  LayerData d;
  d.x = Tensor::empty({tokens, model_dim});
  d.dy = Tensor::empty({tokens, model_dim});
  d.y = Tensor::zeros({tokens, model_dim});
  d.dx = Tensor::zeros({tokens, model_dim});
  Rng(seed, stream_id(1, rank)).fill_normal(d.x.f32(), d.x.numel(), 0.0f, 1.0f);
  Rng(seed, stream_id(7, rank)).fill_normal(d.dy.f32(), d.dy.numel(), 0.0f, 1.0f);
  return d;
}

void add_shared_expert(LayerData& d, std::shared_ptr<SharedExpert> shared) {
  d.shared = std::move(shared);
  d.shared_out = Tensor::zeros(d.x.shape());
  d.shared_dx = Tensor::zeros(d.x.shape());
}

namespace {

// The shared expert's tasks: its FFN (or its backward) on the compute lane at the layer's seam,
// while the rows are on the wire, then its output (input gradient) added to the layer's.
BesideLayer shared_tasks(LayerData& d, bool forward) {
  if (!d.shared) return {};
  SharedExpert* se = d.shared.get();
  const int64_t T = d.x.dim(0), M = d.x.dim(1);
  const double flops = 2.0 * T * M * (fc1_width(se->activation(), se->hidden()) + se->hidden()) * (forward ? 1 : 2);
  auto task = std::make_shared<int>(-1);
  BesideLayer b;
  b.between = [&d, se, task, forward, flops](TaskGraph& g) {
    auto run = forward ? std::function<void()>([&d, se] { se->forward(d.x.f32(), d.x.dim(0), d.shared_out.f32()); })
                       : std::function<void()>([&d, se] {
                           se->backward(d.x.f32(), d.dy.f32(), d.x.dim(0), d.shared_dx.f32());
                         });
    *task = g.add({forward ? "shared_expert" : "shared_expert_bwd", lanes::compute, "shared_expert", -1,
                   TaskWork{4, flops, 0}, {}, run});
  };
  b.finish = [&d, se, task, forward, T, M](TaskGraph& g, const PassTasks& layer) {
    float* out = forward ? d.y.f32() : d.dx.f32();
    const float* mine = forward ? d.shared_out.f32() : d.shared_dx.f32();
    g.add({"shared_add", lanes::compute, "other", -1, TaskWork{1, static_cast<double>(T * M), 12.0 * T * M},
           {layer.output, *task}, [se, out, mine, T, M] { se->backend().axpy(1.0f, mine, out, T * M); }});
  };
  return b;
}

}  // namespace

namespace {

void mark_weights_changed(MoeLayer& layer, LayerData& d) {
  for (Parameter& p : layer.parameters()) p.value->mark_changed();
  if (d.shared)
    for (Parameter& p : d.shared->parameters()) p.value->mark_changed();
}

}  // namespace

PassTimes run_passes(Communicator& comm, MoeLayer& layer, Executor& executor, LayerData& d, int warmup, int iters,
                     RouterLossGrads loss_grads, Trace* trace, const PassObserver& observe) {
  PassTimes t;
  int64_t packings_before = 0;
  for (int it = 0; it < warmup + iters; ++it) {
    if (it == warmup) packings_before = layer.weight_packings();
    Trace* traced = it < warmup ? nullptr : trace;
    comm.barrier();
    layer.zero_grads();
    if (d.shared) d.shared->zero_grads();
    if (d.weights_change) mark_weights_changed(layer, d);
    LayerPassRun f, b;
    std::shared_ptr<MoePass> pass =
        forward_alone(layer, executor, d.x.f32(), d.x.dim(0), d.y.f32(), traced, &f, shared_tasks(d, true));
    const int64_t held_bytes = pass->held_bytes();
    backward_alone(layer, executor, *pass, d.dy.f32(), d.dx.f32(), loss_grads, traced, &b, shared_tasks(d, false));
    if (it < warmup) continue;
    t.held_bytes = held_bytes;
    if (observe) observe(f, b);
    t.expert_rows = pass->expert_rows();
    t.dispatch_rows_sent = pass->dispatch_rows_sent();
    t.dispatch_choices_sent = pass->dispatch_choices_sent();
    t.grad_dispatch_rows_sent = layer.grad_dispatch_rows_sent();
    t.grad_dispatch_choices_sent = layer.grad_dispatch_choices_sent();
    t.forward.push_back(f.stats.wall_ms);
    t.backward.push_back(b.stats.wall_ms);
    t.comm_busy.push_back(f.stats.comm_ms + b.stats.comm_ms);
    t.comm_cpu.push_back(f.stats.comm_cpu_ms + b.stats.comm_cpu_ms);
    t.expert.push_back(f.stats.expert_ms + b.stats.expert_ms);
    t.expert_gflops.push_back((f.stats.expert_flops + b.stats.expert_flops) / (f.stats.expert_ms + b.stats.expert_ms) / 1e6);
  }
  t.weight_packings = layer.weight_packings() - packings_before;
  return t;
}

std::shared_ptr<MoePass> run_pass(MoeLayer& layer, Executor& executor, LayerData& d, RouterLossGrads loss_grads) {
  layer.zero_grads();
  if (d.shared) d.shared->zero_grads();
  std::shared_ptr<MoePass> pass =
      forward_alone(layer, executor, d.x.f32(), d.x.dim(0), d.y.f32(), nullptr, nullptr, shared_tasks(d, true));
  backward_alone(layer, executor, *pass, d.dy.f32(), d.dx.f32(), loss_grads, nullptr, nullptr, shared_tasks(d, false));
  return pass;
}

Summary slowest_rank(Communicator& comm, const std::vector<double>& values) {
  Summary s = summarize(values);
  double v[3] = {s.min, s.median, s.max};
  comm.allreduce(v, v, 3, DType::f64, ReduceOp::max);
  return {v[0], v[1], v[2]};
}

double LanesAlone::bound_ms() const { return std::max(comm_ms(), compute_ms()); }

double LanesAlone::pass_bound_ms() const {
  return std::max(comm_fwd_ms, compute_fwd_ms) + std::max(comm_bwd_ms, compute_bwd_ms);
}

LanesAlone time_lanes_alone(Communicator& comm, MoeLayer& layer, LayerData& d, int iters, RouterLossGrads loss_grads,
                            int warmup) {
  Executor serial(Executor::Mode::serial);
  std::vector<LanesAlone> samples;
  for (int it = 0; it < warmup + iters; ++it) {
    comm.barrier();
    layer.zero_grads();
    if (d.shared) d.shared->zero_grads();
    LayerPassRun fr, br;
    std::shared_ptr<MoePass> pass =
        forward_alone(layer, serial, d.x.f32(), d.x.dim(0), d.y.f32(), nullptr, &fr, shared_tasks(d, true));
    backward_alone(layer, serial, *pass, d.dy.f32(), d.dx.f32(), loss_grads, nullptr, &br, shared_tasks(d, false));
    const LayerRunStats& f = fr.stats;
    const LayerRunStats& b = br.stats;
    if (it < warmup) continue;
    // a collective's time on the last rank to arrive is the transfer alone; the others waited too
    double c[2] = {f.comm_ms, b.comm_ms}, m[2] = {f.compute_ms, b.compute_ms};
    comm.allreduce(c, c, 2, DType::f64, ReduceOp::min);
    comm.allreduce(m, m, 2, DType::f64, ReduceOp::max);
    samples.push_back({c[0], c[1], m[0], m[1]});
  }
  return median_lanes(samples);
}

LanesAlone median_lanes(const std::vector<LanesAlone>& samples) {
  auto median = [&](double LanesAlone::*field) {
    std::vector<double> v;
    for (const LanesAlone& s : samples) v.push_back(s.*field);
    return summarize(v).median;
  };
  return {median(&LanesAlone::comm_fwd_ms), median(&LanesAlone::comm_bwd_ms), median(&LanesAlone::compute_fwd_ms),
          median(&LanesAlone::compute_bwd_ms)};
}

}  // namespace pm::cli
