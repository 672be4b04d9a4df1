// Dispatch and combine: moving token rows to the ranks that hold their experts and back, a
// reusable piece in the spirit of DeepEP's buffer (get the layout from the routing, dispatch(x)
// gives the received rows and a handle, combine(rows, handle) gives the tokens' outputs).
//
//   DispatchHandle h = dispatcher.layout(routing, degree);  // token side, from the routing
//   dispatcher.exchange_counts(h);                           // expert side: the group's counts
//   Buffer<float> rows = dispatcher.dispatch(x, h);          // rows for this rank's experts
//   ... compute on rows (compute order: each local expert's rows contiguous) ...
//   dispatcher.combine(rows, gate, h, y);                    // y[t] = sum_j gate * out[t, j]
//
// The expert-parallel layer pipelines the same pieces chunk by chunk on two lanes (pack,
// dispatch_chunk, combine_chunk, unpack), ScMoE's shortcut runs them beside the dense block, and
// the backward sends gradients the same way. Only filled slots travel: a chunk's all-to-all is
// full width (every peer, every local expert) with 1/degree of each block's rows.
#pragma once

#include <cstdint>
#include <vector>

#include "comm/communicator.h"
#include "kernels/backend.h"
#include "moe/routing.h"
#include "moe/unique_rows.h"

namespace pm {

// Where every row of one pass sits, for one pipeline degree.
struct DispatchHandle {
  int degree = 1;
  int64_t tokens = 0;
  int top_k = 1;
  std::vector<int64_t> send_counts;  // [P, El] rows this rank sends to each (rank, local expert)
  std::vector<int64_t> recv_counts;  // [P, El] rows each rank sends to this rank's experts (after exchange)
  BlockLayout tokens_wire;           // this rank's rows in the send buffer, wire order
  BlockLayout experts_wire;          // rows for this rank's experts as the all-to-all delivers them
  BlockLayout experts_compute;       // the same rows, each (chunk, local expert) contiguous: one GEMM
  std::vector<int64_t> positions;    // [T, k] row of each kept choice in tokens_wire; -1 dropped
  bool exchanged = false;            // recv_counts and the expert side are known
  // The dispatch sends a token's row once per rank and pass (unique_rows.h): the send buffer holds
  // unique.send_rows rows, the dispatch's receive buffer unique.recv_rows; the combine and the
  // layouts above are unchanged.
  bool dedup = false;
  UniqueRows unique;
};

class Dispatcher {
 public:
  // width: values per row (the model dimension M). wire: the rows' type on the wire, and of the
  // send and receive buffers of the pieces below (RowsIn/RowsOut of that type): bf16 rows are
  // rounded once, as they are packed (half the bytes on the wire, no staging copies), so what the
  // other side receives is the bf16 value of every row (rows a rank sends itself included).
  Dispatcher(Communicator& group, Backend& backend, int local_experts, int64_t width,
             Precision wire = Precision::fp32);

  // The token side of a pass's layout from its routing: no communication. dedup: the dispatch
  // sends each token's row once per rank (only with OwnRows::by_caller).
  DispatchHandle layout(const Routing& routing, int degree, bool dedup = false) const;
  // Exchanges the per-expert row counts (deduplicated: and the unique rows of each chunk) with the
  // group and lays out the expert side. Collective.
  void exchange_counts(DispatchHandle& handle);
  // The same rows (of the same routing) pipelined with another degree (the backward's): no
  // communication, and no deduplication. At the handle's own degree its layouts and positions are
  // copied, not made again (the same values).
  DispatchHandle with_degree(const DispatchHandle& handle, const Routing& routing, int degree) const;

  // The backward's dispatch of gate * dy deduplicated as the forward's is (a token's row once per
  // rank and pass, at h's degree): its rows are dy itself, in float32, with each expert row's gate
  // value beside them, and the expert side writes gate * dy into its rows (scaled_rows_to_experts):
  // the product and rounding the token side would have made, the same bits. Token side only: no
  // communication; exchange_unique_counts lays out the expert side. `forward`: the handle h was
  // made from (with_degree); deduplicated at h's degree, its token side is the one h needs
  // (unique_token_rows of the same layout and positions): copied, not made again.
  void scale_on_expert_side(DispatchHandle& h, const float* gate, const DispatchHandle& forward) const;
  // Each chunk's unique rows to each peer, for a handle deduplicated after its counts were
  // exchanged (scale_on_expert_side): lays out the expert side. Collective.
  void exchange_unique_counts(DispatchHandle& h);

