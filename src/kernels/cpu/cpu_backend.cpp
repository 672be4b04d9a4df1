// The CPU backend: the Backend table (kernels/backend.h) filled with the engine's own CPU kernels.
#include <cstdlib>
#include <cstring>
#include <limits>
#include <new>

#include "core/aligned.h"
#include "core/block_cache.h"
#include "core/tensor.h"
#include "kernels/backend.h"
#include "kernels/cpu/attention.h"
#include "kernels/cpu/cross_entropy.h"
#include "kernels/cpu/dispatch.h"
#include "kernels/cpu/elementwise.h"
#include "kernels/cpu/expert_ffn.h"
#include "kernels/cpu/gemm.h"
#include "kernels/cpu/layernorm.h"
#include "kernels/cpu/rope.h"
#include "kernels/cpu/thread_pool.h"

namespace pm {
namespace {

void* aligned_allocate(std::size_t bytes) {
  void* p = allocate_aligned(bytes);  // whole cache lines for the vector kernels (core/aligned.h)
  if (!p) throw std::bad_alloc();
  return p;
}

struct CpuPackedMatrix final : PackedMatrix {
  PackedB b;
};

class CpuBackend final : public Backend {
 public:
  std::string bf16_path() const override { return gemm_bf16_path(); }
  std::string bf16_note() const override { return gemm_bf16_note(); }
  std::string name() const override { return "cpu (" + gemm_isa() + ", " + std::to_string(threads()) + " threads)"; }
  Device device() const override { return Device::cpu; }
  int threads() const override { return compute_threads(); }

  // Large buffers through a cache (core/block_cache.h): passes free and allocate the same sizes
  // every step.
  void* allocate(std::size_t bytes) override { return blocks_.allocate(bytes); }
  void deallocate(void* data) override { blocks_.deallocate(data); }

  void gemm(Trans ta, Trans tb, int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B,
            int64_t ldb, float beta, float* C, int64_t ldc) override {
    pm::gemm(ta, tb, M, N, K, A, lda, B, ldb, beta, C, ldc);
  }
  void gemm_bf16(Trans ta, Trans tb, int64_t M, int64_t N, int64_t K, RowsIn A, int64_t lda, const float* B,
                 int64_t ldb, float beta, float* C, int64_t ldc) override {
    if (A.bf16) return pm::gemm_bf16(ta, tb, M, N, K, A.bf16, lda, B, ldb, beta, C, ldc);
    pm::gemm_bf16(ta, tb, M, N, K, A.f32, lda, B, ldb, beta, C, ldc);
  }
  void fill_rows(float* rows, int64_t n, int64_t width, const float* bias) override { pm::fill_rows(rows, n, width, bias); }
  void add_column_sums(const float* rows, int64_t n, int64_t width, float* sums) override {
    pm::add_column_sums(rows, n, width, sums);
  }
  std::unique_ptr<PackedMatrix> pack_matrix(Precision precision, Trans trans_b, int64_t K, int64_t N, const float* B,
                                            int64_t ldb) override {
    auto packed = std::make_unique<CpuPackedMatrix>();
    if (precision == Precision::bf16)
      pack_b_bf16(trans_b, K, N, B, ldb, packed->b);
    else
      pack_b(trans_b, K, N, B, ldb, packed->b);
    return packed;
  }
  void gemm_prepacked(Trans trans_a, int64_t M, const float* A, int64_t lda, const PackedMatrix& B, float beta,
                      float* C, int64_t ldc) override {
    pm::gemm_packed(trans_a, M, A, lda, static_cast<const CpuPackedMatrix&>(B).b, beta, C, ldc);
  }
  void linear(Precision precision, int64_t M, int64_t N, int64_t K, RowsIn x, const float* w,
              const PackedMatrix* packed, const float* bias, float* y) override {
    PM_CHECK(!x.bf16 || precision == Precision::bf16, "bf16 rows of a linear layer's input need a bf16 product");
    if (packed) {
      const PackedB& b = static_cast<const CpuPackedMatrix&>(*packed).b;
      if (x.bf16) return pm::gemm_packed(Trans::no, M, x.bf16, K, b, 0.0f, y, N, {bias, nullptr});
      return pm::gemm_packed(Trans::no, M, x.f32, K, b, 0.0f, y, N, {bias, nullptr});
    }
    if (x.bf16) return pm::gemm_bf16_bias(M, N, K, x.bf16, K, w, N, bias, y, N);
    if (precision == Precision::bf16) return pm::gemm_bf16_bias(M, N, K, x.f32, K, w, N, bias, y, N);
    pm::gemm_bias(M, N, K, x.f32, K, w, N, bias, y, N);
  }
  void axpy(float alpha, const float* x, float* y, int64_t n) override { pm::axpy(alpha, x, y, n); }
  void copy_rows(RowsIn src, RowsOut dst, int64_t width, const std::vector<RowRun>& runs) override {
    for (const RowRun& r : runs) {
      const int64_t from = r.src_row * width, to = r.dst_row * width, n = r.rows * width;
      if (src.f32 && dst.f32) {
        if (src.f32 + from != dst.f32 + to) std::memcpy(dst.f32 + to, src.f32 + from, n * sizeof(float));  // else: same memory
      } else if (src.bf16 && dst.bf16) {
        if (src.bf16 + from != dst.bf16 + to) std::memcpy(dst.bf16 + to, src.bf16 + from, n * sizeof(uint16_t));
      } else if (src.f32) {
        floats_to_bf16(src.f32 + from, dst.bf16 + to, n);
      } else {
        bf16_to_floats(src.bf16 + from, dst.f32 + to, n);
      }
    }
  }

