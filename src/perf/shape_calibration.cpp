#include "perf/shape_calibration.h"

#include <algorithm>

#include "core/stats.h"
#include "moe/layer_graph.h"
#include "moe/moe_layer.h"
#include "perf/linear_fit.h"
#include "sched/executor.h"

namespace pm {

double calibration_units(TaskKind kind, const TaskWork& work) {
  switch (kind) {
    case TaskKind::expert_fwd:
    case TaskKind::expert_dgrad: return work.flops;
    default: return 0;  // the same work at every degree
  }
}

double ShapeCalibration::predict(const Task& task, const PerfProfile& profile) const {
  const KindCost& k = kinds[static_cast<int>(task.kind)];
  if (!k.measured) return profile.predict(task);
  return k.fixed + k.per_unit * calibration_units(task.kind, task.work);
}

ShapeCalibration fit_calibration(const std::vector<TaskSample>& samples) {
  ShapeCalibration c;
  for (int kind = 0; kind < kNumTaskKinds; ++kind) {
    std::vector<std::vector<double>> X;
    std::vector<double> y, per_unit;
    double least = 0, most = 0;  // smallest and largest units seen
    for (const TaskSample& s : samples) {
      if (static_cast<int>(s.kind) != kind || s.lane != Lane::compute) continue;
      double units = calibration_units(s.kind, s.work);
      X.push_back({1.0, units});
      y.push_back(s.seconds);
      if (units > 0) per_unit.push_back(s.seconds / units);
      least = y.size() == 1 ? units : std::min(least, units);
      most = std::max(most, units);
    }
    if (y.empty()) continue;
    ShapeCalibration::KindCost& k = c.kinds[kind];
    k.measured = true;
    k.samples = static_cast<int>(y.size());
    if (most == 0) {
      k.fixed = summarize(y).median;
      continue;
    }
    if (least > 0 && most > 1.5 * least) {
      // sizes far enough apart to tell a per-chunk cost from a per-unit one
      LinearFit fit = fit_nonnegative(X, y);
      k.fixed = fit.coef[0];
      k.per_unit = fit.coef[1];
    } else {
      k.per_unit = summarize(per_unit).median;  // one size only: proportional
    }
  }
  return c;
}

ShapeCalibration calibrate_layer(Communicator& comm, MoeLayer& layer, const float* x, const float* dy,
                                 int64_t tokens, int passes) {
  Executor serial(Executor::Mode::serial);
  Executor& previous = layer.executor();
  const int fwd_degree = layer.forward_degree(), bwd_degree = layer.backward_degree();
  const int64_t M = layer.config().model_dim;
  std::vector<float> y(tokens * M), dx(tokens * M);
  const int64_t capacity = expert_capacity(layer.config().top_k, layer.config().capacity_factor, tokens,
                                           layer.config().experts);
  std::vector<int> degrees = {1};
  if (capacity > 1) degrees.push_back(static_cast<int>(std::min<int64_t>(4, capacity)));
  std::vector<TaskSample> samples;
  layer.use_executor(serial);
  for (int degree : degrees) {
    layer.set_degrees(degree, degree);
    for (int it = 0; it <= passes; ++it) {
      comm.barrier();
      layer.forward(x, tokens, y.data());
      TaskGraph fwd = build_forward_graph(layer.last_sizes(true), nullptr);
      ExecutorStats fwd_stats = serial.last_stats();
      layer.backward(dy, dx.data(), 0.0f);
      TaskGraph bwd = build_backward_graph(layer.last_sizes(false), nullptr);
      if (it == 0) continue;  // warms caches and buffers
      for (auto* taken : {&fwd, &bwd}) {
        std::vector<TaskSample> s =
            serial_task_samples(comm, *taken, taken == &fwd ? fwd_stats : serial.last_stats());
        samples.insert(samples.end(), s.begin(), s.end());
      }
    }
  }
  layer.use_executor(previous);
  layer.set_degrees(fwd_degree, bwd_degree);
  layer.zero_grads();
  return fit_calibration(samples);
}

}  // namespace pm
