#include "moe/unique_rows.h"

#include <algorithm>

#include "core/error.h"

namespace pm {

namespace {

// Where each (chunk, peer)'s run of a [chunk][peer] buffer begins, and the rows in all.
int64_t offsets_of(const std::vector<int64_t>& count, std::vector<int64_t>& offset) {
  offset.assign(count.size(), 0);
  int64_t next = 0;
  for (std::size_t g = 0; g < count.size(); ++g) {
    offset[g] = next;
    next += count[g];
  }
  return next;
}

// The rows of (chunk, peer) in a wire layout: contiguous, all local experts' blocks.
int64_t group_first(const BlockLayout& wire, int chunk, int peer) { return wire.block_offset(chunk, peer, 0); }

}  // namespace

UniqueRows unique_token_rows(const BlockLayout& tokens_wire, const std::vector<int64_t>& choice_rows, int64_t tokens,
                             int top_k) {
  PM_CHECK(tokens_wire.order == BlockOrder::wire, "unique rows are numbered along the wire layout");
  PM_CHECK(static_cast<int64_t>(choice_rows.size()) == tokens * top_k, "{} choice rows for {} tokens x top-{}",
           choice_rows.size(), tokens, top_k);
  const int D = tokens_wire.degree, P = tokens_wire.peers;
  std::vector<int64_t> token_of_row(tokens_wire.total_rows, -1);
  for (int64_t i = 0; i < tokens * top_k; ++i)
    if (choice_rows[i] >= 0) token_of_row[choice_rows[i]] = i / top_k;

  UniqueRows u;
  u.send_count.assign(static_cast<std::size_t>(D) * P, 0);
  u.send_map.assign(tokens_wire.total_rows, -1);
  // (chunk, peer) groups one after another: a token's entries are current while its group is
  std::vector<int64_t> group_of_token(tokens, -1), unique_of_token(tokens, -1);
  for (int c = 0; c < D; ++c)
    for (int q = 0; q < P; ++q) {
      const int64_t g = static_cast<int64_t>(c) * P + q, first = group_first(tokens_wire, c, q);
      for (int64_t r = first; r < first + tokens_wire.peer_chunk_rows(c, q); ++r) {
        const int64_t t = token_of_row[r];
        PM_CHECK(t >= 0, "row {} of the wire layout holds no choice", r);
        if (group_of_token[t] != g) {
          group_of_token[t] = g;
          unique_of_token[t] = u.send_count[g]++;
        }
        u.send_map[r] = static_cast<int32_t>(unique_of_token[t]);
      }
    }
  u.send_rows = offsets_of(u.send_count, u.send_offset);

  // the unique row of each choice; a later choice of the same token into the same row packs nothing
  std::vector<int64_t> group_of_row(tokens_wire.total_rows);
  for (int c = 0; c < D; ++c)
    for (int q = 0; q < P; ++q) {
      const int64_t first = group_first(tokens_wire, c, q);
      std::fill_n(group_of_row.begin() + first, tokens_wire.peer_chunk_rows(c, q), static_cast<int64_t>(c) * P + q);
    }
  u.positions.assign(tokens * top_k, -1);
  for (int64_t t = 0; t < tokens; ++t)
    for (int j = 0; j < top_k; ++j) {
      const int64_t r = choice_rows[t * top_k + j];
      if (r < 0) continue;
      const int64_t row = u.send_offset[group_of_row[r]] + u.send_map[r];
      bool packed = false;
      for (int i = 0; i < j; ++i) packed = packed || u.positions[t * top_k + i] == row;
      if (!packed) u.positions[t * top_k + j] = row;
    }
  return u;
}

void lay_out_expert_side(UniqueRows& u, std::vector<int64_t> recv_count, int64_t experts_wire_rows) {
  u.recv_count = std::move(recv_count);
  u.recv_rows = offsets_of(u.recv_count, u.recv_offset);
  u.recv_map.assign(experts_wire_rows, -1);
}

void check_received_map(const UniqueRows& u, const BlockLayout& experts_wire, int chunk, int peer) {
  const int64_t g = static_cast<int64_t>(chunk) * experts_wire.peers + peer;
  const int64_t first = group_first(experts_wire, chunk, peer), n = experts_wire.peer_chunk_rows(chunk, peer);
  int64_t next = 0;  // the peer numbers its unique rows as it first meets them: none skips ahead
  for (int64_t i = 0; i < n; ++i) {
    const int32_t m = u.recv_map[first + i];
    PM_CHECK(m >= 0 && m <= next && m < u.recv_count[g],
             "rank {} sent a row map that does not fit its {} unique rows (row {} of chunk {}: {})", peer,
             u.recv_count[g], i, chunk, m);
    next = std::max<int64_t>(next, m + 1);
  }
  PM_CHECK(next == u.recv_count[g], "rank {} sent {} unique rows in chunk {} but its map reads {}", peer,
           u.recv_count[g], chunk, next);
}

std::vector<RowRun> unique_row_runs(const std::vector<int64_t>& offset, const std::vector<int32_t>& map,
                                    const BlockLayout& wire, const BlockLayout& compute, int chunk, int peer) {
  const int El = wire.local_experts;
  const auto blocks = wire.filled.begin() + peer * El;  // the peer's blocks: the two layouts agree on these
  PM_CHECK(compute.order == BlockOrder::compute && compute.degree == wire.degree && compute.peers == wire.peers &&
               compute.local_experts == El && std::equal(blocks, blocks + El, compute.filled.begin() + peer * El),
           "unique rows go to a compute-order layout that agrees on peer {}'s blocks", peer);
  const int64_t g = static_cast<int64_t>(chunk) * wire.peers + peer;
  std::vector<RowRun> runs;
  for (int le = 0; le < El; ++le) {
    const int64_t rows = wire.block_rows(chunk, peer, le), from = wire.block_offset(chunk, peer, le);
    const int64_t first = chunk_begin(wire.filled[peer * El + le], wire.degree, chunk);
    for (int64_t i = 0; i < rows; ++i) {
      const RowRun run{offset[g] + map[from + i], compute.position(peer, le, first + i), 1};
      if (!runs.empty() && runs.back().src_row + runs.back().rows == run.src_row &&
          runs.back().dst_row + runs.back().rows == run.dst_row)
        ++runs.back().rows;
      else
        runs.push_back(run);
    }
  }
  return runs;
}

}  // namespace pm
