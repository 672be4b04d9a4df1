// Per-shape calibration: what one layer shape's tasks take alone on this cluster, measured.
//
// A profile's task models are fitted over a handful of shapes, but GEMM speed depends on the shape
// (measured: the fitted expert models were 10-25% off on other shapes), and a planner that gets
// the compute-to-communication balance wrong picks the wrong degree. So before choosing, the
// layer runs a few passes with the lanes one after the other (serial executor) at degree 1 and at
// a higher degree, and each compute task kind gets its own model for this shape:
//   seconds = fixed + per_unit * units,
// units: flops for expert tasks, none for tasks whose work does not depend on the degree (gate,
// pack, weights, unpack, weight gradients: their measured time). The two degrees give each
// chunked kind a per-chunk cost. The rest still comes from the profile: the link (measured busy;
// in a serial pass it idles between transfers), how the lanes slow each other, the hand-off.
#pragma once

#include <array>
#include <cstdint>
#include <vector>

#include "perf/perf_profile.h"
#include "perf/serial_samples.h"

namespace pm {

class MoeLayer;

struct ShapeCalibration {
  struct KindCost {
    bool measured = false;
    double fixed = 0, per_unit = 0;
    int samples = 0;
  };
  std::array<KindCost, kNumTaskKinds> kinds;

  // Seconds the task takes alone: calibrated when its kind was measured, else the profile's model.
  double predict(const Task& task, const PerfProfile& profile) const;
};

// What a task's time is linear in, for calibration (see above).
double calibration_units(TaskKind kind, const TaskWork& work);

ShapeCalibration fit_calibration(const std::vector<TaskSample>& samples);

// Collective: `passes` serial passes (after one untimed) at degree 1 and at the higher degree
// min(4, capacity), on this rank's tokens x[tokens, M] and upstream gradient dy; fits. The layer's
// executor, degrees and gradients are as before (gradients are zeroed: call before training).
ShapeCalibration calibrate_layer(Communicator& comm, MoeLayer& layer, const float* x, const float* dy,
                                 int64_t tokens, int passes = 2);

}  // namespace pm
