#include "moe/dispatcher.h"

#include <algorithm>
#include <cstring>
#include <numeric>

#include "core/error.h"
#include "core/tensor.h"
#include "moe/row_buffer.h"

namespace pm {

Dispatcher::Dispatcher(Communicator& group, Backend& backend, int local_experts, int64_t width, Precision wire)
    : group_(group), backend_(backend), local_experts_(local_experts), width_(width), wire_(wire) {}

std::vector<int64_t> Dispatcher::choice_positions(const Routing& routing, const BlockLayout& layout) const {
  const int k = routing.top_k;
  std::vector<int64_t> pos(routing.tokens * k, -1);
  for (int64_t i = 0; i < routing.tokens * k; ++i) {
    int32_t s = routing.slot[i];
    if (s < 0) continue;
    int32_t e = routing.expert[i];
    pos[i] = layout.position(e / local_experts_, e % local_experts_, s);
  }
  return pos;
}

DispatchHandle Dispatcher::layout(const Routing& routing, int degree, bool dedup) const {
  PM_CHECK(routing.experts == group_.size() * local_experts_, "routing over {} experts, the group holds {}",
           routing.experts, group_.size() * local_experts_);
  DispatchHandle h;
  h.degree = degree;
  h.tokens = routing.tokens;
  h.top_k = routing.top_k;
  h.send_counts = routing.count;  // expert e = q * El + le: already [P, El]
  h.tokens_wire = make_block_layout(h.send_counts, group_.size(), local_experts_, degree, BlockOrder::wire);
  h.positions = choice_positions(routing, h.tokens_wire);
  h.dedup = dedup;
  if (dedup) h.unique = unique_token_rows(h.tokens_wire, h.positions, h.tokens, h.top_k);
  return h;
}

void Dispatcher::exchange_counts(DispatchHandle& h) {
  const int P = group_.size(), El = local_experts_, D = h.degree;
  // per peer: its El experts' row counts and, deduplicated, the unique rows of each chunk to it
  const int W = El + (h.dedup ? D : 0);
  std::vector<int64_t> send(static_cast<std::size_t>(P) * W), recv(send.size()), counts(P, W), displs(P);
  for (int q = 0; q < P; ++q) {
    displs[q] = static_cast<int64_t>(q) * W;
    std::copy_n(h.send_counts.begin() + q * El, El, send.begin() + displs[q]);
    if (h.dedup)
      for (int c = 0; c < D; ++c) send[displs[q] + El + c] = h.unique.send_count[c * P + q];
  }
  group_.alltoallv(send.data(), counts, displs, recv.data(), counts, displs, DType::i64);
  h.recv_counts.assign(P * El, 0);
  for (int q = 0; q < P; ++q) std::copy_n(recv.begin() + displs[q], El, h.recv_counts.begin() + q * El);
  h.experts_wire = make_block_layout(h.recv_counts, P, El, h.degree, BlockOrder::wire);
  h.experts_compute = make_block_layout(h.recv_counts, P, El, h.degree, BlockOrder::compute);
  if (h.dedup) lay_out_unique_rows(h, recv, W, El);
  h.exchanged = true;
}

void Dispatcher::lay_out_unique_rows(DispatchHandle& h, const std::vector<int64_t>& received, int stride,
                                     int first) const {
  const int P = group_.size(), D = h.degree;
  std::vector<int64_t> unique(static_cast<std::size_t>(D) * P, 0);
  for (int q = 0; q < P; ++q)
    if (q != group_.rank())  // own rows stay off the wire: 0
      for (int c = 0; c < D; ++c) unique[c * P + q] = received[static_cast<int64_t>(q) * stride + first + c];
  lay_out_expert_side(h.unique, std::move(unique), P, h.experts_wire.total_rows);
  if (h.unique.scaled) h.unique.recv_gate.assign(h.experts_wire.total_rows, 0.0f);
}

void Dispatcher::scale_on_expert_side(DispatchHandle& h, const float* gate, const DispatchHandle& forward) const {
  PM_CHECK(!h.dedup, "a handle deduplicated once already");
  h.dedup = true;
  if (forward.dedup && forward.degree == h.degree) {  // the token side only: the expert side is laid out anew
    const UniqueRows& f = forward.unique;
    h.unique.send_count = f.send_count, h.unique.send_offset = f.send_offset, h.unique.send_map = f.send_map;
    h.unique.positions = f.positions, h.unique.send_rows = f.send_rows;
  } else {
    h.unique = unique_token_rows(h.tokens_wire, h.positions, h.tokens, h.top_k);
  }
  h.unique.scaled = true;
  h.unique.send_gate.assign(h.tokens_wire.total_rows, 0.0f);
  for (int64_t i = 0; i < h.tokens * h.top_k; ++i)
    if (h.positions[i] >= 0) h.unique.send_gate[h.positions[i]] = gate[i];
}

void Dispatcher::exchange_unique_counts(DispatchHandle& h) {
  PM_CHECK(h.dedup && h.exchanged, "unique rows to exchange after the counts");
  const int P = group_.size(), D = h.degree;
  std::vector<int64_t> send(static_cast<std::size_t>(P) * D), recv(send.size()), counts(P, D), displs(P);
  for (int q = 0; q < P; ++q) {
    displs[q] = static_cast<int64_t>(q) * D;
    for (int c = 0; c < D; ++c) send[displs[q] + c] = h.unique.send_count[c * P + q];
  }
  group_.alltoallv(send.data(), counts, displs, recv.data(), counts, displs, DType::i64);
  lay_out_unique_rows(h, recv, D, 0);
}

DispatchHandle Dispatcher::with_degree(const DispatchHandle& from, const Routing& routing, int degree) const {
  PM_CHECK(from.exchanged, "a layout for another degree needs the exchanged counts");
  const int P = group_.size(), El = local_experts_;
  DispatchHandle h;
  h.degree = degree;
  h.tokens = from.tokens;
  h.top_k = from.top_k;
  h.send_counts = from.send_counts;
  h.recv_counts = from.recv_counts;
  h.exchanged = true;
  if (degree == from.degree) {  // (layouts of the same counts and degree: the same)
    h.tokens_wire = from.tokens_wire, h.positions = from.positions;
    h.experts_wire = from.experts_wire, h.experts_compute = from.experts_compute;
    return h;
  }
  h.tokens_wire = make_block_layout(h.send_counts, P, El, degree, BlockOrder::wire);
  h.positions = choice_positions(routing, h.tokens_wire);  // the same slots, in the new layout
  h.experts_wire = make_block_layout(h.recv_counts, P, El, degree, BlockOrder::wire);
  h.experts_compute = make_block_layout(h.recv_counts, P, El, degree, BlockOrder::compute);
  return h;
}

void Dispatcher::pack(const float* x, const DispatchHandle& h, RowsOut send) const {
  backend_.dispatch_rows(x, h.tokens, width_, h.top_k, (h.dedup ? h.unique.positions : h.positions).data(), send);
}

void Dispatcher::pack_scaled(const float* dy, const float* gate, const DispatchHandle& h, RowsOut send) const {
  if (h.dedup && h.unique.scaled) return pack(dy, h, send);
  backend_.combine_rows_backward_slots(dy, gate, h.tokens, width_, h.top_k, h.positions.data(), send);
}

void Dispatcher::all_to_all_rows(RowsIn send, const BlockLayout& from, RowsOut recv, const BlockLayout& to,
                                 int chunk, OwnRows own) {
  const int P = group_.size();
  std::vector<int64_t> send_counts(P), send_displs(P), recv_counts(P), recv_displs(P);
  for (int q = 0; q < P; ++q) {
    send_counts[q] = from.peer_chunk_rows(chunk, q) * width_;
    send_displs[q] = from.block_offset(chunk, q, 0) * width_;
    recv_counts[q] = to.peer_chunk_rows(chunk, q) * width_;
    recv_displs[q] = to.block_offset(chunk, q, 0) * width_;
  }
  if (own == OwnRows::by_caller) send_counts[group_.rank()] = recv_counts[group_.rank()] = 0;
  alltoallv_rows(send, send_counts, send_displs, recv, recv_counts, recv_displs, wire_);
}

void Dispatcher::alltoallv_rows(RowsIn send, const std::vector<int64_t>& send_counts,
                                const std::vector<int64_t>& send_displs, RowsOut recv,
                                const std::vector<int64_t>& recv_counts, const std::vector<int64_t>& recv_displs,
                                Precision type) {
  const bool bf16 = type == Precision::bf16;
  PM_CHECK(bf16 ? send.f32 == nullptr && recv.f32 == nullptr : send.bf16 == nullptr && recv.bf16 == nullptr,
           "the all-to-all's buffers must hold rows of its type ({})", bf16 ? "bf16" : "fp32");
  if (bf16)
    group_.alltoallv(send.bf16, send_counts, send_displs, recv.bf16, recv_counts, recv_displs, DType::bf16);
  else
    group_.alltoallv(send.f32, send_counts, send_displs, recv.f32, recv_counts, recv_displs, DType::f32);
}

void Dispatcher::dispatch_chunk(DispatchHandle& h, int chunk, RowsIn send, RowsOut recv, OwnRows own) {
  if (!h.dedup) return all_to_all_rows(send, h.tokens_wire, recv, h.experts_wire, chunk, own);
  PM_CHECK(own == OwnRows::by_caller && h.exchanged, "a deduplicated dispatch leaves a rank's own rows to the caller");
  const int P = group_.size(), me = group_.rank();
  PM_CHECK(h.unique.recv_count.size() == static_cast<std::size_t>(h.degree) * P,
           "a deduplicated dispatch before its unique rows were exchanged");
  // a scaled dispatch's rows (dy in float32) and, beside them, every expert row's gate value
  const bool scaled = h.unique.scaled;
  std::vector<int64_t> gate_send_counts(P), gate_recv_counts(P);
  // the chunk's row maps (one int32 per expert row, straight from and into the maps) beside its
  // unique rows: both in flight at once
  std::vector<int64_t> map_send_counts(P), map_send_displs(P), map_recv_counts(P), map_recv_displs(P);
  std::vector<int64_t> send_counts(P), send_displs(P), recv_counts(P), recv_displs(P);
  for (int q = 0; q < P; ++q) {
    const int64_t g = static_cast<int64_t>(chunk) * P + q;
    const bool own_rows = q == me;
    // a (chunk, peer) that sends every row as a new row has a map that counts on from the rows
    // before: it stays off the wire
    const bool every_row_out = UniqueRows::sends_every_row(h.unique.send_count, h.tokens_wire, chunk, q);
    const bool every_row_in = UniqueRows::sends_every_row(h.unique.recv_count, h.experts_wire, chunk, q);
    map_send_counts[q] = own_rows || every_row_out ? 0 : h.tokens_wire.peer_chunk_rows(chunk, q);
    map_send_displs[q] = h.tokens_wire.block_offset(chunk, q, 0);
    map_recv_counts[q] = own_rows || every_row_in ? 0 : h.experts_wire.peer_chunk_rows(chunk, q);
    map_recv_displs[q] = h.experts_wire.block_offset(chunk, q, 0);
    gate_send_counts[q] = own_rows ? 0 : h.tokens_wire.peer_chunk_rows(chunk, q);
    gate_recv_counts[q] = own_rows ? 0 : h.experts_wire.peer_chunk_rows(chunk, q);
    if (!own_rows && every_row_in) {
      auto first = h.unique.recv_map.begin() + map_recv_displs[q];
      std::iota(first, first + h.experts_wire.peer_chunk_rows(chunk, q),
                static_cast<int32_t>(rows_before_chunk(h.unique.recv_offset, P, chunk, q)));
    }
    send_counts[q] = own_rows ? 0 : h.unique.send_count[g] * width_;
    send_displs[q] = h.unique.send_offset[g] * width_;
    recv_counts[q] = own_rows ? 0 : h.unique.recv_count[g] * width_;
    recv_displs[q] = h.unique.recv_offset[g] * width_;
  }
  RequestPtr maps = group_.ialltoallv(h.unique.send_map.data(), map_send_counts, map_send_displs,
                                     h.unique.recv_map.data(), map_recv_counts, map_recv_displs, DType::i32);
  RequestPtr gates = scaled ? group_.ialltoallv(h.unique.send_gate.data(), gate_send_counts, map_send_displs,
                                                h.unique.recv_gate.data(), gate_recv_counts, map_recv_displs, DType::f32)
                           : nullptr;
  alltoallv_rows(send, send_counts, send_displs, recv, recv_counts, recv_displs, scaled ? Precision::fp32 : wire_);
  group_.waiter().wait(*maps);
  if (gates) group_.waiter().wait(*gates);
  for (int q = 0; q < P; ++q)
    if (q != me) check_received_map(h.unique, h.experts_wire, chunk, q);
}

void Dispatcher::combine_chunk(const DispatchHandle& h, int chunk, RowsIn rows, RowsOut back, OwnRows own) {
  all_to_all_rows(rows, h.experts_wire, back, h.tokens_wire, chunk, own);
}

std::vector<RowRun> Dispatcher::peer_rows_to_experts(const DispatchHandle& h, int chunk) const {
  if (!h.dedup) return chunk_segments(h.experts_wire, h.experts_compute, chunk, group_.rank());
  std::vector<RowRun> runs;
  for (int q = 0; q < group_.size(); ++q) {
    if (q == group_.rank()) continue;
    std::vector<RowRun> peer = unique_row_runs(h.unique.recv_offset, h.unique.recv_map, h.experts_wire,
                                               h.experts_compute, chunk, q);
    runs.insert(runs.end(), peer.begin(), peer.end());
  }
  return runs;
}

std::vector<RowRun> Dispatcher::own_rows_to_experts(const DispatchHandle& h, int chunk) const {
  if (h.dedup)
    return unique_row_runs(h.unique.send_offset, h.unique.send_map, h.tokens_wire, h.experts_compute, chunk,
                           group_.rank());
  return peer_segments(h.tokens_wire, h.experts_compute, group_.rank(), chunk);
}

std::vector<RowRun> Dispatcher::own_rows_from_experts(const DispatchHandle& h, int chunk) const {
  return peer_segments(h.experts_compute, h.tokens_wire, group_.rank(), chunk);
}

void Dispatcher::gates_to_experts(const DispatchHandle& h, int chunk, std::vector<float>& compute_gate) const {
  PM_CHECK(h.dedup && h.unique.scaled, "gate values beside the rows come with a scaled dispatch");
  compute_gate.resize(h.experts_compute.total_rows);
  auto place = [&](const std::vector<float>& gates, const std::vector<RowRun>& runs) {
    for (const RowRun& r : runs) std::copy_n(gates.begin() + r.src_row, r.rows, compute_gate.begin() + r.dst_row);
  };
  place(h.unique.recv_gate, chunk_segments(h.experts_wire, h.experts_compute, chunk, group_.rank()));  // the peers'
  place(h.unique.send_gate, peer_segments(h.tokens_wire, h.experts_compute, group_.rank(), chunk));    // this rank's
}

void Dispatcher::unpack(RowsIn back, const float* gate, const DispatchHandle& h, float* y) const {
  backend_.combine_rows(back, gate, h.tokens, width_, h.top_k, h.positions.data(), y);
}

void Dispatcher::unpack_sum(RowsIn back, const DispatchHandle& h, const float* dlogits, const float* wg_t,
                            int experts, float* dx) const {
  // each element the chain of gemm(no, yes, ..., dlogits, wg) over the experts: the bits of the
  // whole [T, M] product this replaces (a GEMM's rows do not depend on the rows beside them)
  auto gate_share = [&](int64_t t0, int64_t n) {
    backend_.gemm(Trans::no, Trans::no, n, width_, experts, dlogits + t0 * experts, experts, wg_t, width_, 0.0f,
                  dx + t0 * width_, width_);
  };
  // A device makes the share in one product (a product per block would be a launch per block).
  const bool per_block = backend_.device() == Device::cpu;
  if (!per_block) gate_share(0, h.tokens);
  constexpr int64_t kBlock = 16;  // tokens: 16 rows of 512 floats fill half of L1
  for (int64_t t0 = 0; t0 < h.tokens; t0 += kBlock) {
    const int64_t n = std::min(kBlock, h.tokens - t0);
    if (per_block) gate_share(t0, n);
    backend_.dispatch_rows_backward(back, n, width_, h.top_k, h.positions.data() + t0 * h.top_k, dx + t0 * width_);
  }
}

Buffer<float> Dispatcher::dispatch(const float* x, DispatchHandle& h) {
  PM_CHECK(!h.dedup, "a whole-pass dispatch carries every row (deduplicated rows are for the pipelined pieces)");
  if (!h.exchanged) exchange_counts(h);
  RowBuffer send(backend_), wire(backend_);
  send.resize(h.tokens_wire.total_rows, width_, wire_);
  wire.resize(h.experts_wire.total_rows, width_, wire_);
  Buffer<float> rows(h.experts_wire.total_rows * width_, 0.0f, BackendAllocator<float>(backend_));
  pack(x, h, send.out(0));
  for (int c = 0; c < h.degree; ++c) {
    dispatch_chunk(h, c, send.in(0), wire.out(0));
    backend_.copy_rows(wire.in(0), rows.data(), width_, chunk_segments(h.experts_wire, h.experts_compute, c));
  }
  return rows;
}

void Dispatcher::combine(const Buffer<float>& rows, const float* gate, const DispatchHandle& h, float* y) {
  RowBuffer wire(backend_), back(backend_);
  wire.resize(h.experts_wire.total_rows, width_, wire_);
  back.resize(h.tokens_wire.total_rows, width_, wire_);
  for (int c = 0; c < h.degree; ++c) {
    backend_.copy_rows(rows.data(), wire.out(0), width_, chunk_segments(h.experts_compute, h.experts_wire, c));
    combine_chunk(h, c, wire.in(0), back.out(0));
  }
  unpack(back.in(0), gate, h, y);
}

}  // namespace pm
