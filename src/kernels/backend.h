// The backend seam: where a rank's memory lives and which kernels run on it.
//
// moe/ and model/ see only this header: they allocate through a Backend (Buffer<T>) and call its
// kernels, never a CPU function directly. The CPU backend (kernels/cpu) implements every entry;
// the CUDA backend (kernels/cuda) runs the GEMMs and the experts on a GPU with the CPU's bits and
// forwards the rest to the CPU backend (ForwardingBackend). Every kernel here is deterministic:
// the same inputs give the same bits whatever the thread count, the rows' positions, or how a
// pass is split into pipeline chunks.
//
// Shapes are row-major and named in the comments; pointers are to the backend's memory.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "core/tensor.h"

namespace pm {

enum class Trans { no, yes };

// An expert's activation. gelu: GeLU(u W1 + b1) W2 + b2, W1 [M, H], b1 [H] (GShard, Switch).
// swiglu: (SiLU(u W1g + b1g) * (u W1v + b1v)) W2 + b2 (Llama, Mixtral, DeepSeek, Qwen), W1 =
// [W1g | W1v] [M, 2H] and b1 = [b1g | b1v] [2H] side by side; the pre-activation is [g | v].
enum class Activation : uint8_t { gelu, swiglu };
// Columns of W1 and of the pre-activation.
inline int64_t fc1_width(Activation a, int64_t H) { return a == Activation::swiglu ? 2 * H : H; }
// What an expert's forward is for: a backward follows (keep what it reads), or inference.
enum class ForwardFor : uint8_t { backward, inference };

// The precision of a GEMM's operands. fp32: float32 throughout. bf16: both operands rounded to
// bf16 (to nearest even), products accumulated in fp32, the output fp32 (kernels/cpu/gemm.h says
// in which order); everything around the GEMMs (biases, activations, softmax, LayerNorm, losses,
// the router) stays fp32.
enum class Precision : uint8_t { fp32, bf16 };

// One expert's FFN weights laid out for this backend's GEMMs: packed once per pass, reused by
// every pipeline chunk. Opaque outside the backend.
class PackedExpert {
 public:
  virtual ~PackedExpert() = default;
};

// A weight matrix laid out once for this backend's GEMMs (op(B) of gemm, in a precision), for
// weights that do not change between passes (inference). Opaque outside the backend.
class PackedMatrix {
 public:
  virtual ~PackedMatrix() = default;
};

// Where an expert's weight gradients go (added to): w1 [M, H1], b1 [H1], w2 [H, M], b2 [M], with
// H1 = fc1_width(activation, H).
struct ExpertGrads {
  float* w1;
  float* b1;
  float* w2;
  float* b2;
};

// Rows of floats, or of bf16 values (their uint16_t bit patterns). A bf16 expert may keep the
// rows only its GEMMs read (its inputs and activations) in bf16: bf16 GEMMs round them to bf16
// anyway, so the results are the bits of float storage, in half the bytes. Either pointer
// converts implicitly.
template <typename F, typename B>
struct FloatOrBf16 {
  F* f32 = nullptr;
  B* bf16 = nullptr;
  FloatOrBf16(F* p) : f32(p) {}  // NOLINT(google-explicit-constructor): converts like a pointer
  FloatOrBf16(B* p) : bf16(p) {}  // NOLINT(google-explicit-constructor)
};
using RowsIn = FloatOrBf16<const float, const uint16_t>;
using RowsOut = FloatOrBf16<float, uint16_t>;
// Rows that sit anywhere, one pointer per row (float rows, or bf16 rows), e.g. an expert's input
// rows where the all-to-all left them.
using RowPointers = FloatOrBf16<const float* const, const uint16_t* const>;

// Where an expert writes its float output rows: one block of rows, each `width` floats after the
// last (a pointer converts implicitly; null: no output), or each row by its pointer
// (by_pointer): the all-to-all's rows, so that no copy takes them there from a buffer. bf16 rows
// by pointer (a bf16 all-to-all's) take each value rounded to bf16 (float_to_bf16's rounding).
struct OutputRows {
  float* block = nullptr;
  float* const* rows = nullptr;
  uint16_t* const* rows16 = nullptr;
  OutputRows(float* p = nullptr) : block(p) {}  // NOLINT(google-explicit-constructor): converts like a pointer
  static OutputRows by_pointer(float* const* rows) {
    OutputRows o;
    o.rows = rows;
    return o;
  }
  static OutputRows by_pointer(uint16_t* const* rows) {
    OutputRows o;
    o.rows16 = rows;
    return o;
  }
  explicit operator bool() const { return block != nullptr || rows != nullptr || rows16 != nullptr; }
  OutputRows from(int64_t i, int64_t width) const {
    if (rows16) return by_pointer(rows16 + i);
    return rows ? by_pointer(rows + i) : OutputRows(block + i * width);
  }
};

// An expert's output gradients for its backward: a block of rows (floats, or bf16 values for a
// bf16 expert), or float rows anywhere (by pointer), row i read as scale[i] times the row: the
// deduplicated dispatch brings a token's dy to a rank once, and each choice of it there is its
// gate value times dy. The products are those a copy of the scaled rows would hold (one float
// product a value, gate * dy; a bf16 expert rounds each to bf16, as its bf16 copy held them). An
// fp32 expert makes them as its GEMMs pack the rows, a bf16 one in a block of its own rows: the
// copy of the whole pass is never written.
struct DyRows {
  RowsIn block;
  const float* const* rows = nullptr;
  const float* scale = nullptr;
  DyRows(RowsIn b) : block(b) {}  // NOLINT(google-explicit-constructor): converts like a pointer
  DyRows(const float* p) : block(p) {}  // NOLINT(google-explicit-constructor)
  DyRows(const uint16_t* p) : block(p) {}  // NOLINT(google-explicit-constructor)
  static DyRows scaled(const float* const* rows, const float* scale) {
    DyRows d(static_cast<const float*>(nullptr));
    d.rows = rows;
    d.scale = scale;
    return d;
  }
};

// A run of rows copied from one buffer to another.
struct RowRun {
  int64_t src_row, dst_row, rows;
};

// A list of row pointers of one type (float rows or bf16 rows), e.g. where each of an expert's
// input rows sits.
class RowList {
 public:
  RowList() = default;
  // `rows` rows of `width` values one after the other from `first`: a block of rows as pointers.
  RowList(RowsIn first, int64_t rows, int64_t width);
  // `rows` pointers of `precision`'s type, null until set.
  void resize(int64_t rows, Precision precision);
  // Row i at `row`, of the list's type; rows [dst_row, dst_row + rows) of each run at src's rows
  // [src_row, src_row + rows) (RowRun), `width` values each.
  void set(int64_t i, RowsIn row);
  void set_runs(RowsIn src, int64_t width, const std::vector<RowRun>& runs);
  RowPointers from(int64_t i) const;  // the pointers from row i on
  RowList picked(const std::vector<int64_t>& positions) const;  // the rows at `positions`
  RowPointers pointers() const { return from(0); }
  // The rows at `positions` appended to f32 or bf16 by the list's type (ExpertRows).
  void add_rows(const std::vector<int64_t>& positions, std::vector<const float*>& f32,
                std::vector<const uint16_t*>& bf16) const;
  int64_t bytes() const;
  void release();

