// Routing: which expert slot each token choice lands in, and where every row sits in the
// pipelined buffers.
//
// Capacity C = ceil(k * f * T / E) slots per expert for this rank's T tokens, evaluated in double
// as ((k * f) * T) / E. Slots fill choice by choice, then token by token (all first choices in
// token order, then all second choices); a choice whose expert is full is dropped (DropPolicy::
// position), or, with DropPolicy::probs, an expert asked for more than C keeps the C choices of the
// largest gate values and gives them their slots in that same order.
//
// Only filled slots travel and are computed. With pipeline degree r, the filled rows n of each
// (peer, local expert) block are split into r contiguous chunks (chunk_begin: even up to r = 2,
// then the two end chunks half the size of the others): every chunk's all-to-all is full width
// (all peers, all experts).
#pragma once

#include <cstdint>
#include <vector>

#include "kernels/backend.h"

namespace pm {

// Capacity factor 0 (as Tutel spells it) is dropless: k T slots, every choice finds one; only the
// filled slots travel and are computed, so the cost follows the real counts.
int64_t expert_capacity(int top_k, double capacity_factor, int64_t tokens, int experts);

// Where chunk `chunk` of `rows` rows begins (chunk == degree: the end). Tapered: from degree 3 on,
// the first and last chunks are half the size of the others, [1/2, 1, ..., 1, 1/2] / (degree - 1):
// the first chunk's all-to-all is what the experts wait for before they can start, and the last
// chunk's is what nothing overlaps at the end; halving them shortens both exposed ends.
inline int64_t chunk_begin(int64_t rows, int degree, int chunk) {
  if (degree < 3 || chunk == 0) return chunk == 0 ? 0 : rows * chunk / degree;
  if (chunk >= degree) return rows;
  return rows * (2 * chunk - 1) / (2 * (degree - 1));
}

// Which choices an expert over its capacity drops: the last in the filling order (GShard;
// Megatron-Core's "position"), or the ones with the smallest gate values (Megatron-Core's "probs":
// equal values keep the filling order).
enum class DropPolicy { position, probs };

// Slot assignment for this rank's tokens.
struct Routing {
  int64_t tokens = 0;
  int experts = 0;
  int top_k = 0;
  int64_t capacity = 0;
  std::vector<int32_t> expert;  // [tokens, top_k] chosen expert
  std::vector<int32_t> slot;    // [tokens, top_k] slot in that expert, -1 when dropped
  std::vector<int64_t> count;   // [experts] filled slots
  int64_t kept() const;         // choices that found a slot
};

// Fills slot and count from expert (which the gate chose) and capacity; DropPolicy::probs reads
// gate[tokens, top_k], the gate values.
void assign_slots(Routing& routing, DropPolicy policy = DropPolicy::position, const float* gate = nullptr);

// Where the rows of each (chunk, peer, local expert) block sit in a buffer.
//   wire order    [chunk][peer][local expert]: what one all-to-all per chunk sends or receives,
//                 each (chunk, peer) contiguous;
//   compute order [chunk][local expert][peer]: each (chunk, local expert) contiguous, one GEMM.
// With degree 1, compute order is the canonical layout [local expert][peer][row] used for weight
// gradients, whatever the degree that ran.
enum class BlockOrder { wire, compute };

struct BlockLayout {
  int degree = 1;
  int peers = 1;
  int local_experts = 1;
  BlockOrder order = BlockOrder::wire;
  std::vector<int64_t> rows;    // [degree, peers, local_experts]
  std::vector<int64_t> offset;  // [degree, peers, local_experts], in rows from the buffer start
  std::vector<int64_t> filled;  // [peers, local_experts] rows of each block over all chunks
  int64_t total_rows = 0;

  int index(int chunk, int peer, int local_expert) const {
    return (chunk * peers + peer) * local_experts + local_expert;
  }
  int64_t block_rows(int c, int q, int le) const { return rows[index(c, q, le)]; }
  int64_t block_offset(int c, int q, int le) const { return offset[index(c, q, le)]; }
  // Row position of row i (0 <= i < filled) of block (peer, local expert).
  int64_t position(int peer, int local_expert, int64_t row) const;
  // position(peer, local_expert, i) of rows [first, first + count), appended to out: a chunk's
  // rows lie side by side, so one lookup a chunk, where one a row took 0.5 ms of a DeepSeek-style
  // pass (16K rows, several walks).
  void append_positions(int peer, int local_expert, int64_t first, int64_t count, std::vector<int64_t>& out) const;
  int64_t chunk_offset(int chunk) const;  // first row of the chunk
  int64_t chunk_rows(int chunk) const;
  // Rows this layout holds for one peer in one chunk (wire order: contiguous).
  int64_t peer_chunk_rows(int chunk, int peer) const;
};

// filled[peers, local_experts]: rows of each block.
BlockLayout make_block_layout(const std::vector<int64_t>& filled, int peers, int local_experts,
                              int degree, BlockOrder order);

// Runs of rows that move chunk `chunk`'s rows from layout `from` to layout `to` (for
// Backend::copy_rows). The two layouts hold the same blocks; `to` has the same degree as `from`,
// or degree 1 (canonical). skip_peer (>= 0): leaves that peer's blocks out.
std::vector<RowRun> chunk_segments(const BlockLayout& from, const BlockLayout& to, int chunk, int skip_peer = -1);
// The runs of chunk `chunk` of one peer's blocks, from `from` to `to`, two layouts of the same
// degree that agree on that peer's blocks only: a rank's own rows, in the token side's layout
// (peer: where they go) and the expert side's (peer: where they come from).
std::vector<RowRun> peer_segments(const BlockLayout& from, const BlockLayout& to, int peer, int chunk);

// The parts of `runs` whose rows on one side (source or destination) lie in [first, first + rows),
// runs cut where they cross that range: one expert's rows of a chunk, copied while its block is
// still in cache (a run may span two experts' blocks: chunk_segments joins adjacent runs). `runs`
// sorted by their first row on `side`, where no two overlap (sort_runs): the first is found by a
// binary search. An expert step asks once per local expert, and a deduplicated dispatch's runs are
// single rows: scanning them all for each of 32 experts took 0.9% of a DeepSeek-style layer.
enum class RunSide { source, destination };
std::vector<RowRun> sorted_runs_within(const std::vector<RowRun>& runs, RunSide side, int64_t first, int64_t rows);
// runs sorted by their first row on `side`, for sorted_runs_within: rows on that side must not
// overlap (every compute-order row is written, or read, by one run).
void sort_runs(std::vector<RowRun>& runs, RunSide side);

// Where rows sit in another pipelining of the same blocks (any two degrees):
// the positions in `to` of chunk `chunk`'s rows of `from` (compute order), in from's row order.
std::vector<int64_t> chunk_row_positions(const BlockLayout& from, const BlockLayout& to, int chunk);
// the positions in `layout` of local expert `local_expert`'s rows in canonical order (by peer,
// then row): the order in which weight gradients sum them.
std::vector<int64_t> canonical_row_positions(const BlockLayout& layout, int local_expert);
// Pointers to rows of base[*, width] at the given positions.
std::vector<const float*> row_pointers(const float* base, int64_t width, const std::vector<int64_t>& positions);

}  // namespace pm