  void copy_rows_scaled(const float* src, RowsOut dst, int64_t width, const std::vector<RowRun>& runs,
                        const float* dst_scale) override {
    pm::copy_rows_scaled(src, dst, width, runs, dst_scale);
  }

  void gelu_forward(const float* in, float* out, int64_t n) override { pm::gelu_forward(in, out, n); }
  void gelu_backward(const float* in, const float* grad_out, float* grad_in, int64_t n) override {
    pm::gelu_backward(in, grad_out, grad_in, n);
  }
  void swiglu_rows_forward(const float* hpre, float* act, int64_t rows, int64_t n) override {
    for (int64_t r = 0; r < rows; ++r) pm::swiglu_forward(hpre + r * 2 * n, act + r * n, n);
  }
  void swiglu_rows_backward(const float* hpre, const float* dact, float* dhpre, int64_t rows, int64_t n) override {
    for (int64_t r = 0; r < rows; ++r) pm::swiglu_backward(hpre + r * 2 * n, dact + r * n, dhpre + r * 2 * n, n);
  }
  void softmax_rows(const float* logits, float* probs, int64_t rows, int64_t cols) override {
    pm::softmax_rows(logits, probs, rows, cols);
  }
  void softmax_rows_backward(const float* probs, const float* dprobs, float* dlogits, int64_t rows,
                             int64_t cols) override {
    pm::softmax_rows_backward(probs, dprobs, dlogits, rows, cols);
  }
  void topk_rows(const float* values, int64_t rows, int64_t cols, int k, int32_t* index, float* value) override {
    pm::topk_rows(values, rows, cols, k, index, value);
  }
  void layernorm_forward(const float* x, const float* gamma, const float* beta, int64_t rows, int64_t D, float eps,
                         float* y, float* mean, float* rstd) override {
    pm::layernorm_forward(x, gamma, beta, rows, D, eps, y, mean, rstd);
  }
  void layernorm_backward(const float* x, const float* gamma, const float* mean, const float* rstd, const float* dy,
                          int64_t rows, int64_t D, float* dx, float* dgamma, float* dbeta) override {
    pm::layernorm_backward(x, gamma, mean, rstd, dy, rows, D, dx, dgamma, dbeta);
  }
  void rmsnorm_forward(const float* x, const float* gamma, int64_t rows, int64_t D, float eps, float* y,
                       float* rstd) override {
    pm::rmsnorm_forward(x, gamma, rows, D, eps, y, rstd);
  }
  void rmsnorm_backward(const float* x, const float* gamma, const float* rstd, const float* dy, int64_t rows, int64_t D,
                        float* dx, float* dgamma) override {
    pm::rmsnorm_backward(x, gamma, rstd, dy, rows, D, dx, dgamma);
  }
  void rope_rotate(float* x, int64_t rows, int64_t ld, int64_t width, int64_t hd, const int64_t* pos, int64_t S,
                   const float* cos, const float* sin, bool inverse) override {
    pm::rope_rotate(x, rows, ld, width, hd, pos, S, cos, sin, inverse);
  }