 private:
  bool is_bf16_ = false;
  std::vector<const float*> f32_;
  std::vector<const uint16_t*> bf16_;
};

// Rows of one expert's saved tensors, in the order the weight gradients sum them (canonical:
// peer, then row), each pointing wherever the pipeline chunks left it. A bf16 expert's inputs and
// activations may be bf16 rows (u_bf16, act_bf16 instead of u, act), and so may its output
// gradients when they arrived in bf16 (dy_bf16: values a bf16 all-to-all carried, exact).
struct ExpertRows {
  std::vector<const float*> u, act;     // forward: inputs [M], activations [H]
  std::vector<const float*> dhpre, dy;  // backward: pre-activation grads [H1], output grads [M]
  std::vector<const uint16_t*> u_bf16, act_bf16, dy_bf16;
  // empty, or one per float row of dy: dy's row i is dy_scale[i] times it (DyRows::scaled)
  std::vector<float> dy_scale;
  size_t rows() const { return dy.size() + dy_bf16.size(); }
  // Throws (internal) unless every list has the same rows, each of u, act and dy in one form, and
  // bf16 rows only for a bf16 expert: what every backend's expert_weight_grads asks first.
  void check(Precision precision) const;
};

class Backend {
 public:
  virtual ~Backend() = default;
  virtual std::string name() const = 0;    // e.g. "cpu (avx512, 2 threads)"
  virtual Device device() const = 0;
  virtual int threads() const = 0;         // compute threads one kernel call uses
  // How this backend runs bf16 GEMMs, e.g. "avx512_bf16", or "fp32 kernels" where the CPU lacks
  // bf16 instructions (the same bits, without the speed-up).
  virtual std::string bf16_path() const = 0;
  // What a user should know about that path ("" where bf16 runs at full speed), e.g. that this
  // CPU lacks the instructions.
  virtual std::string bf16_note() const { return ""; }

