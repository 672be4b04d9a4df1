#include "apps/pipemoe/layer_runner.h"

#include <algorithm>

#include "core/rng.h"
#include "sched/executor.h"

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

PassTimes run_passes(Communicator& comm, MoeLayer& layer, LayerData& d, int warmup, int iters, float aux_coef) {
  PassTimes t;
  for (int it = 0; it < warmup + iters; ++it) {
    comm.barrier();
    layer.zero_grads();
    layer.forward(d.x.f32(), d.x.dim(0), d.y.f32());
    double comm_cpu = layer.executor().last_stats().comm_cpu_s;
    layer.backward(d.dy.f32(), d.dx.f32(), aux_coef);
    comm_cpu += layer.executor().last_stats().comm_cpu_s;
    if (it < warmup) continue;
    const LayerRunStats& f = layer.forward_stats();
    const LayerRunStats& b = layer.backward_stats();
    t.forward.push_back(f.wall_ms);
    t.backward.push_back(b.wall_ms);
    t.comm_busy.push_back(f.comm_ms + b.comm_ms);
    t.comm_cpu.push_back(comm_cpu * 1e3);
    t.expert.push_back(f.expert_ms + b.expert_ms);
    t.expert_gflops.push_back((f.expert_flops + b.expert_flops) / (f.expert_ms + b.expert_ms) / 1e6);
  }
  return t;
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

LanesAlone time_lanes_alone(Communicator& comm, MoeLayer& layer, LayerData& d, int iters, float aux_coef,
                            int warmup) {
  Executor serial(Executor::Mode::serial);
  Executor& previous = layer.executor();
  layer.use_executor(serial);
  std::vector<LanesAlone> samples;
  for (int it = 0; it < warmup + iters; ++it) {
    comm.barrier();
    layer.zero_grads();
    layer.forward(d.x.f32(), d.x.dim(0), d.y.f32());
    LayerRunStats f = layer.forward_stats();
    layer.backward(d.dy.f32(), d.dx.f32(), aux_coef);
    const LayerRunStats& b = layer.backward_stats();
    if (it < warmup) continue;
    // a collective's time on the last rank to arrive is the transfer alone; the others waited too
    double c[2] = {f.comm_ms, b.comm_ms}, m[2] = {f.compute_ms, b.compute_ms};
    comm.allreduce(c, c, 2, DType::f64, ReduceOp::min);
    comm.allreduce(m, m, 2, DType::f64, ReduceOp::max);
    samples.push_back({c[0], c[1], m[0], m[1]});
  }
  layer.use_executor(previous);
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
