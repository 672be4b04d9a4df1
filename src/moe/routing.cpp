#include "moe/routing.h"

#include <algorithm>
#include <cmath>

#include "core/error.h"

namespace pm {

int64_t expert_capacity(int top_k, double capacity_factor, int64_t tokens, int experts) {
  if (capacity_factor == 0) return static_cast<int64_t>(top_k) * tokens;  // dropless: every choice fits
  double c = static_cast<double>(top_k) * capacity_factor * static_cast<double>(tokens) / experts;
  return static_cast<int64_t>(std::ceil(c));
}

int64_t Routing::kept() const {
  int64_t n = 0;
  for (int32_t s : slot) n += s >= 0;
  return n;
}

void assign_slots(Routing& r, DropPolicy policy, const float* gate) {
  r.count.assign(r.experts, 0);
  r.slot.assign(r.tokens * r.top_k, -1);
  // the choices in filling order: every token's first choice, then every second, ...
  auto each_choice = [&](auto&& fn) {
    for (int j = 0; j < r.top_k; ++j)
      for (int64_t t = 0; t < r.tokens; ++t) fn(t * r.top_k + j);
  };
  std::vector<char> keep;  // probs: whether each choice survives its expert's cut; position: empty
  if (policy == DropPolicy::probs) {
    keep.assign(r.tokens * r.top_k, 1);
    PM_CHECK(gate != nullptr, "dropping by gate value needs the gate values");
    std::vector<std::vector<int64_t>> asked(r.experts);  // each expert's choices, in filling order
    each_choice([&](int64_t i) { asked[r.expert[i]].push_back(i); });
    for (std::vector<int64_t>& choices : asked) {
      if (static_cast<int64_t>(choices.size()) <= r.capacity) continue;
      std::stable_sort(choices.begin(), choices.end(), [&](int64_t a, int64_t b) { return gate[a] > gate[b]; });
      for (std::size_t n = r.capacity; n < choices.size(); ++n) keep[choices[n]] = 0;
    }
  }
  each_choice([&](int64_t i) {
    const int32_t e = r.expert[i];
    if ((keep.empty() || keep[i]) && r.count[e] < r.capacity) r.slot[i] = static_cast<int32_t>(r.count[e]++);
  });
}

BlockLayout make_block_layout(const std::vector<int64_t>& filled, int peers, int local_experts,
                              int degree, BlockOrder order) {
  PM_CHECK(static_cast<int>(filled.size()) == peers * local_experts, "{} block counts for {}x{} blocks",
           filled.size(), peers, local_experts);
  PM_CHECK(degree >= 1, "degree {}", degree);
  BlockLayout l;
  l.degree = degree;
  l.peers = peers;
  l.local_experts = local_experts;
  l.order = order;
  l.filled = filled;
  l.rows.assign(static_cast<std::size_t>(degree) * peers * local_experts, 0);
  l.offset.assign(l.rows.size(), 0);
  int64_t next = 0;
  for (int c = 0; c < degree; ++c) {
    int outer = order == BlockOrder::wire ? peers : local_experts;
    int inner = order == BlockOrder::wire ? local_experts : peers;
    for (int a = 0; a < outer; ++a) {
      for (int b = 0; b < inner; ++b) {
        int q = order == BlockOrder::wire ? a : b;
        int le = order == BlockOrder::wire ? b : a;
        int64_t n = filled[q * local_experts + le];
        int64_t rows = chunk_begin(n, degree, c + 1) - chunk_begin(n, degree, c);
        l.rows[l.index(c, q, le)] = rows;
        l.offset[l.index(c, q, le)] = next;
        next += rows;
      }
    }
  }
  l.total_rows = next;
  return l;
}

namespace {

// The chunk of a block of n rows (over `degree` chunks) that holds `row`.
int chunk_of_row(int64_t n, int degree, int64_t row) {
  // chunk c holds rows [n*c/degree, n*(c+1)/degree): the first candidate is row*degree/n.
  int c = n == 0 ? 0 : static_cast<int>(row * degree / n);
  while (c > 0 && chunk_begin(n, degree, c) > row) --c;
  while (c + 1 < degree && chunk_begin(n, degree, c + 1) <= row) ++c;
  return c;
}

}  // namespace

int64_t BlockLayout::position(int peer, int local_expert, int64_t row) const {
  const int64_t n = filled[peer * local_experts + local_expert];
  const int c = chunk_of_row(n, degree, row);
  return block_offset(c, peer, local_expert) + (row - chunk_begin(n, degree, c));
}

void BlockLayout::append_positions(int peer, int local_expert, int64_t first, int64_t count,
                                   std::vector<int64_t>& out) const {
  const int64_t n = filled[peer * local_experts + local_expert], end = first + count;
  for (int64_t i = first; i < end;) {
    const int c = chunk_of_row(n, degree, i);
    const int64_t at = block_offset(c, peer, local_expert) - chunk_begin(n, degree, c);
    const int64_t stop = std::min(end, chunk_begin(n, degree, c + 1));
    for (; i < stop; ++i) out.push_back(at + i);
  }
}

int64_t BlockLayout::chunk_offset(int chunk) const {
  return chunk < degree ? offset[index(chunk, 0, 0)] : total_rows;
}

int64_t BlockLayout::chunk_rows(int chunk) const { return chunk_offset(chunk + 1) - chunk_offset(chunk); }

int64_t BlockLayout::peer_chunk_rows(int chunk, int peer) const {
  int64_t n = 0;
  for (int le = 0; le < local_experts; ++le) n += block_rows(chunk, peer, le);
  return n;
}

namespace {

// Adds a run, merged with the previous one when both sides continue it.
void append_run(std::vector<RowRun>& runs, RowRun run) {
  if (!runs.empty() && runs.back().src_row + runs.back().rows == run.src_row &&
      runs.back().dst_row + runs.back().rows == run.dst_row)
    runs.back().rows += run.rows;
  else
    runs.push_back(run);
}

}  // namespace

std::vector<RowRun> chunk_segments(const BlockLayout& from, const BlockLayout& to, int chunk, int skip_peer) {
  PM_CHECK(to.degree == from.degree || to.degree == 1, "layouts of degree {} and {}", from.degree,
           to.degree);
  PM_CHECK(from.filled == to.filled, "layouts of different blocks");
  std::vector<RowRun> segments;
  for (int q = 0; q < from.peers; ++q) {
    if (q == skip_peer) continue;
    for (int le = 0; le < from.local_experts; ++le) {
      int64_t rows = from.block_rows(chunk, q, le);
      if (rows == 0) continue;
      int64_t first = chunk_begin(from.filled[q * from.local_experts + le], from.degree, chunk);
      append_run(segments, {from.block_offset(chunk, q, le), to.position(q, le, first), rows});
    }
  }
  return segments;
}

namespace {
int64_t side_start(const RowRun& run, RunSide side) { return side == RunSide::source ? run.src_row : run.dst_row; }
}  // namespace

void sort_runs(std::vector<RowRun>& runs, RunSide side) {
  std::sort(runs.begin(), runs.end(),
            [side](const RowRun& a, const RowRun& b) { return side_start(a, side) < side_start(b, side); });
  for (std::size_t i = 1; i < runs.size(); ++i)
    PM_CHECK(side_start(runs[i - 1], side) + runs[i - 1].rows <= side_start(runs[i], side),
             "row runs that overlap on the side they are sorted by");
}

std::vector<RowRun> sorted_runs_within(const std::vector<RowRun>& runs, RunSide side, int64_t first, int64_t rows) {
  // sorted and apart: the runs' ends are in order too, so the first run ending past `first` is found by halving
  auto it = std::partition_point(runs.begin(), runs.end(), [&](const RowRun& run) {
    return side_start(run, side) + run.rows <= first;
  });
  std::vector<RowRun> within;
  for (; it != runs.end() && side_start(*it, side) < first + rows; ++it) {
    const int64_t start = side_start(*it, side);
    const int64_t lo = std::max(start, first), hi = std::min(start + it->rows, first + rows);
    if (lo < hi) within.push_back({it->src_row + (lo - start), it->dst_row + (lo - start), hi - lo});
  }
  return within;
}

std::vector<RowRun> peer_segments(const BlockLayout& from, const BlockLayout& to, int peer, int chunk) {
  PM_CHECK(from.degree == to.degree && from.peers == to.peers && from.local_experts == to.local_experts,
           "layouts of different shapes");
  const int El = from.local_experts;
  const auto mine = from.filled.begin() + peer * El;
  PM_CHECK(std::equal(mine, mine + El, to.filled.begin() + peer * El), "layouts that disagree on peer {}'s blocks", peer);
  std::vector<RowRun> segments;
  for (int le = 0; le < El; ++le) {
    const int64_t rows = from.block_rows(chunk, peer, le);
    if (rows == 0) continue;
    const int64_t first = chunk_begin(from.filled[peer * El + le], from.degree, chunk);
    append_run(segments, {from.block_offset(chunk, peer, le), to.position(peer, le, first), rows});
  }
  return segments;
}

std::vector<int64_t> chunk_row_positions(const BlockLayout& from, const BlockLayout& to, int chunk) {
  PM_CHECK(from.order == BlockOrder::compute, "chunk_row_positions reads a compute-order layout");
  std::vector<int64_t> out;
  out.reserve(from.chunk_rows(chunk));
  for (int le = 0; le < from.local_experts; ++le)
    for (int q = 0; q < from.peers; ++q) {
      const int64_t n = from.filled[q * from.local_experts + le], first = chunk_begin(n, from.degree, chunk);
      to.append_positions(q, le, first, chunk_begin(n, from.degree, chunk + 1) - first, out);
    }
  return out;
}

std::vector<int64_t> canonical_row_positions(const BlockLayout& layout, int local_expert) {
  std::vector<int64_t> out;
  for (int q = 0; q < layout.peers; ++q)
    layout.append_positions(q, local_expert, 0, layout.filled[q * layout.local_experts + local_expert], out);
  return out;
}

std::vector<const float*> row_pointers(const float* base, int64_t width, const std::vector<int64_t>& positions) {
  std::vector<const float*> out(positions.size());
  for (std::size_t i = 0; i < positions.size(); ++i) out[i] = base + positions[i] * width;
  return out;
}

}  // namespace pm
