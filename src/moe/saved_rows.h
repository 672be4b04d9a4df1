// Rows a forward pass keeps for its experts' weight gradients that only GEMMs read: the inputs u
// [rows, M] and the activations act [rows, H]. A bf16 layer keeps them in bf16: its bf16 GEMMs
// round them to bf16 anyway, so every result keeps its bits, in half the bytes. An fp32 layer
// keeps floats. (The pre-activations stay fp32: the activation's backward reads them exactly.)
//
//   SavedRows u;
//   u.resize(rows, M, shape.precision);
//   u.copy_rows_from(backend, recv, M, runs);          // rounded to bf16 in a bf16 layer
//   backend.expert_forward(packed, n, M, H, u.in(first), hpre, act.out(first), y);
//   u.add_rows(positions, er.u, er.u_bf16);            // ExpertRows for the weight gradients
#pragma once

#include <cstdint>
#include <vector>

#include "kernels/backend.h"

namespace pm {

class SavedRows {
 public:
  explicit SavedRows(Backend& backend = cpu_backend())
      : f32_(UninitAllocator<float>(backend)), bf16_(UninitAllocator<uint16_t>(backend)) {}
  // rows x width values of `precision` (the old values are not kept).
  void resize(int64_t rows, int64_t width, Precision precision);
  RowsIn in(int64_t i) const;  // row i, to read (a GEMM's input)
  RowsOut out(int64_t i);      // row i, to write
  // Rows of float `src` (width floats each) into these rows, run by run.
  void copy_rows_from(Backend& backend, const float* src, const std::vector<RowRun>& runs);
  // Pointers to the rows at `positions`, appended to f32 or bf16 by the rows' type.
  void add_rows(const std::vector<int64_t>& positions, std::vector<const float*>& f32,
                std::vector<const uint16_t*>& bf16) const;
  int64_t bytes() const;

 private:
  Precision precision_ = Precision::fp32;
  int64_t width_ = 0;
  ScratchBuffer<float> f32_;  // every row written before it is read
  ScratchBuffer<uint16_t> bf16_;
};

}  // namespace pm
