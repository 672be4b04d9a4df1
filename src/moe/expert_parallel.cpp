#include "moe/expert_parallel.h"

#include <algorithm>
#include <cstring>
#include <numeric>

#include "core/transpose.h"
#include "moe/dispatcher.h"
#include "moe/ep_graph.h"
#include "moe/layer_weights.h"
#include "moe/gate.h"
#include "moe/row_buffer.h"

namespace pm {
namespace {

// The all-to-alls carry only the rows that change rank; a rank's rows for its own experts go
// straight from the send buffer to the experts and from the experts to the back buffer.
constexpr Dispatcher::OwnRows kOwn = Dispatcher::OwnRows::by_caller;

// Rows (deduplicated: each token once a rank) or choices a dispatch with handle `h` sent the ranks
// other than `rank`.
int64_t sent_to_peers(const DispatchHandle& h, int rank, bool rows) {
  int64_t n = 0;
  for (int c = 0; c < h.degree; ++c)
    for (int q = 0; q < h.tokens_wire.peers; ++q)
      if (q != rank)
        n += rows && h.dedup ? h.unique.send_count[c * h.tokens_wire.peers + q] : h.tokens_wire.peer_chunk_rows(c, q);
  return n;
}

// Everything one forward pass computes that later tasks, and the backward, read. Each field is
// written by one step (named beside it) before the steps that read it run.
struct ForwardPass final : MoePass, std::enable_shared_from_this<ForwardPass> {
  const float* x = nullptr;  // [T, M] the input, kept by the caller
  float* y = nullptr;        // [T, M] the output
  int64_t tokens = 0;
  Gating gating;             // gate
  DispatchHandle handle;     // gate (token side), counts (expert side)
  int rank = 0;              // gate: this rank in the layer's group
  // Rows in the wire's precision (row_buffer.h):
  RowBuffer send;            // gate: [tokens_wire rows, M] this rank's rows, wire order (pack)
  RowBuffer recv;            // counts: [experts_wire rows, M] rows for this rank's experts (dispatch),
                             // then their outputs going back (expert)
  RowBuffer recv_unique;     // counts, deduplicated dispatch: [unique.recv_rows, M] rows for this rank's
                             // experts, each token once (dispatch); saved: the experts' inputs (u_at)
  RowBuffer back;            // gate: [tokens_wire rows, M] outputs for this rank's tokens (combine); saved
  // Rows in the layer's precision, saved for the weight gradients:
  RowBuffer u, act;          // counts: [rows, M|H] the experts' inputs (unless inputs_in_place) and
                             // activations, compute order (expert)
  // Where each of the experts' inputs sits, compute order (expert): in recv_unique (the peers' rows)
  // and send (this rank's own) where they arrived (inputs_in_place), else in u. Saved.
  RowList u_at;
  // counts: the experts read their inputs where the deduplicated dispatch left them, and the pass
  // keeps its unique rows instead of a copy of every expert row: where those are fewer (top-8 of
  // 64 on 2 ranks: 6k rows for 16k). Without deduplication the outputs take the received rows'
  // place, and top-2 of 8 on 2 ranks sends 1.6 rows a token: 4.8k unique rows for 4k, so copied.
  bool inputs_in_place = false;
  ScratchBuffer<float> fc1_saved;  // counts: [rows, H1] the experts' saved values (expert_forward), compute order; saved
  // (recompute_experts: act and fc1_saved hold one expert block's rows at a time, and go at the
  // forward's end: the backward makes its own)
  ScratchBuffer<float> out;   // counts: [piece rows, M] one piece of an expert's outputs (expert)
  std::vector<int> needed;   // counts: this rank's experts that receive rows (offloaded experts load them)

