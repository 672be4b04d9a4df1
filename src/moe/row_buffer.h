// Rows of `width` values in a precision: float32, or bf16 (their bit patterns). Two uses:
// - what a pass keeps for its experts' weight gradients that only GEMMs read, the inputs u and
//   activations act: a bf16 layer keeps them in bf16 (its bf16 GEMMs round them to bf16 anyway,
//   so every result keeps its bits, in half the bytes; the pre-activations stay fp32: the
//   activation's backward reads them exactly);
// - the all-to-all's buffers, in the wire's precision: a bf16 layer's rows are rounded once, as
//   they are packed, and travel, arrive and wait in bf16 (no staging copies).
//
//   RowBuffer u;
//   u.resize(rows, M, shape.precision);
//   u.copy_rows_from(backend, recv.in(0), runs);        // rounded or widened as the types need
//   backend.expert_forward(packed, n, M, H, u.in(first), fc1_saved, act.out(first), y);
//   u.add_rows(positions, er.u, er.u_bf16);             // ExpertRows for the weight gradients
#pragma once

#include <cstdint>
#include <vector>

#include "kernels/backend.h"

namespace pm {

class RowBuffer {
 public:
  explicit RowBuffer(Backend& backend = cpu_backend())
      : f32_(UninitAllocator<float>(backend)), bf16_(UninitAllocator<uint16_t>(backend)) {}
  // rows x width values of `precision`, not initialised (every row is written before it is read).
  void resize(int64_t rows, int64_t width, Precision precision);
  void release();  // gives the memory back (resize allocates again)
  RowsIn in(int64_t row) const;  // row `row`, to read
  RowsOut out(int64_t row);      // row `row`, to write
  // Rows of `src` (width values each, floats or bf16) into these rows, run by run.
  void copy_rows_from(Backend& backend, RowsIn src, const std::vector<RowRun>& runs);
  // The same from float rows, each written row scaled by scale[its row] (Backend::copy_rows_scaled).
  void copy_scaled_rows_from(Backend& backend, const float* src, const std::vector<RowRun>& runs, const float* scale);
  // Pointers to the rows at `positions`, appended to f32 or bf16 by the rows' type.
  void add_rows(const std::vector<int64_t>& positions, std::vector<const float*>& f32,
                std::vector<const uint16_t*>& bf16) const;
  Precision precision() const { return precision_; }
  int64_t width() const { return width_; }
  int64_t bytes() const;

 private:
  Precision precision_ = Precision::fp32;
  int64_t width_ = 0;
  ScratchBuffer<float> f32_;
  ScratchBuffer<uint16_t> bf16_;
};

}  // namespace pm