  // Memory. Buffers of the CPU backend are the host's; a device backend hands out memory the
  // host can also address (managed memory), so Buffer<T> works the same on both.
  virtual void* allocate(std::size_t bytes) = 0;
  virtual void deallocate(void* data) = 0;

  // ---- dense linear algebra and rows ---------------------------------------------------------
  // C[M, N] = beta * C + op(A)[M, K] op(B)[K, N], beta 0 or 1. op(A) = A[M, K] (lda >= K) or,
  // with Trans::yes, the transpose of A[K, M] (lda >= M); likewise B. Each element is one
  // multiply-add chain over k in order.
  virtual void gemm(Trans trans_a, Trans trans_b, int64_t M, int64_t N, int64_t K, const float* A, int64_t lda,
                    const float* B, int64_t ldb, float beta, float* C, int64_t ldc) = 0;
  // rows[n, width] = bias[width] in every row.
  virtual void fill_rows(float* rows, int64_t n, int64_t width, const float* bias) = 0;
  // sums[width] += sum over the n rows of rows[n, width], in row order.
  virtual void add_column_sums(const float* rows, int64_t n, int64_t width, float* sums) = 0;
  // The same product as a bf16 GEMM (Precision::bf16); A may be bf16 rows (kept activations).
  virtual void gemm_bf16(Trans trans_a, Trans trans_b, int64_t M, int64_t N, int64_t K, RowsIn A, int64_t lda,
                         const float* B, int64_t ldb, float beta, float* C, int64_t ldc) = 0;
  // gemm or gemm_bf16
  void gemm_as(Precision precision, Trans trans_a, Trans trans_b, int64_t M, int64_t N, int64_t K, const float* A,
            int64_t lda, const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
    if (precision == Precision::bf16)
      gemm_bf16(trans_a, trans_b, M, N, K, A, lda, B, ldb, beta, C, ldc);
    else
      gemm(trans_a, trans_b, M, N, K, A, lda, B, ldb, beta, C, ldc);
  }
  // op(B)[K, N] packed once (`precision` says which GEMM it serves), then C[M, N] = beta * C +
  // op(A)[M, K] op(B) with it: the bits of gemm_as(precision, ...) on the same operands.
  virtual std::unique_ptr<PackedMatrix> pack_matrix(Precision precision, Trans trans_b, int64_t K, int64_t N,
                                                    const float* B, int64_t ldb) = 0;
  virtual void gemm_prepacked(Trans trans_a, int64_t M, const float* A, int64_t lda, const PackedMatrix& B, float beta,
                              float* C, int64_t ldc) = 0;
  // y[M, N] = x[M, K] w[K, N] + bias[N] (bias null: zeros) in `precision`, w packed beforehand
  // where `packed` is given; x may be bf16 rows (an activation kept in bf16: a bf16 product). The
  // bits of filling y's rows with the bias and then gemm_as (or gemm_prepacked) with beta 1, which
  // is what this default does. The CPU backend starts each element's chain from the bias in the
  // kernel instead: no pass writing y and reading it back.
  virtual void linear(Precision precision, int64_t M, int64_t N, int64_t K, RowsIn x, const float* w,
                      const PackedMatrix* packed, const float* bias, float* y);  // (backend_linear.cpp)
  // y[n] += alpha * x[n]
  virtual void axpy(float alpha, const float* x, float* y, int64_t n) = 0;
  // dst rows from src rows, width values each, run by run; floats into bf16 rows are rounded to
  // nearest even, bf16 into float rows widened.
  virtual void copy_rows(RowsIn src, RowsOut dst, int64_t width, const std::vector<RowRun>& runs) = 0;
  // dst row = dst_scale[its dst row] * src row, run by run: the same fp32 product as
  // combine_rows_backward_slots, rounded to nearest even into bf16 rows (the deduplicated backward
  // dispatch scales its float32 rows on the expert side: the bits the token side would have sent).
  virtual void copy_rows_scaled(const float* src, RowsOut dst, int64_t width, const std::vector<RowRun>& runs,
                                const float* dst_scale) = 0;

