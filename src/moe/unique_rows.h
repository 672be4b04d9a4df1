// A token's row sent once per chunk and destination rank (DeepEP's deduplication of the dispatch).
//
// With top-k routing a token's choices often land on several experts of the same rank: top-8 of
// 64 experts on 2 ranks sends each row to a rank ~4 times. Deduplicated, the dispatch of chunk c to
// rank q carries each token once, and a map, one int32 per expert row, tells the receiver which of
// those rows each of its expert rows copies (it travels beside the rows, in the same chunk; the
// unique counts travel with the per-expert counts: no extra round of messages). The experts read the same values (bf16 rows are
// rounded once, on the token side, either way): the same bits, fewer bytes on the wire. Only the
// forward's dispatch is deduplicated: the combine and the backward's two all-to-alls carry one row
// per (token, expert) (the output gradient sent to an expert is scaled by its gate value, and
// summing a token's rows on the expert side would change the order of the sums).
//
// Unique rows of (chunk c, peer q) are numbered 0, 1, ... in the order the wire layout first meets
// their token (its blocks by local expert, each block's rows in slot order); both buffers hold them
// [chunk][peer], each (chunk, peer) contiguous.
#pragma once

#include <cstdint>
#include <vector>

#include "kernels/backend.h"
#include "moe/routing.h"

namespace pm {

struct UniqueRows {
  // token side
  std::vector<int64_t> send_count, send_offset;  // [degree, P] unique rows of each (chunk, peer) and where they begin
  std::vector<int32_t> send_map;                 // [tokens_wire rows] each row's unique row within its (chunk, peer)
  std::vector<int64_t> positions;  // [T, k] the unique row each choice packs its token into; -1 when dropped,
                                   // or when an earlier choice of the token packs the same row
  int64_t send_rows = 0;
  // expert side (lay_out_expert_side; recv_map filled chunk by chunk as the dispatch delivers it)
  std::vector<int64_t> recv_count, recv_offset;  // [degree, P] (this rank's own (chunk, rank): 0, kept off the wire)
  std::vector<int32_t> recv_map;                 // [experts_wire rows] (this rank's own blocks: unset)
  int64_t recv_rows = 0;
};

// The token side, from the wire layout and each choice's row in it (choice_positions; -1 dropped).
UniqueRows unique_token_rows(const BlockLayout& tokens_wire, const std::vector<int64_t>& choice_rows, int64_t tokens,
                             int top_k);

// The expert side's buffer from the unique rows each (chunk, peer) sends ([degree, P]; this rank's
// own: 0, they stay off the wire); the maps arrive with each chunk's rows (Dispatcher::dispatch_chunk).
void lay_out_expert_side(UniqueRows& unique, std::vector<int64_t> recv_count, int64_t experts_wire_rows);
// A map that arrived from `peer` in chunk `chunk`: each row names one of the unique rows that peer
// sent, numbered as it first met them; anything else is a clear error, never a read out of bounds.
void check_received_map(const UniqueRows& unique, const BlockLayout& experts_wire, int chunk, int peer);

// Runs that copy chunk `chunk`'s rows of one peer from unique rows (`offset`, `map`: one side of
// UniqueRows; `wire`: that side's wire layout) to their places in `compute` (the expert side's
// compute order, of the same degree, agreeing with `wire` on the peer's blocks). Consecutive rows on both sides make one run.
std::vector<RowRun> unique_row_runs(const std::vector<int64_t>& offset, const std::vector<int32_t>& map,
                                    const BlockLayout& wire, const BlockLayout& compute, int chunk, int peer);

}  // namespace pm