  void attention_forward(const float* qkv, int64_t B, int64_t S, int64_t heads, int64_t kv_heads, int64_t hd,
                         float* probs, float* out) override {
    pm::attention_forward(qkv, B, S, heads, kv_heads, hd, probs, out);
  }
  void attention_backward(const float* qkv, const float* probs, const float* dout, int64_t B, int64_t S,
                          int64_t heads, int64_t kv_heads, int64_t hd, float* dqkv) override {
    pm::attention_backward(qkv, probs, dout, B, S, heads, kv_heads, hd, dqkv);
  }
  void attention_decode(const float* qkv, float* k_cache, float* v_cache, const int64_t* pos, const int64_t* rows,
                        int64_t B, int64_t S_max, int64_t heads, int64_t kv_heads, int64_t hd, float* out) override {
    pm::attention_decode(qkv, k_cache, v_cache, pos, rows, B, S_max, heads, kv_heads, hd, out);
  }
  void cross_entropy(const float* logits, const int32_t* targets, int64_t rows, int64_t V, float* losses,
                     float* dlogits, float scale) override {
    pm::cross_entropy(logits, targets, rows, V, losses, dlogits, scale);
  }
  void shard_row_max(const float* logits, int64_t rows, int64_t V, float* max) override {
    pm::shard_row_max(logits, rows, V, max);
  }
  void shard_exp_sums(const float* logits, const int32_t* targets, int64_t rows, int64_t V, int64_t lo,
                      const float* max, double* sums) override {
    pm::shard_exp_sums(logits, targets, rows, V, lo, max, sums);
  }
  void shard_cross_entropy(const float* logits, const int32_t* targets, int64_t rows, int64_t V, int64_t lo,
                           const float* max, const double* sums, float* losses, float* dlogits, float scale) override {
    pm::shard_cross_entropy(logits, targets, rows, V, lo, max, sums, losses, dlogits, scale);
  }

  void dispatch_rows(const float* x, int64_t T, int64_t M, int k, const int64_t* position, RowsOut slots) override {
    pm::dispatch_rows(x, T, M, k, position, slots);
  }
  void combine_rows(RowsIn slots, const float* gate, int64_t T, int64_t M, int k, const int64_t* position,
                    float* y) override {
    pm::combine_rows(slots, gate, T, M, k, position, y);
  }
  void dispatch_rows_backward(RowsIn dslots, int64_t T, int64_t M, int k, const int64_t* position,
                              float* dx) override {
    pm::dispatch_rows_backward(dslots, T, M, k, position, dx);
  }
  void combine_rows_backward_slots(const float* dy, const float* gate, int64_t T, int64_t M, int k,
                                   const int64_t* position, RowsOut dslots) override {
    pm::combine_rows_backward_slots(dy, gate, T, M, k, position, dslots);
  }
  void combine_rows_backward_gate(const float* dy, RowsIn slots, int64_t T, int64_t M, int k,
                                  const int64_t* position, float* dgate) override {
    pm::combine_rows_backward_gate(dy, slots, T, M, k, position, dgate);
  }

  std::unique_ptr<PackedExpert> new_packed_expert(Activation activation, Precision precision) override {
    auto w = std::make_unique<ExpertWeights>();
    w->activation = activation;
    w->precision = precision;
    return w;
  }
  void pack_expert_forward(PackedExpert& packed, const float* w1, const float* w2, const float* b1, const float* b2,
                           int64_t M, int64_t H) override {
    auto& w = static_cast<ExpertWeights&>(packed);
    w.pack_forward(w1, w2, M, H);
    w.b1 = b1;
    w.b2 = b2;
  }
  void pack_expert_backward(PackedExpert& packed, const float* w1, const float* w2, int64_t M, int64_t H) override {
    static_cast<ExpertWeights&>(packed).pack_backward(w1, w2, M, H);
  }
  void expert_forward(const PackedExpert& packed, int64_t rows, int64_t M, int64_t H, RowPointers u, float* saved,
                      RowsOut act, OutputRows y, ForwardFor use) override {
    pm::expert_forward(static_cast<const ExpertWeights&>(packed), rows, M, H, u, saved, act, y, use);
  }
  void expert_backward_input(const PackedExpert& packed, int64_t rows, int64_t M, int64_t H, DyRows dy,
                             const float* const* saved_rows, float* dhpre, OutputRows du) override {
    pm::expert_backward_input(static_cast<const ExpertWeights&>(packed), rows, M, H, dy, saved_rows, dhpre, du);
  }
  void expert_weight_grads(const ExpertGrads& grads, Activation activation, Precision precision, int64_t M, int64_t H,
                           const ExpertRows& rows) override {
    pm::expert_weight_grads(grads, activation, precision, M, H, rows);
  }
 private:
  // never destroyed: buffers of other static objects may be freed after this one's destructor.
  // Under a sanitizer nothing is cached: a task that reads a buffer its pass already gave back
  // must be a use after free there, not a read of a block handed to someone else.
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
  static constexpr std::size_t kCachedFrom = std::numeric_limits<std::size_t>::max();
#else
  static constexpr std::size_t kCachedFrom = std::size_t{1} << 20;
#endif
  BlockCache& blocks_ = *new BlockCache(aligned_allocate, [](void* data) { std::free(data); }, kCachedFrom);
};

}  // namespace

Backend& cpu_backend() {
  static CpuBackend backend;
  return backend;
}

}  // namespace pm