  // ---- activations and normalisation -----------------------------------------------------------
  // out[n] = GeLU(in[n]) (exact erf form); grad_in[n] = grad_out[n] * GeLU'(in[n]).
  virtual void gelu_forward(const float* in, float* out, int64_t n) = 0;
  virtual void gelu_backward(const float* in, const float* grad_out, float* grad_in, int64_t n) = 0;
  // Each of `rows` rows of hpre is a pre-activation [g | v] of 2n values: act[rows, n] =
  // SiLU(g) * v; the backward writes dhpre[rows, 2n] from dact[rows, n].
  virtual void swiglu_rows_forward(const float* hpre, float* act, int64_t rows, int64_t n) = 0;
  virtual void swiglu_rows_backward(const float* hpre, const float* dact, float* dhpre, int64_t rows, int64_t n) = 0;
  // probs[rows, cols] = softmax(logits) per row; dlogits = probs * (dprobs - <probs, dprobs>).
  virtual void softmax_rows(const float* logits, float* probs, int64_t rows, int64_t cols) = 0;
  virtual void softmax_rows_backward(const float* probs, const float* dprobs, float* dlogits, int64_t rows,
                                     int64_t cols) = 0;
  // index[rows, k], value[rows, k]: each row's k largest values, largest first, ties to the lower index.
  virtual void topk_rows(const float* values, int64_t rows, int64_t cols, int k, int32_t* index, float* value) = 0;
  // y = (x - mean) / sqrt(var + eps) * gamma + beta over rows of D; keeps mean[rows], rstd[rows].
  virtual void layernorm_forward(const float* x, const float* gamma, const float* beta, int64_t rows, int64_t D,
                                 float eps, float* y, float* mean, float* rstd) = 0;
  // dx overwritten; dgamma, dbeta added to.
  virtual void layernorm_backward(const float* x, const float* gamma, const float* mean, const float* rstd,
                                  const float* dy, int64_t rows, int64_t D, float* dx, float* dgamma, float* dbeta) = 0;

  // y = x / sqrt(mean(x^2) + eps) * gamma over rows of D (RMSNorm); keeps rstd[rows].
  virtual void rmsnorm_forward(const float* x, const float* gamma, int64_t rows, int64_t D, float eps, float* y,
                               float* rstd) = 0;
  // dx overwritten; dgamma added to.
  virtual void rmsnorm_backward(const float* x, const float* gamma, const float* rstd, const float* dy, int64_t rows,
                                int64_t D, float* dx, float* dgamma) = 0;
  // Rotary position embedding in place of every head (hd values) in columns [0, width) of x's rows
  // (stride ld; the queries and keys of a qkv buffer; kernels/cpu/rope.h): row t at position
  // pos[t] (pos null: t % S), cosines and sines from cos, sin [positions, hd / 2]; inverse turns a
  // gradient back.
  virtual void rope_rotate(float* x, int64_t rows, int64_t ld, int64_t width, int64_t hd, const int64_t* pos,
                           int64_t S, const float* cos, const float* sin, bool inverse) = 0;

