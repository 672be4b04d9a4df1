#include "moe/moe_layer.h"

#include "core/error.h"
#include "moe/expert_parallel.h"
#include "moe/ppmoe.h"
#include "sched/trace.h"

namespace pm {

const MoeStrategy& moe_strategy(const std::string& name) {
  static const ExpertParallelStrategy ep;
  static const PpmoeStrategy ppmoe;
  if (name == ppmoe.name()) return ppmoe;
  PM_REQUIRE(name == ep.name(), "unknown MoE strategy '{}' (known: {}, {})", name, ep.name(), ppmoe.name());
  return ep;
}

void PipelineDegrees::set(int forward_degree, int backward_degree) {
  PM_REQUIRE(forward_degree >= 1 && backward_degree >= 1,
             "pipeline degree must be at least 1, got {} (forward) and {} (backward)", forward_degree, backward_degree);
  forward = forward_degree;
  backward = backward_degree;
}

void MoeLayer::zero_grads() {
  for (Parameter& p : parameters()) p.grad->zero();
}

namespace {

LayerRunStats stats_of(const ExecutorStats& s, double expert_flops) {
  LayerRunStats out;
  out.wall_ms = s.wall_s * 1e3;
  out.comm_ms = s.busy(lanes::comm) * 1e3;
  out.compute_ms = s.busy(lanes::compute) * 1e3;
  out.expert_ms = (s.cost_busy("expert_fwd") + s.cost_busy("expert_dgrad") + s.cost_busy("expert_wgrad")) * 1e3;
  out.comm_cpu_ms = s.comm_cpu_s * 1e3;
  out.expert_flops = expert_flops;
  return out;
}

void run_alone(Executor& executor, TaskGraph& graph, Trace* trace, const char* category) {
  if (trace) trace->set_category(category);
  executor.run(graph, trace);
}

}  // namespace

std::shared_ptr<MoePass> forward_alone(MoeLayer& layer, Executor& executor, const float* x, int64_t tokens, float* y,
                                       Trace* trace, LayerPassRun* run, const BesideLayer& beside) {
  TaskGraph graph;
  MoeForward f = layer.append_forward(graph, {}, x, tokens, y, beside.between);
  if (beside.finish) beside.finish(graph, f.tasks);
  run_alone(executor, graph, trace, "forward");
  if (run) {
    // the forward's two GEMMs
    const MoeShape& s = layer.shape();
    run->stats = stats_of(executor.last_stats(), static_cast<double>(f.pass->expert_rows()) * s.expert_flops_per_row());
    run->records = executor.last_stats().records;
    run->graph = std::move(graph);
  }
  return f.pass;
}

void backward_alone(MoeLayer& layer, Executor& executor, const MoePass& pass, const float* dy, float* dx,
                    RouterLossGrads loss_grads, Trace* trace, LayerPassRun* run, const BesideLayer& beside) {
  TaskGraph graph;
  PassTasks tasks = layer.append_backward(graph, {}, pass, dy, dx, loss_grads, beside.between);
  if (beside.finish) beside.finish(graph, tasks);
  run_alone(executor, graph, trace, "backward");
  if (run) {
    // input gradients (two GEMMs) and weight gradients (two GEMMs)
    const MoeShape& s = layer.shape();
    run->stats = stats_of(executor.last_stats(), 2.0 * static_cast<double>(pass.expert_rows()) * s.expert_flops_per_row());
    run->records = executor.last_stats().records;
    run->graph = std::move(graph);
  }
}

}  // namespace pm
