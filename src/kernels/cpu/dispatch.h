// Dispatch and combine: moving token rows to expert slots and back, with their backwards.
//
// A routing gives, for each (token t, choice j), the row `position[t * k + j]` of a slot buffer
// where that choice's row lives, or -1 when the choice was dropped.
//   dispatch: slots[position] = x[t]                        (a scatter of copies)
//   combine:  y[t] = sum_j gate[t, j] * slots[position]     (a weighted gather), j in order
// Backwards:
//   dispatch: dx[t] += sum_j dslots[position]                (j in order)
//   combine:  dslots[position] = gate[t, j] * dy[t]       (combine_rows_backward_slots)
//             dgate[t, j] = <dy[t], slots[position]>      (combine_rows_backward_gate)
// The two halves of the combine's backward are separate: a pipelined layer writes dslots in the
// backward degree's layout while the forward's slots sit in the forward degree's layout.
// Slots may be bf16 rows (a bf16 layer's all-to-all buffers, kernels/backend.h RowsIn): written
// rounded to bf16, read widened; the arithmetic is the float version's on those values.
#pragma once

#include <cstdint>
#include <vector>

#include "kernels/backend.h"

namespace pm {

// x[T, M] -> slots[*, M]
void dispatch_rows(const float* x, int64_t T, int64_t M, int k, const int64_t* position, RowsOut slots);
// slots[*, M] -> y[T, M] (overwritten; tokens with no kept choice get zeros)
void combine_rows(RowsIn slots, const float* gate, int64_t T, int64_t M, int k,
                  const int64_t* position, float* y);

// dslots[*, M] -> dx[T, M] (added to what dx holds)
void dispatch_rows_backward(RowsIn dslots, int64_t T, int64_t M, int k, const int64_t* position,
                            float* dx);
// dy[T, M] -> dslots[*, M] (kept rows written)
// The same product by runs, from rows sent unscaled: dst[row] = dst_scale[row] * src[its src row]
// (the deduplicated backward dispatch's expert side; kernels/backend.h copy_rows_scaled).
void copy_rows_scaled(const float* src, RowsOut dst, int64_t M, const std::vector<RowRun>& runs, const float* dst_scale);
void combine_rows_backward_slots(const float* dy, const float* gate, int64_t T, int64_t M, int k,
                                 const int64_t* position, RowsOut dslots);
// dy[T, M], slots[*, M] -> dgate[T, k] (0 for dropped choices)
void combine_rows_backward_gate(const float* dy, RowsIn slots, int64_t T, int64_t M, int k,
                                const int64_t* position, float* dgate);

}  // namespace pm