  // ---- attention and loss (see kernels/cpu/attention.h for the layouts) ------------------------
  // heads query heads of hd values sharing kv_heads key/value heads (grouped-query; kv_heads ==
  // heads: multi-head); qkv rows [q | k | v] of D + 2 Dkv values (D = heads hd, Dkv = kv_heads hd).
  virtual void attention_forward(const float* qkv, int64_t B, int64_t S, int64_t heads, int64_t kv_heads, int64_t hd,
                                 float* probs, float* out) = 0;
  virtual void attention_backward(const float* qkv, const float* probs, const float* dout, int64_t B, int64_t S,
                                  int64_t heads, int64_t kv_heads, int64_t hd, float* dqkv) = 0;
  // Inference: B new tokens (qkv[B, D + 2 Dkv]), token b of cache row rows[b] (null: row b) at
  // pos[b], against k_cache [rows, Dkv, S_max] (transposed) and v_cache [rows, S_max, Dkv]; its key
  // and value go in at pos[b]; out[B, D]; tokens of one row in position order
  // (kernels/cpu/attention.h). The same bits as attention_forward's row pos[b].
  virtual void attention_decode(const float* qkv, float* k_cache, float* v_cache, const int64_t* pos,
                                const int64_t* rows, int64_t B, int64_t S_max, int64_t heads, int64_t kv_heads,
                                int64_t hd, float* out) = 0;
  // losses[rows] (nats); dlogits[rows, V] = (softmax - onehot) * scale when not null.
  virtual void cross_entropy(const float* logits, const int32_t* targets, int64_t rows, int64_t V, float* losses,
                             float* dlogits, float scale) = 0;
  // The same over a vocabulary split across ranks, this rank holding columns [lo, lo + V) of the
  // logits, in three calls with a sum over the ranks between them: (1) max[rows], each row's max
  // over this shard (then the max over the ranks); (2) from that max, sums[2 rows]: each row's sum
  // of exp(z - max) over this shard and the target's logit if it lies in it, else 0 (then summed
  // over the ranks); (3) from those, losses[rows] = log(sum) + max - logit[target], and, when
  // dlogits is not null, this shard's (softmax - onehot) * scale.
  virtual void shard_row_max(const float* logits, int64_t rows, int64_t V, float* max) = 0;
  virtual void shard_exp_sums(const float* logits, const int32_t* targets, int64_t rows, int64_t V, int64_t lo,
                              const float* max, double* sums) = 0;
  virtual void shard_cross_entropy(const float* logits, const int32_t* targets, int64_t rows, int64_t V, int64_t lo,
                                   const float* max, const double* sums, float* losses, float* dlogits,
                                   float scale) = 0;

  // ---- MoE: moving token rows to expert slots and back -----------------------------------------
  // position[t * k + j]: the slot row of token t's choice j, -1 when dropped.
  //   dispatch: slots[position] = x[t];  combine: y[t] = sum_j gate[t, j] * slots[position] (j in order)
  // Slots may be bf16 rows (a bf16 all-to-all's buffers): written rounded, read widened.
  virtual void dispatch_rows(const float* x, int64_t T, int64_t M, int k, const int64_t* position, RowsOut slots) = 0;
  virtual void combine_rows(RowsIn slots, const float* gate, int64_t T, int64_t M, int k, const int64_t* position,
                            float* y) = 0;
  // dx[t] += sum_j dslots[position] (j in order)
  virtual void dispatch_rows_backward(RowsIn dslots, int64_t T, int64_t M, int k, const int64_t* position,
                                      float* dx) = 0;
  // dslots[position] = gate[t, j] * dy[t]
  virtual void combine_rows_backward_slots(const float* dy, const float* gate, int64_t T, int64_t M, int k,
                                           const int64_t* position, RowsOut dslots) = 0;
  // dgate[t, j] = <dy[t], slots[position]> (0 for dropped choices)
  virtual void combine_rows_backward_gate(const float* dy, RowsIn slots, int64_t T, int64_t M, int k,
                                          const int64_t* position, float* dgate) = 0;

