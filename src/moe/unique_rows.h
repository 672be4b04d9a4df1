// A token's row sent once per destination rank and pass (DeepEP's deduplication of the dispatch).
//
// With top-k routing a token's choices often land on several experts of the same rank: top-8 of
// 64 experts on 2 ranks sends each row to a rank ~4 times. Deduplicated, the dispatch sends each
// token to a rank once, in the first chunk that has a choice of it there, and a map, one int32 per
// expert row, tells the receiver which of the rows that rank has received so far (this chunk's or
// an earlier one's) each of its expert rows copies. The map travels in the same chunk as the rows;
// the number of new rows per chunk travels with the per-expert counts: no extra round of messages.
// The experts read the same values (bf16 rows are rounded once, on the token side, either way):
// the same bits, fewer bytes on the wire. The backward's dispatch of gate * dy (the combine's
// backward) is deduplicated the same way, with the same bits, by sending dy itself in float32 with
// each expert row's gate value beside it: the expert side writes gate * dy into its rows, the
// product and the rounding the token side would have made (Dispatcher::scale_on_expert_side). A
// float32 row takes twice a bf16 wire's bytes: worth it where a token's row would go to a rank more
// than ~2.2 times (scaled_dispatch_pays). The combine and the backward's combine carry one row per
// (token, expert): summing a token's rows on the expert side would change the order of the sums.
//
// A rank's unique rows for peer q are numbered 0, 1, ... over the pass, in the order the wire layout
// first meets their token (chunk by chunk; in a chunk, its blocks by local expert, each block's
// rows in slot order). Both buffers hold them [peer][chunk], each peer's contiguous: a map value is
// an offset from the peer's first row. A (chunk, peer) where leaving out the tokens sent before and
// the repeats would save less than a tenth of its rows sends every row as new rows (its map counts
// on from the rows before, which the receiver tells from the count: it stays off the wire).
#pragma once

#include <cstdint>
#include <vector>

#include "kernels/backend.h"
#include "moe/moe_shape.h"
#include "moe/routing.h"

namespace pm {

// A (chunk, peer) is deduplicated when that saves at least 1/kDedupFewestRepeats of its rows: with
// few repeats the scattered copies and the map cost more than the rows left out (top-2 of 8 experts
// on 2 ranks, where a chunk's repeats were 1% of its rows, ran 2-3% slower deduplicated on an
// emulated 1 Gbit/s link). The planner's cost model follows the same rule (moe/ep_graph.h).
inline constexpr int64_t kDedupFewestRepeats = 10;

// The chance that a token has at least one of its k distinct choices among a rank's experts, the
// choices drawn uniformly: 1 - C(E - El, k) / C(E, k); under group-limited routing (moe_shape.h
// route_groups) from the experts of route_top_groups groups drawn uniformly. Averaged over the
// ranks, whose experts may cut groups differently: every rank computes the same number.
double chance_token_reaches_rank(const MoeShape& shape);
// Whether the backward's dispatch, deduplicated with float32 rows (4 bytes a value) and a gate
// value per expert row, saves at least 1/kDedupFewestRepeats of the bytes of every scaled row on
// the shape's wire, each token's choices drawn as above. From the shape alone: every rank decides
// the same for every peer. (bf16 wire: top-8 of 64 experts on 2 ranks sends ~0.25 of the rows in
// float32, half the bytes: yes; top-2 of 8: 0.79 of them, 1.6x the bytes: no; top-8 of 64 on 4
// ranks: 0.46 of them, 0.91x the bytes: no; the same limited to 2 of 4 groups: 0.25, yes.)
bool scaled_dispatch_pays(const MoeShape& shape);

struct UniqueRows {
  // token side
  std::vector<int64_t> send_count, send_offset;  // [degree, P] new rows chunk c sends peer q, where they begin
  std::vector<int32_t> send_map;                 // [tokens_wire rows] each row's unique row, counted from its peer's first
  std::vector<int64_t> positions;  // [T, k] the unique row each choice packs its token into; -1 when dropped,
                                   // or when an earlier choice of the token packs the same row
  int64_t send_rows = 0;
  // expert side (lay_out_expert_side; recv_map filled chunk by chunk as the dispatch delivers it)
  std::vector<int64_t> recv_count, recv_offset;  // [degree, P] (this rank's own (chunk, rank): 0, kept off the wire)
  std::vector<int32_t> recv_map;                 // [experts_wire rows] (this rank's own blocks: unset)
  int64_t recv_rows = 0;
  // A scaled dispatch (the backward's: Dispatcher::scale_on_expert_side): the unique rows are float32
  // and unscaled; each expert row's gate value goes beside them.
  bool scaled = false;
  std::vector<float> send_gate;  // [tokens_wire rows]
  std::vector<float> recv_gate;  // [experts_wire rows] (this rank's own blocks: unset)

  // Whether chunk `chunk` sends peer `peer` every row as a new row (its map then counts on from
  // the peer's rows before: no need to send it), from either side's counts.
  static bool sends_every_row(const std::vector<int64_t>& count, const BlockLayout& wire, int chunk, int peer) {
    return count[static_cast<int64_t>(chunk) * wire.peers + peer] == wire.peer_chunk_rows(chunk, peer);
  }
};

// The token side, from the wire layout and each choice's row in it (choice_positions; -1 dropped).
UniqueRows unique_token_rows(const BlockLayout& tokens_wire, const std::vector<int64_t>& choice_rows, int64_t tokens,
                             int top_k);

// The expert side's buffer from the new rows each (chunk, peer) sends ([degree, P]; this rank's
// own: 0, they stay off the wire); the maps arrive with each chunk's rows (Dispatcher::dispatch_chunk).
void lay_out_expert_side(UniqueRows& unique, std::vector<int64_t> recv_count, int peers, int64_t experts_wire_rows);
// The first unique row of `peer` that chunk `chunk` brings (the rows of its chunks before), on
// either side: offset and count of that side.
int64_t rows_before_chunk(const std::vector<int64_t>& offset, int peers, int chunk, int peer);
// A map that arrived from `peer` in chunk `chunk`: each row names one of the rows that peer has
// sent so far, its new ones numbered as it first met them, every one of them named; anything else
// is a clear error, never a read out of bounds.
void check_received_map(const UniqueRows& unique, const BlockLayout& experts_wire, int chunk, int peer);

// Runs that copy chunk `chunk`'s rows of one peer from unique rows (`offset`, `map`: one side of
// UniqueRows; `wire`: that side's wire layout) to their places in `compute` (the expert side's
// compute order, of the same degree, agreeing with `wire` on the peer's blocks). Consecutive rows on
// both sides make one run.
std::vector<RowRun> unique_row_runs(const std::vector<int64_t>& offset, const std::vector<int32_t>& map,
                                    const BlockLayout& wire, const BlockLayout& compute, int chunk, int peer);

}  // namespace pm