  double aux_loss() const override { return gating.aux_loss; }
  double z_loss() const override { return gating.z_loss(); }
  int64_t expert_rows() const override { return handle.experts_wire.total_rows; }
  int64_t dispatch_rows_sent() const override { return sent_to_peers(handle, rank, true); }
  int64_t dispatch_choices_sent() const override { return sent_to_peers(handle, rank, false); }
  const Routing& routing() const override { return gating.routing; }
  int64_t held_bytes() const override {
    return send.bytes() + recv.bytes() + recv_unique.bytes() + back.bytes() + u.bytes() + u_at.bytes() + act.bytes() +
           static_cast<int64_t>((fc1_saved.size() + out.size()) * sizeof(float));
  }
};

struct BackwardPass {
  const float* dy = nullptr;  // [T, M]
  float* dx = nullptr;        // [T, M]
  DispatchHandle handle;      // the forward's rows at the backward's degree
  // Rows in the wire's precision:
  RowBuffer send;             // [tokens_wire rows, M] gate * dy, wire order (pack_grad); scaled on the
                              // expert side (dispatcher.h scale_on_expert_side): [unique.send_rows, M]
                              // dy in float32, each token once per rank
  RowBuffer recv;             // [experts_wire rows, M] output gradients (grad_dispatch), then input
                              // gradients going back (expert_dgrad)
  RowBuffer recv_unique;      // scaled on the expert side: [unique.recv_rows, M] float32 dy (grad_dispatch)
  std::vector<float> dy_gate;  // scaled on the expert side: [rows] each row's gate value, compute order
  RowBuffer back;             // [tokens_wire rows, M] input gradients of this rank's tokens (grad_combine)
  RowBuffer dy_rows;                        // [rows, M] compute order, in the wire's precision when a
                                            // bf16 expert reads it (exact), else fp32 (expert_dgrad);
                                            // not with dy_src
  // scaled on the expert side and read in place (dy_by_pointer): [rows] compute order, where each
  // row's dy sits in recv_unique or send; row i reads as dy_gate[i] times it (DyRows::scaled), so
  // the scaled rows of the pass are never written (expert_dgrad)
  std::vector<const float*> dy_src;
  ScratchBuffer<float> dhpre;               // [rows, H1] compute order (expert_dgrad)
  // recompute_experts: the experts' saved values and activations made again (expert_dgrad), compute
  // order, from their inputs (read where the forward left them)
  ScratchBuffer<float> fc1_saved;           // [rows, H1]
  RowBuffer act;                            // [rows, H]
  ScratchBuffer<float> du;                  // [piece rows, M] one piece of an expert's input gradients
  ScratchBuffer<float> dlogits;             // [T, E] the router's logit gradients (gate_bwd)
  std::vector<float> wg_t;                  // [E, M] Wg transposed: dx's gate share is dlogits Wg^T
};

// The rows behind a pass's tasks from its real routing (the busier direction of this rank's link
// sets a chunk's wire time). A deduplicated dispatch's rows are its own (the forward's, or the
// backward's scaled on the expert side); another degree's layout of a deduplicated pass (planning)
// carries the share of its rows the pass's dispatch sent.
PassRows measured_rows(const MoeShape& shape, int64_t tokens, const DispatchHandle& h, int rank,
                       double unique_share = 1.0) {
  PassRows s;
  s.shape = shape.with_tokens(tokens);
  s.degree = h.degree;
  s.sent_rows = h.tokens_wire.total_rows;
  for (int c = 0; c < h.degree; ++c) {
    int64_t sent = 0, received = 0, sent_unique = 0, received_unique = 0;
    for (int q = 0; q < shape.ranks; ++q) {
      if (q == rank) continue;
      sent += h.tokens_wire.peer_chunk_rows(c, q);
      received += h.experts_wire.peer_chunk_rows(c, q);
      if (h.dedup) {
        sent_unique += h.unique.send_count[static_cast<int64_t>(c) * shape.ranks + q];
        if (!h.unique.recv_count.empty())  // (a backward's: known once its grad_dispatch began)
          received_unique += h.unique.recv_count[static_cast<int64_t>(c) * shape.ranks + q];
      }
    }
    s.chunk_send_rows.push_back(std::max(sent, received));
    s.chunk_recv_rows.push_back(h.experts_wire.chunk_rows(c));
    if (h.dedup)  // the forward's dispatch, or the backward's (scaled on the expert side)
      (h.unique.scaled ? s.chunk_grad_dispatch_rows : s.chunk_dispatch_rows).push_back(std::max(sent_unique, received_unique));
  }
  if (!h.dedup && unique_share < 1.0) s.deduplicate_dispatch(unique_share);
  return s;
}

// The share of the rows on this rank's link that its deduplicated dispatch carried (1: all).
double dispatch_unique_share(const PassRows& rows) {
  if (rows.chunk_dispatch_rows.empty()) return 1.0;
  const double all = std::accumulate(rows.chunk_send_rows.begin(), rows.chunk_send_rows.end(), 0.0);
  const double sent = std::accumulate(rows.chunk_dispatch_rows.begin(), rows.chunk_dispatch_rows.end(), 0.0);
  return all > 0 ? sent / all : 1.0;
}

// The rows of chunk `chunk` of local expert `le` in a compute-order layout: first row and count.
std::pair<int64_t, int64_t> expert_block(const BlockLayout& compute, int chunk, int le) {
  int64_t first = compute.block_offset(chunk, 0, le), rows = 0;
  for (int q = 0; q < compute.peers; ++q) rows += compute.block_rows(chunk, q, le);
  return {first, rows};
}

// The most rows of one (chunk, local expert) block.
int64_t largest_expert_block(const BlockLayout& compute) {
  int64_t most = 0;
  for (int c = 0; c < compute.degree; ++c)
    for (int le = 0; le < compute.local_experts; ++le) most = std::max(most, expert_block(compute, c, le).second);
  return most;
}

// The row runs of one chunk between the all-to-all's buffers and the experts' compute order:
// the peers' rows (wire side) and this rank's own (token side, kept out of the all-to-all), in
// and out; each list sorted by its compute-order side, which the expert steps ask by expert block
// (sorted_runs_within).
struct ChunkRuns {
  std::vector<RowRun> in_peers, in_own, out_peers, out_own;
  ChunkRuns(const BlockLayout& wire, const BlockLayout& compute, int chunk, int rank, const Dispatcher& dispatcher,
            const DispatchHandle& handle)
      : in_peers(dispatcher.peer_rows_to_experts(handle, chunk)),
        in_own(dispatcher.own_rows_to_experts(handle, chunk)),
        out_peers(chunk_segments(compute, wire, chunk, rank)),
        out_own(dispatcher.own_rows_from_experts(handle, chunk)) {
    for (std::vector<RowRun>* in : {&in_peers, &in_own}) sort_runs(*in, RunSide::destination);
    for (std::vector<RowRun>* out : {&out_peers, &out_own}) sort_runs(*out, RunSide::source);
  }
};

// Rows of expert outputs per piece. On the CPU an expert's step runs its rows in pieces of this
// many whose fp32 outputs go to the all-to-all's rows (rounded there on a bf16 wire) straight
// after, from one small buffer, where a buffer held the whole pass's outputs (and another its
// input gradients) until the copy: a DeepSeek-style bf16 layer's peak memory 367 -> 335 MB per
// rank, the PyTorch comparison's 204 -> 197 (2 ranks, 2048 tokens each), at the same speed. The
// forward's GEMMs ran their rows in blocks of 192 already (expert_ffn.cpp): the same blocks, and a
// row's results never depend on the rows beside it: the same bits. A GPU runs an expert's rows in
// one piece.
constexpr int64_t kCpuOutputPieceRows = 192;

int64_t output_piece_rows(const Backend& backend, int64_t pass_rows) {
  return backend.device() == Device::cpu ? std::min(kCpuOutputPieceRows, pass_rows) : pass_rows;
}

// `runs` (source side: compute order) for rows [first, first + rows) of the pass, with their
// source rows counted from `first`: rows of a piece's buffer.
std::vector<RowRun> piece_runs(const std::vector<RowRun>& runs, int64_t first, int64_t rows) {
  std::vector<RowRun> piece = sorted_runs_within(runs, RunSide::source, first, rows);
  for (RowRun& r : piece) r.src_row -= first;
  return piece;
}

// Whether an expert's outputs go straight into the all-to-all's rows: a float32 wire's, and on the
// CPU a bf16 wire's too (its GEMM rounds each tile into them as it writes it: the bits of the
// float rows rounded after).
bool outputs_in_place(const Backend& backend, bool float_wire) {
  return float_wire || backend.device() == Device::cpu;
}

// An expert's rows [first, first + rows) of a chunk in pieces of `piece` rows: compute(r, n, y)
// writes the outputs of rows [r, r + n) to y. Where outputs_in_place, y is those rows' places in
// the all-to-all's buffers (the peers' rows, `to_peers`, and this rank's own, `to_own`, along the
// chunk's runs), by pointer, where a copy took them there from a buffer: 2.4% of a DeepSeek-style
// fp32 layer's time went to that copy, and in bf16 the rounding copy (docs/BENCHMARKS.md).
// Elsewhere (a GPU's bf16 wire) y is `out`, whose rows are then rounded into place.
template <typename Compute>
void in_pieces(Backend& backend, const ChunkRuns& runs, int64_t first, int64_t rows, int64_t M, int64_t piece,
               bool float_wire, ScratchBuffer<float>& out, RowsOut to_peers, RowsOut to_own, Compute compute) {
  const bool in_place = outputs_in_place(backend, float_wire);
  std::vector<float*> places;
  std::vector<uint16_t*> places16;
  if (in_place) {
    if (float_wire)
      places.assign(rows, nullptr);
    else
      places16.assign(rows, nullptr);
    for (auto [to, side] : {std::pair{to_peers, &runs.out_peers}, std::pair{to_own, &runs.out_own}})
      for (const RowRun& run : sorted_runs_within(*side, RunSide::source, first, rows))
        for (int64_t i = 0; i < run.rows; ++i) {
          const int64_t row = run.src_row - first + i, at = (run.dst_row + i) * M;
          if (float_wire)
            places[row] = to.f32 + at;
          else
            places16[row] = to.bf16 + at;
        }
    const bool placed = float_wire ? std::find(places.begin(), places.end(), nullptr) == places.end()
                                   : std::find(places16.begin(), places16.end(), nullptr) == places16.end();
    PM_CHECK(placed, "an expert output row with no place");
  }
  for (int64_t r = first; r < first + rows; r += piece) {
    const int64_t n = std::min(piece, first + rows - r);
    if (in_place) {
      const int64_t i = r - first;
      compute(r, n, float_wire ? OutputRows::by_pointer(&places[i]) : OutputRows::by_pointer(&places16[i]));
      continue;
    }
    compute(r, n, OutputRows(out.data()));
    backend.copy_rows(out.data(), to_peers, M, piece_runs(runs.out_peers, r, n));
    backend.copy_rows(out.data(), to_own, M, piece_runs(runs.out_own, r, n));
  }
}

class ExpertParallelLayer final : public MoeLayer {
 public:
  ExpertParallelLayer(const ExpertParallelStrategy& strategy, const MoeShape& shape, Communicator& group,
                      Backend& backend)
      : strategy_(strategy),
        shape_(shape),
        group_(group),
        backend_(backend),
        dispatcher_(group, backend, shape.local_experts(), shape.model_dim, shape.precision),
        w_(shape) {
    shape_.validate();
    PM_CHECK(shape_.ranks == group.size(), "a layer for {} ranks on a group of {}", shape_.ranks, group.size());
    for (int le = 0; le < shape_.local_experts(); ++le) packed_.experts.push_back(backend.new_packed_expert(shape_.activation, shape_.precision));
  }

