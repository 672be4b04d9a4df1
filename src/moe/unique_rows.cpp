#include "moe/unique_rows.h"

#include <algorithm>

#include "core/error.h"

namespace pm {

namespace {

// Offsets of a [peer][chunk] buffer for counts indexed [chunk][peer]; the rows in all.
int64_t offsets_of(const std::vector<int64_t>& count, int peers, std::vector<int64_t>& offset) {
  const int chunks = static_cast<int>(count.size()) / peers;
  offset.assign(count.size(), 0);
  int64_t next = 0;
  for (int q = 0; q < peers; ++q)
    for (int c = 0; c < chunks; ++c) {
      offset[static_cast<int64_t>(c) * peers + q] = next;
      next += count[static_cast<int64_t>(c) * peers + q];
    }
  return next;
}

// The rows of (chunk, peer) in a wire layout: contiguous, all local experts' blocks.
int64_t group_first(const BlockLayout& wire, int chunk, int peer) { return wire.block_offset(chunk, peer, 0); }

}  // namespace

double chance_token_reaches_rank(const MoeShape& s) {
  const int L = s.local_experts(), k = s.top_k;
  const int G = s.group_limited() ? s.route_groups : 1, K = s.group_limited() ? s.route_top_groups : 1;
  const int per = s.experts / G, allowed = K * per;
  double reach = 0;
  for (int r = 0; r < s.ranks; ++r) {
    // ways[j][o]: the sets of j groups among those counted so far holding o of rank r's experts
    std::vector<std::vector<double>> ways(K + 1, std::vector<double>(L + 1, 0.0));
    ways[0][0] = 1;
    for (int g = 0; g < G; ++g) {
      const int overlap = std::max(0, std::min((g + 1) * per, (r + 1) * L) - std::max(g * per, r * L));
      for (int j = std::min(g + 1, K); j >= 1; --j)
        for (int o = L; o >= overlap; --o) ways[j][o] += ways[j - 1][o - overlap];
    }
    double sets = 0, none = 0;
    for (int o = 0; o <= L; ++o) {
      if (ways[K][o] == 0) continue;
      double miss = 1.0;  // C(allowed - o, k) / C(allowed, k), factor by factor
      for (int i = 0; i < k; ++i) miss *= std::max(0.0, static_cast<double>(allowed - o - i) / (allowed - i));
      sets += ways[K][o];
      none += ways[K][o] * miss;
    }
    reach += 1.0 - none / sets;
  }
  return reach / s.ranks;
}

bool scaled_dispatch_pays(const MoeShape& s) {
  if (s.top_k < 2 || s.local_experts() <= 0 || s.local_experts() >= s.experts) return false;
  // distinct tokens over choices for one peer
  const double share = chance_token_reaches_rank(s) * s.experts / (s.top_k * s.local_experts());
  const double bytes = share * sizeof(float) / static_cast<double>(s.wire_bytes());
  return bytes * kDedupFewestRepeats <= kDedupFewestRepeats - 1;
}

int64_t rows_before_chunk(const std::vector<int64_t>& offset, int peers, int chunk, int peer) {
  return offset[static_cast<int64_t>(chunk) * peers + peer] - offset[peer];
}

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
  std::vector<int64_t> row_of_token(tokens), counted_in(tokens);  // per peer: its unique row; the chunk that counted it
  for (int q = 0; q < P; ++q) {
    std::fill(row_of_token.begin(), row_of_token.end(), -1);
    std::fill(counted_in.begin(), counted_in.end(), -1);
    int64_t sent = 0;  // unique rows for q so far
    for (int c = 0; c < D; ++c) {
      const int64_t g = static_cast<int64_t>(c) * P + q, first = group_first(tokens_wire, c, q);
      const int64_t rows = tokens_wire.peer_chunk_rows(c, q);
      int64_t fresh = 0;  // tokens this chunk would send q for the first time
      for (int64_t r = first; r < first + rows; ++r) {
        const int64_t t = token_of_row[r];
        PM_CHECK(t >= 0, "row {} of the wire layout holds no choice", r);
        if (row_of_token[t] < 0 && counted_in[t] != c) counted_in[t] = c, ++fresh;
      }
      const bool every_row = (rows - fresh) * kDedupFewestRepeats < rows;
      for (int64_t r = first; r < first + rows; ++r) {
        const int64_t t = token_of_row[r];
        if (every_row || row_of_token[t] < 0) row_of_token[t] = sent++;
        u.send_map[r] = static_cast<int32_t>(every_row ? sent - 1 : row_of_token[t]);
      }
      u.send_count[g] = every_row ? rows : fresh;
    }
  }
  u.send_rows = offsets_of(u.send_count, P, u.send_offset);