  // ---- MoE: one expert's FFN on a block of rows (see Activation; H1 = fc1_width) ----------------
  // Its GEMMs run in `precision` (the weights are packed rounded to bf16 for a bf16 expert).
  virtual std::unique_ptr<PackedExpert> new_packed_expert(Activation activation, Precision precision) = 0;
  // W1 [M, H1], W2 [H, M], b1 [H1], b2 [M] (the biases are read at run time, not copied).
  virtual void pack_expert_forward(PackedExpert& packed, const float* w1, const float* w2, const float* b1,
                                   const float* b2, int64_t M, int64_t H) = 0;
  virtual void pack_expert_backward(PackedExpert& packed, const float* w1, const float* w2, int64_t M, int64_t H) = 0;
  // act[rows, H] = the activation of the pre-activation u W1 + b1; y[rows, M] = act W2 + b2. u's
  // rows sit anywhere (u[i]: row i), where the all-to-all left them (RowList for a block). u
  // and act may be bf16 rows for a bf16 expert (act then holds the activation rounded to bf16).
  // saved[rows, H1] holds what the backward reads (ForwardFor::backward): SwiGLU's pre-activation,
  // GeLU's derivative at it; for an inference pass, whatever the kernels left there. y null: the
  // activation only, no second GEMM (a backward recomputing what a forward did not keep). y's rows
  // may sit anywhere (OutputRows::by_pointer).
  virtual void expert_forward(const PackedExpert& packed, int64_t rows, int64_t M, int64_t H, RowPointers u,
                              float* saved, RowsOut act, OutputRows y, ForwardFor use) = 0;
  // dhpre[rows, H1] = the activation's backward of dy W2^T; du[rows, M] = dhpre W1^T. dy may be
  // bf16 rows for a bf16 expert. saved_rows[i] points at row i's saved values (expert_forward)
  // wherever the forward left them; du's rows may sit anywhere (OutputRows::by_pointer).
  virtual void expert_backward_input(const PackedExpert& packed, int64_t rows, int64_t M, int64_t H, DyRows dy,
                                     const float* const* saved_rows, float* dhpre, OutputRows du) = 0;
  // grads.w2 += act^T dy, b2 += colsum(dy), w1 += u^T dhpre, b1 += colsum(dhpre), over the rows in
  // order: the same bits whatever pipeline degrees produced them.
  virtual void expert_weight_grads(const ExpertGrads& grads, Activation activation, Precision precision, int64_t M,
                                   int64_t H, const ExpertRows& rows) = 0;
};

// The CPU backend (kernels/cpu): the engine's own AVX-512/AVX2/scalar kernels.
Backend& cpu_backend();

// The backend a run asks for (`pipemoe --backend`): "cpu", or "cuda" (kernels/cuda/cuda_backend.h:
// GEMMs and experts on the GPU, the same bits); anything else, or "cuda" where it cannot run
// (no CUDA in this build, no GPU), is a usage error that says why.
Backend& backend_named(const std::string& name);

// An allocator that takes memory from a backend, so that standard containers hold backend memory.
template <typename T>
struct BackendAllocator {
  using value_type = T;
  Backend* backend;
  BackendAllocator() : backend(&cpu_backend()) {}
  explicit BackendAllocator(Backend& b) : backend(&b) {}
  template <typename U>
  BackendAllocator(const BackendAllocator<U>& other) : backend(other.backend) {}
  T* allocate(std::size_t n) { return static_cast<T*>(backend->allocate(n * sizeof(T))); }
  void deallocate(T* p, std::size_t) { backend->deallocate(p); }
  template <typename U>
  bool operator==(const BackendAllocator<U>& other) const { return backend == other.backend; }
};

// A resizable buffer of a backend's memory (64-byte aligned).
template <typename T>
using Buffer = std::vector<T, BackendAllocator<T>>;

// The same allocator, except that a resize leaves new elements of trivial types uninitialised:
// for a pass's buffers, which their first step overwrites whole (zero-filling them again every
// pass cost 3% of a layer's backward).
template <typename T>
struct UninitAllocator : BackendAllocator<T> {
  using BackendAllocator<T>::BackendAllocator;
  template <typename U>
  struct rebind {
    using other = UninitAllocator<U>;
  };
  template <typename U>
  void construct(U* p) noexcept(std::is_nothrow_default_constructible_v<U>) {
    ::new (static_cast<void*>(p)) U;
  }
  template <typename U, typename... Args>
  void construct(U* p, Args&&... args) {
    ::new (static_cast<void*>(p)) U(std::forward<Args>(args)...);
  }
};
template <typename T>
using ScratchBuffer = std::vector<T, UninitAllocator<T>>;

}  // namespace pm