  const MoeStrategy& strategy() const override { return strategy_; }
  const MoeShape& shape() const override { return shape_; }
  int first_expert() const override { return group_.rank() * shape_.local_experts(); }

  std::vector<Parameter> parameters() override { return w_.parameters(!cache_); }
  void init_parameters(uint64_t seed) override { w_.init(seed, shape_, first_expert(), !cache_); }

  void offload_experts(std::shared_ptr<const ExpertStore> store, int cache_slots, OffloadMode mode) override {
    PM_CHECK(store && store->local_experts() == shape_.local_experts(), "a store of {} experts for a layer of {}",
             store ? store->local_experts() : 0, shape_.local_experts());
    const int slots = mode == OffloadMode::resident ? shape_.local_experts() : cache_slots;
    cache_ = std::make_unique<ExpertCache>(std::move(store), backend_, slots, shape_.model_dim, shape_.hidden,
                                           shape_.activation, shape_.precision);
    offload_mode_ = mode;
    w_.drop_experts();  // the store holds them now
    packed_.clear();
  }
  int64_t weight_packings() const override { return packed_.packings; }
  const ExpertCache* expert_cache() const override { return cache_.get(); }

  void set_inference() override { inference_ = true; }
  void pack_for_inference() override {
    PM_CHECK(inference_, "packing a layer for inference before set_inference");
    if (cache_ || masters_released_) return;  // (offloaded: the cache packs what it loads)
    w_.pack_forward(backend_, shape_, packed_);
    w_.release_expert_masters();
    masters_released_ = true;
  }
  void set_capacity_factor(double capacity_factor) override {
    MoeShape s = shape_;
    s.capacity_factor = capacity_factor;
    s.validate();
    shape_ = s;
  }