  // ---- the pieces a pipeline schedules ---------------------------------------------------------
  // send[tokens_wire rows, M]: token rows (x[T, M]) at their choices' places (deduplicated:
  // send[unique.send_rows, M], each token once per rank, in the first chunk that needs it).
  void pack(const float* x, const DispatchHandle& h, RowsOut send) const;
  // send = gate[t, j] * dy[t] at the choices' places (the combine's backward); scaled on the expert
  // side (scale_on_expert_side): send[unique.send_rows, M] float32 = dy[t], as pack.
  void pack_scaled(const float* dy, const float* gate, const DispatchHandle& h, RowsOut send) const;
  // Chunk `chunk` of the token side to the expert side: send (tokens_wire) -> recv (experts_wire;
  // deduplicated: the chunk's new unique rows, both buffers [peer][chunk]). Collective. With
  // OwnRows::by_caller the rows this rank sends itself stay out of the all-to-all: the caller reads them from `send` (own_rows_to_experts) and, on the way back,
  // writes them into `back` (own_rows_from_experts): one copy of them fewer each way.
  enum class OwnRows { in_all_to_all, by_caller };
  // (Deduplicated, the chunk's row maps arrive with it, into h.unique.recv_map.)
  void dispatch_chunk(DispatchHandle& h, int chunk, RowsIn send, RowsOut recv,
                      OwnRows own = OwnRows::in_all_to_all);
  // Chunk `chunk` back: rows (experts_wire) -> back (tokens_wire). Collective.
  void combine_chunk(const DispatchHandle& h, int chunk, RowsIn rows, RowsOut back,
                     OwnRows own = OwnRows::in_all_to_all);
  // Runs of chunk `chunk`'s rows from the other ranks: from dispatch_chunk's receive buffer to
  // compute order.
  std::vector<RowRun> peer_rows_to_experts(const DispatchHandle& h, int chunk) const;
  // Runs of chunk `chunk`'s own rows: from the send buffer to compute order, and from compute order
  // to the back buffer (tokens_wire).
  std::vector<RowRun> own_rows_to_experts(const DispatchHandle& h, int chunk) const;
  std::vector<RowRun> own_rows_from_experts(const DispatchHandle& h, int chunk) const;
  // A scaled dispatch (scale_on_expert_side): the gate value of each of chunk `chunk`'s rows at its
  // place in compute order (compute_gate: [experts_compute rows], the chunk's entries written), for
  // RowBuffer::copy_scaled_rows_from along peer_rows_to_experts and own_rows_to_experts, or the
  // experts' DyRows::scaled.
  void gates_to_experts(const DispatchHandle& h, int chunk, std::vector<float>& compute_gate) const;
  // y[t] = sum_j gate[t, j] * back[choice (t, j)] (overwritten; zeros for a token with no kept choice).
  void unpack(RowsIn back, const float* gate, const DispatchHandle& h, float* y) const;
  // dx[t] = dlogits[t] Wg^T + sum_j back[choice (t, j)] (the gate's share of dx, then the
  // dispatch's backward added to it), a block of tokens at a time so that each block's share is
  // made and its rows summed while in cache. wg_t: Wg transposed, [experts, width].
  void unpack_sum(RowsIn back, const DispatchHandle& h, const float* dlogits, const float* wg_t, int experts,
                  float* dx) const;
  Precision wire() const { return wire_; }

  // ---- a whole pass at once -----------------------------------------------------------------------
  // Rows for this rank's experts in compute order (exchanges counts if not done).
  Buffer<float> dispatch(const float* x, DispatchHandle& h);
  // The experts' outputs (compute order) back to their tokens, weighted by the gate values.
  void combine(const Buffer<float>& rows, const float* gate, const DispatchHandle& h, float* y);

  Communicator& group() { return group_; }
  int local_experts() const { return local_experts_; }

 private:
  // All-to-all of one chunk from layout `from` in `send` to layout `to` in `recv` (rows of width).
  // OwnRows::by_caller: this rank's own block left out (a count of 0 both ways).
  void all_to_all_rows(RowsIn send, const BlockLayout& from, RowsOut recv, const BlockLayout& to, int chunk,
                       OwnRows own);
  // One all-to-all of rows of the wire's type (counts and displacements in values).
  void alltoallv_rows(RowsIn send, const std::vector<int64_t>& send_counts, const std::vector<int64_t>& send_displs,
                      RowsOut recv, const std::vector<int64_t>& recv_counts, const std::vector<int64_t>& recv_displs,
                      Precision type);
  // The expert side of a deduplicated handle from the unique rows each peer sends in each chunk:
  // received[q * stride + first + c] (this rank's own: 0, they stay off the wire).
  void lay_out_unique_rows(DispatchHandle& h, const std::vector<int64_t>& received, int stride, int first) const;
  std::vector<int64_t> choice_positions(const Routing& routing, const BlockLayout& token_layout) const;

  Communicator& group_;
  Backend& backend_;
  int local_experts_;
  int64_t width_;
  Precision wire_;
};

}  // namespace pm