  // the unique row of each choice; a later choice of the same token into the same row packs nothing
  std::vector<int64_t> peer_of_row(tokens_wire.total_rows);
  for (int c = 0; c < D; ++c)
    for (int q = 0; q < P; ++q)
      std::fill_n(peer_of_row.begin() + group_first(tokens_wire, c, q), tokens_wire.peer_chunk_rows(c, q), q);
  u.positions.assign(tokens * top_k, -1);
  for (int64_t t = 0; t < tokens; ++t)
    for (int j = 0; j < top_k; ++j) {
      const int64_t r = choice_rows[t * top_k + j];
      if (r < 0) continue;
      const int64_t row = u.send_offset[peer_of_row[r]] + u.send_map[r];  // chunk 0's offset: the peer's first row
      bool packed = false;
      for (int i = 0; i < j; ++i) packed = packed || u.positions[t * top_k + i] == row;
      if (!packed) u.positions[t * top_k + j] = row;
    }
  return u;
}

void lay_out_expert_side(UniqueRows& u, std::vector<int64_t> recv_count, int peers, int64_t experts_wire_rows) {
  u.recv_count = std::move(recv_count);
  u.recv_rows = offsets_of(u.recv_count, peers, u.recv_offset);
  u.recv_map.assign(experts_wire_rows, -1);
}

void check_received_map(const UniqueRows& u, const BlockLayout& experts_wire, int chunk, int peer) {
  const int P = experts_wire.peers;
  const int64_t g = static_cast<int64_t>(chunk) * P + peer;
  const int64_t first = group_first(experts_wire, chunk, peer), n = experts_wire.peer_chunk_rows(chunk, peer);
  const int64_t before = rows_before_chunk(u.recv_offset, P, chunk, peer), end = before + u.recv_count[g];
  int64_t next = before;  // the peer numbers its new rows as it first meets them: none skips ahead
  for (int64_t i = 0; i < n; ++i) {
    const int32_t m = u.recv_map[first + i];
    PM_CHECK(m >= 0 && m <= next && m < end,
             "rank {} sent a row map that does not fit the {} rows it has sent (row {} of chunk {}: {})", peer, end, i,
             chunk, m);
    if (m == next) ++next;
  }
  PM_CHECK(next == end, "rank {} sent {} new rows in chunk {} but its map reads {} of them", peer, u.recv_count[g],
           chunk, next - before);
}

std::vector<RowRun> unique_row_runs(const std::vector<int64_t>& offset, const std::vector<int32_t>& map,
                                    const BlockLayout& wire, const BlockLayout& compute, int chunk, int peer) {
  const int El = wire.local_experts;
  const auto blocks = wire.filled.begin() + peer * El;  // the peer's blocks: the two layouts agree on these
  PM_CHECK(compute.order == BlockOrder::compute && compute.degree == wire.degree && compute.peers == wire.peers &&
               compute.local_experts == El && std::equal(blocks, blocks + El, compute.filled.begin() + peer * El),
           "unique rows go to a compute-order layout that agrees on peer {}'s blocks", peer);
  const int64_t peer_first = offset[peer];  // chunk 0's: the peer's first unique row
  std::vector<RowRun> runs;
  std::vector<int64_t> places;
  for (int le = 0; le < El; ++le) {
    const int64_t rows = wire.block_rows(chunk, peer, le), from = wire.block_offset(chunk, peer, le);
    const int64_t first = chunk_begin(wire.filled[peer * El + le], wire.degree, chunk);
    places.clear();
    compute.append_positions(peer, le, first, rows, places);
    for (int64_t i = 0; i < rows; ++i) {
      const RowRun run{peer_first + map[from + i], places[i], 1};
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