  int64_t grad_dispatch_rows_sent() const override {
    return last_backward_ ? sent_to_peers(last_backward_->handle, group_.rank(), true) : 0;
  }
  int64_t grad_dispatch_choices_sent() const override {
    return last_backward_ ? sent_to_peers(last_backward_->handle, group_.rank(), false) : 0;
  }

  void set_degrees(int forward_degree, int backward_degree) override { degrees_.set(forward_degree, backward_degree); }
  int forward_degree() const override { return degrees_.forward; }
  int backward_degree() const override { return degrees_.backward; }

  PassTasks plan_pass(TaskGraph& graph, const MoePass& pass, int degree, bool forward) const override {
    const auto* f = dynamic_cast<const ForwardPass*>(&pass);
    PM_CHECK(f != nullptr, "planning from a pass that is not an expert-parallel forward");
    const DispatchHandle h = dispatcher_.with_degree(f->handle, f->gating.routing, degree);
    // the backward's deduplicated dispatch (where the shape has one) sends the share of rows the forward's did
    const double unique_share = dispatch_unique_share(measured_rows(shape_, f->tokens, f->handle, group_.rank()));
    const PassRows rows = measured_rows(shape_, f->tokens, h, group_.rank(), unique_share);
    return forward ? append_ep_forward(graph, {}, rows, nullptr) : append_ep_backward(graph, {}, rows, nullptr);
  }

  MoeForward append_forward(TaskGraph& graph, const std::vector<int>& after, const float* x, int64_t tokens,
                            float* y, const Between& between) override;
  PassTasks append_backward(TaskGraph& graph, const std::vector<int>& after, const MoePass& pass, const float* dy,
                            float* dx, RouterLossGrads loss_grads, const Between& between) override;

 private:

  const ExpertParallelStrategy& strategy_;
  MoeShape shape_;
  Communicator& group_;
  Backend& backend_;
  Dispatcher dispatcher_;
  PipelineDegrees degrees_;
  PackedExperts packed_;  // this rank's experts, packed for the passes
  bool inference_ = false;  // set_inference
  // Inference: the experts' fp32 weights gone once packed (the packing is final; it reads them no more)
  bool masters_released_ = false;
  std::shared_ptr<ForwardPass> last_forward_;
  std::shared_ptr<BackwardPass> last_backward_;
  std::unique_ptr<ExpertCache> cache_;  // offloaded experts (inference)
  // set for inference, or holding offloaded experts (which have no backward)
  bool inferring() const { return inference_ || cache_ != nullptr; }
  // The forward keeps only the experts' inputs; the backward makes the rest again.
  bool recomputes() const { return shape_.recompute_experts && !inferring(); }
  // The all-to-all carries float32 rows: the experts write their outputs straight into them.
  bool float_wire() const { return dispatcher_.wire() == Precision::fp32; }
  // The experts read the deduplicated dy where the dispatch left it, each row times its gate value
  // (BackwardPass::dy_src), instead of a scaled copy of every row. fp32 experts scale as their
  // GEMMs pack: faster and smaller. A bf16 expert rounds each product where it reads it: 22 MB less
  // a rank in a DeepSeek-style layer that recomputes its experts (289 -> 267 MB), but its backward
  // 1-6% slower on this project's Xeon (the float rows read twice against a bf16 copy written
  // once, docs/BENCHMARKS.md): so only where the layer recomputes, the mode that spends time on
  // memory.
  bool dy_by_pointer(const BackwardPass& b) const {
    return b.handle.dedup && (shape_.precision == Precision::fp32 || recomputes());
  }
  OffloadMode offload_mode_ = OffloadMode::resident;
  LayerWeights w_;

};

MoeForward ExpertParallelLayer::append_forward(TaskGraph& graph, const std::vector<int>& after, const float* x,
                                               int64_t tokens, float* y, const Between& between) {
  PM_REQUIRE(tokens > 0, "number of tokens must be positive, got {}", tokens);
  const MoeShape shape = shape_.with_tokens(tokens);
  shape.check_degree(std::max(degrees_.forward, degrees_.backward));
  std::shared_ptr<ForwardPass> p = reuse_pass(last_forward_);
  p->x = x;
  p->y = y;
  p->tokens = tokens;
  const int64_t M = shape.model_dim, H = shape.hidden, H1 = shape.fc1_width();
  const int degree = degrees_.forward;
  auto tasks = std::make_shared<PassTasks>();  // known once appended; the counts step fills in the real work

  ForwardSteps steps;
  steps.gate = [this, p, shape, degree] {
    p->gating = gate_forward(backend_, p->x, w_.wg.f32(), p->tokens, shape,
                             shape.balance_bias ? w_.router_bias.f32() : nullptr,
                             inferring() ? RouterLosses::skip : RouterLosses::compute);
    p->handle = dispatcher_.layout(p->gating.routing, degree, shape.dedup_dispatch && shape.top_k > 1);
    p->rank = group_.rank();
    const int64_t send_rows = p->handle.dedup ? p->handle.unique.send_rows : p->handle.tokens_wire.total_rows;
    p->send.resize(send_rows, shape.model_dim, dispatcher_.wire());
    p->back.resize(p->handle.tokens_wire.total_rows, shape.model_dim, dispatcher_.wire());
  };
  steps.pack = [this, p] { dispatcher_.pack(p->x, p->handle, p->send.out(0)); };
  steps.counts = [this, p, shape, tasks, &graph, M, H, H1] {
    dispatcher_.exchange_counts(p->handle);
    const int64_t rows = p->handle.experts_wire.total_rows;
    p->recv.resize(rows, M, dispatcher_.wire());
    if (p->handle.dedup) p->recv_unique.resize(p->handle.unique.recv_rows, M, dispatcher_.wire());
    p->inputs_in_place = p->handle.dedup && p->handle.unique.send_rows + p->handle.unique.recv_rows <= rows;
    if (p->inputs_in_place)
      p->u.release();
    else
      p->u.resize(rows, M, shape.precision);
    p->u_at.resize(rows, shape.precision);
    // recomputed in the backward: one block's room, what the forward's second GEMM reads
    const int64_t kept_rows = recomputes() ? largest_expert_block(p->handle.experts_compute) : rows;
    p->fc1_saved.resize(kept_rows * H1);
    p->act.resize(kept_rows, H, shape.precision);
    p->out.resize(outputs_in_place(backend_, float_wire()) ? 0 : output_piece_rows(backend_, rows) * M);  // (in_pieces)
    p->needed.clear();
    for (int le = 0; le < shape_.local_experts(); ++le) {
      int64_t n = 0;
      for (int q = 0; q < shape_.ranks; ++q) n += p->handle.recv_counts[q * shape_.local_experts() + le];
      if (n > 0) p->needed.push_back(le);
    }
    // the graph carries the real rows from here on (traces, the profiler's samples)
    set_ep_forward_work(graph, *tasks, measured_rows(shape_, p->tokens, p->handle, group_.rank()));
  };
  steps.pack_weights = [this] {
    if (cache_) {  // offloaded: resident experts are loaded once, the others when a pass needs them
      if (offload_mode_ == OffloadMode::resident) {
        std::vector<int> all(shape_.local_experts());
        for (int le = 0; le < shape_.local_experts(); ++le) all[le] = le;
        cache_->load(all, /*pin=*/true);
      }
      return;
    }
    if (inference_) return pack_for_inference();
    w_.pack_forward(backend_, shape_, packed_);
  };
  if (cache_ && offload_mode_ == OffloadMode::prefetch) steps.fetch = [this, p] { cache_->load(p->needed, /*pin=*/true); };
  steps.dispatch = [this, p](int c) {
    RowBuffer& arriving = p->handle.dedup ? p->recv_unique : p->recv;
    dispatcher_.dispatch_chunk(p->handle, c, p->send.in(0), arriving.out(0), kOwn);
  };
  steps.expert = [this, p, M, H, H1](int c) {
    const BlockLayout& wire = p->handle.experts_wire;
    const BlockLayout& compute = p->handle.experts_compute;
    const ChunkRuns runs(wire, compute, c, group_.rank(), dispatcher_, p->handle);
    for (int le = 0; le < shape_.local_experts(); ++le) {
      // (named, not a structured binding: the lambda below captures first, which C++20 allows and
      // Clang 14, the fuzz build's compiler, refuses)
      const auto block = expert_block(compute, c, le);
      const int64_t first = block.first, rows = block.second;
      if (rows == 0) continue;
      if (cache_) cache_->load({le}, /*pin=*/false);  // blocking: on demand, here (prefetched: already in)
      const PackedExpert& packed = cache_ ? cache_->packed(le) : packed_[le];
      const std::vector<RowRun> peers = sorted_runs_within(runs.in_peers, RunSide::destination, first, rows);
      const std::vector<RowRun> own = sorted_runs_within(runs.in_own, RunSide::destination, first, rows);
      const RowBuffer& arrived = p->handle.dedup ? p->recv_unique : p->recv;
      if (p->inputs_in_place) {  // the outputs go to recv
        p->u_at.set_runs(arrived.in(0), M, peers);
        p->u_at.set_runs(p->send.in(0), M, own);
      } else {  // each expert's rows copied in around its own FFN, while they are in cache
        p->u.copy_rows_from(backend_, arrived.in(0), peers);
        p->u.copy_rows_from(backend_, p->send.in(0), own);
        p->u_at.set_runs(p->u.in(0), M, {{first, first, rows}});
      }
      const bool keep = !inferring() && !recomputes();
      in_pieces(backend_, runs, first, rows, M, output_piece_rows(backend_, rows), float_wire(), p->out,
                p->recv.out(0), p->back.out(0), [&](int64_t r, int64_t n, OutputRows y) {
                  const int64_t s = recomputes() ? r - first : r;  // recomputed: the block's rows from the top
                  backend_.expert_forward(packed, n, M, H, p->u_at.from(r), &p->fc1_saved[s * H1], p->act.out(s), y,
                                          keep ? ForwardFor::backward : ForwardFor::inference);
                });
    }
    // u_at's rows, fc1_saved and act stay where this chunk put them: the backward reads them there,
    // by row (recompute_experts: u_at's only).
  };
  steps.combine = [this, p](int c) { dispatcher_.combine_chunk(p->handle, c, p->recv.in(0), p->back.out(0), kOwn); };
  steps.unpack = [this, p] {
    dispatcher_.unpack(p->back.in(0), p->gating.gate.data(), p->handle, p->y);
    if (cache_) cache_->end_pass();
    // every dispatch, expert and combine has run: the all-to-all's buffers are done with, except
    // where the experts' inputs stay for the backward (u_at)
    p->recv.release();
    if (inferring() || !p->inputs_in_place) {
      p->send.release();
      p->recv_unique.release();
      if (inferring()) p->u_at.release();
    }
    release(p->out);
    if (recomputes()) {  // the backward makes its own
      p->act.release();
      release(p->fc1_saved);
    }
  };

  *tasks = append_ep_forward(graph, after, balanced_rows(shape, degree), &steps, between);
  return {*tasks, p};
}

PassTasks ExpertParallelLayer::append_backward(TaskGraph& graph, const std::vector<int>& after, const MoePass& pass,
                                               const float* dy, float* dx, RouterLossGrads loss_grads,
                                               const Between& between) {
  const auto* f = dynamic_cast<const ForwardPass*>(&pass);
  PM_CHECK(f != nullptr, "backward of a pass that is not an expert-parallel forward");
  PM_REQUIRE(!cache_, "a layer with offloaded experts is for inference only: it has no backward");
  PM_REQUIRE(!inference_, "a backward of a layer set for inference");
  // the backward's tasks keep the forward's saved tensors alive
  std::shared_ptr<ForwardPass> fp = std::const_pointer_cast<ForwardPass>(f->shared_from_this());
  std::shared_ptr<BackwardPass> b = reuse_pass(last_backward_);
  b->dy = dy;
  b->dx = dx;
  const MoeShape shape = shape_.with_tokens(fp->tokens);
  const int64_t M = shape.model_dim, H = shape.hidden, H1 = shape.fc1_width();
  const int degree = degrees_.backward;
  const int k = shape.top_k;
  auto tasks = std::make_shared<PassTasks>();

  BackwardSteps steps;
  steps.pack_grad = [this, fp, b, degree, M, H, H1, shape, tasks, &graph] {
    b->handle = dispatcher_.with_degree(fp->handle, fp->gating.routing, degree);
    if (scale_grad_dispatch_on_experts(shape))
      dispatcher_.scale_on_expert_side(b->handle, fp->gating.gate.data(), fp->handle);
    const int64_t rows = b->handle.experts_wire.total_rows;
    if (b->handle.dedup)
      b->send.resize(b->handle.unique.send_rows, M, Precision::fp32);
    else
      b->send.resize(b->handle.tokens_wire.total_rows, M, dispatcher_.wire());
    b->back.resize(b->handle.tokens_wire.total_rows, M, dispatcher_.wire());
    b->recv.resize(rows, M, dispatcher_.wire());
    // bf16 output gradients stay bf16 for a bf16 expert (its GEMMs round them to bf16 anyway, and
    // the bias gradient adds the same values widened): no widening copy, half the bytes
    const bool dy_bf16 = dispatcher_.wire() == Precision::bf16 && shape.precision == Precision::bf16;
    if (dy_by_pointer(*b)) {
      b->dy_rows.release();
      b->dy_src.assign(rows, nullptr);
    } else {
      b->dy_rows.resize(rows, M, dy_bf16 ? Precision::bf16 : Precision::fp32);
    }
    b->dhpre.resize(rows * H1);
    b->du.resize(outputs_in_place(backend_, float_wire()) ? 0 : output_piece_rows(backend_, rows) * M);  // (in_pieces)
    if (recomputes()) {
      b->fc1_saved.resize(rows * H1);
      b->act.resize(rows, H, shape.precision);
    }
    dispatcher_.pack_scaled(b->dy, fp->gating.gate.data(), b->handle, b->send.out(0));
    set_ep_backward_work(graph, *tasks, measured_rows(shape_, fp->tokens, b->handle, group_.rank()));
  };
  steps.pack_weights = [this] { w_.pack_backward(backend_, shape_, packed_); };
  steps.gate_backward = [this, fp, b, shape, loss_grads, M, k] {
    const int64_t T = fp->tokens;
    // d loss / d gate value = <dy_t, FFN_e(x_t)> for kept choices.
    std::vector<float> dgate(T * k);
    backend_.combine_rows_backward_gate(b->dy, fp->back.in(0), T, M, k, fp->handle.positions.data(), dgate.data());
    b->dlogits = gate_backward_logits(backend_, fp->x, shape, fp->gating, dgate.data(), loss_grads, w_.dwg.f32());
    const int E = shape.experts;
    const float* wg = w_.wg.f32();
    b->wg_t.resize(E * M);
    transpose(wg, M, E, b->wg_t.data());
  };
  steps.grad_dispatch = [this, b, M](int c) {
    if (b->handle.dedup && c == 0) {
      dispatcher_.exchange_unique_counts(b->handle);
      b->recv_unique.resize(b->handle.unique.recv_rows, M, Precision::fp32);
    }
    RowBuffer& arriving = b->handle.dedup ? b->recv_unique : b->recv;
    dispatcher_.dispatch_chunk(b->handle, c, b->send.in(0), arriving.out(0), kOwn);
  };
  steps.expert_dgrad = [this, fp, b, M, H, H1](int c) {
    const BlockLayout& wire = b->handle.experts_wire;
    const BlockLayout& compute = b->handle.experts_compute;
    const ChunkRuns runs(wire, compute, c, group_.rank(), dispatcher_, b->handle);
    // the pre-activations of this chunk's rows, wherever the forward's chunks left them (recomputed:
    // in this chunk's rows of the backward's own)
    const std::vector<int64_t> forward_rows = chunk_row_positions(compute, fp->handle.experts_compute, c);
    const int64_t chunk_first = compute.chunk_offset(c);
    std::vector<const float*> saved_rows;
    if (recomputes()) {
      saved_rows.resize(forward_rows.size());
      for (std::size_t i = 0; i < saved_rows.size(); ++i) saved_rows[i] = &b->fc1_saved[(chunk_first + i) * H1];
    } else {
      saved_rows = row_pointers(fp->fc1_saved.data(), H1, forward_rows);
    }
    const bool scaled = b->handle.dedup, by_pointer = dy_by_pointer(*b);
    if (scaled) dispatcher_.gates_to_experts(b->handle, c, b->dy_gate);
    for (int le = 0; le < shape_.local_experts(); ++le) {
      auto [first, rows] = expert_block(compute, c, le);
      if (rows == 0) continue;  // (indexing an empty chunk's rows would be undefined behaviour)
      if (recomputes()) {  // the first GEMM and the activation again, on the inputs the forward kept
        const int64_t* at = &forward_rows[first - chunk_first];
        const RowList u = fp->u_at.picked(std::vector<int64_t>(at, at + rows));
        backend_.expert_forward(packed_[le], rows, M, H, u.pointers(), &b->fc1_saved[first * H1],
                                b->act.out(first), nullptr, ForwardFor::backward);
      }
      const std::vector<RowRun> peers = sorted_runs_within(runs.in_peers, RunSide::destination, first, rows);
      const std::vector<RowRun> own = sorted_runs_within(runs.in_own, RunSide::destination, first, rows);
      if (by_pointer) {  // where each row's dy sits; the GEMMs scale it by its gate value
        for (const auto& [src, list] : {std::pair{b->recv_unique.in(0).f32, &peers}, std::pair{b->send.in(0).f32, &own}})
          for (const RowRun& run : *list)
            for (int64_t i = 0; i < run.rows; ++i) b->dy_src[run.dst_row + i] = src + (run.src_row + i) * M;
      } else if (scaled) {  // gate * dy made here: the product the token side would have sent
        b->dy_rows.copy_scaled_rows_from(backend_, b->recv_unique.in(0).f32, peers, b->dy_gate.data());
        b->dy_rows.copy_scaled_rows_from(backend_, b->send.in(0).f32, own, b->dy_gate.data());
      } else {
        b->dy_rows.copy_rows_from(backend_, b->recv.in(0), peers);
        b->dy_rows.copy_rows_from(backend_, b->send.in(0), own);
      }
      in_pieces(backend_, runs, first, rows, M, output_piece_rows(backend_, rows), float_wire(), b->du,
                b->recv.out(0), b->back.out(0), [&](int64_t r, int64_t n, OutputRows du) {
                  const DyRows dy = by_pointer ? DyRows::scaled(&b->dy_src[r], &b->dy_gate[r]) : DyRows(b->dy_rows.in(r));
                  backend_.expert_backward_input(packed_[le], n, M, H, dy, &saved_rows[r - chunk_first],
                                                 &b->dhpre[r * H1], du);
                });
    }
    // dy and dhpre stay where this chunk put them: the weight gradients read them there, by row.
  };
  steps.grad_combine = [this, b](int c) {
    dispatcher_.combine_chunk(b->handle, c, b->recv.in(0), b->back.out(0), kOwn);
  };
  steps.expert_wgrad = [this, fp, b, M, H, H1] {
    for (int le = 0; le < shape_.local_experts(); ++le) {
      // every row in canonical order, read where the forward and backward chunks left it
      std::vector<int64_t> fwd = canonical_row_positions(fp->handle.experts_compute, le);
      std::vector<int64_t> bwd = canonical_row_positions(b->handle.experts_compute, le);
      ExpertRows rows;
      fp->u_at.add_rows(fwd, rows.u, rows.u_bf16);
      if (recomputes())
        b->act.add_rows(bwd, rows.act, rows.act_bf16);
      else
        fp->act.add_rows(fwd, rows.act, rows.act_bf16);
      rows.dhpre = row_pointers(b->dhpre.data(), H1, bwd);
      if (dy_by_pointer(*b)) {
        for (int64_t p : bwd) rows.dy.push_back(b->dy_src[p]), rows.dy_scale.push_back(b->dy_gate[p]);
      } else {
        b->dy_rows.add_rows(bwd, rows.dy, rows.dy_bf16);
      }
      backend_.expert_weight_grads(w_.grads_of(shape_, le), shape_.activation, shape_.precision, M, H, rows);
    }
    // after every expert_dgrad (its dependencies): the experts' gradient rows are done with, and
    // the rows of dy they read in place (unpack_grad may have run already: it does not wait for this)
    if (dy_by_pointer(*b)) {
      b->send.release();
      b->recv_unique.release();
      std::vector<const float*>().swap(b->dy_src);
    }
    b->dy_rows.release();
    for (ScratchBuffer<float>* done : {&b->dhpre, &b->du, &b->fc1_saved}) release(*done);
    b->act.release();
  };
  steps.unpack_grad = [this, b] {
    dispatcher_.unpack_sum(b->back.in(0), b->handle, b->dlogits.data(), b->wg_t.data(), shape_.experts, b->dx);
    // after every grad_combine and the gate's backward: the all-to-all's buffers are done with
    // (but the rows of dy the weight gradients read in place: expert_wgrad gives those back)
    for (RowBuffer* done : {&b->recv, &b->back}) done->release();
    if (!dy_by_pointer(*b))
      for (RowBuffer* done : {&b->send, &b->recv_unique}) done->release();
  };

  *tasks = append_ep_backward(graph, after, balanced_rows(shape, degree), &steps, between);
  return *tasks;
}

}  // namespace

PassTasks ExpertParallelStrategy::plan_forward(TaskGraph& graph, const std::vector<int>& after, const MoeShape& shape,
                                               int degree, const Between& between) const {
  return append_ep_forward(graph, after, balanced_rows(shape, degree), nullptr, between);
}

PassTasks ExpertParallelStrategy::plan_backward(TaskGraph& graph, const std::vector<int>& after, const MoeShape& shape,
                                                int degree, const Between& between) const {
  return append_ep_backward(graph, after, balanced_rows(shape, degree), nullptr, between);
}

std::unique_ptr<MoeLayer> ExpertParallelStrategy::make_layer(const MoeShape& shape, Communicator& group,
                                                             Backend& backend) const {
  return std::make_unique<ExpertParallelLayer>(*this, shape, group, backend);
}

}  // namespace pm
