// A Backend whose every kernel is another backend's (the host's): the CUDA backend derives from
// it and overrides what runs on the GPU, so the rest of the table stays the CPU's, unchanged.
#pragma once

#include <string>
#include <vector>

#include "kernels/backend.h"

namespace pm {

class ForwardingBackend : public Backend {
 public:
  explicit ForwardingBackend(Backend& host) : host_(host) {}

  std::string name() const override { return host_.name(); }
  Device device() const override { return host_.device(); }
  int threads() const override { return host_.threads(); }
  std::string bf16_path() const override { return host_.bf16_path(); }
  void* allocate(std::size_t bytes) override { return host_.allocate(bytes); }
  void deallocate(void* data) override { host_.deallocate(data); }

  void gemm(Trans ta, Trans tb, int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B,
            int64_t ldb, float beta, float* C, int64_t ldc) override {
    host_.gemm(ta, tb, M, N, K, A, lda, B, ldb, beta, C, ldc);
  }
  void gemm_bf16(Trans ta, Trans tb, int64_t M, int64_t N, int64_t K, RowsIn A, int64_t lda, const float* B,
                 int64_t ldb, float beta, float* C, int64_t ldc) override {
    host_.gemm_bf16(ta, tb, M, N, K, A, lda, B, ldb, beta, C, ldc);
  }
  std::unique_ptr<PackedMatrix> pack_matrix(Precision precision, Trans trans_b, int64_t K, int64_t N, const float* B,
                                            int64_t ldb) override {
    return host_.pack_matrix(precision, trans_b, K, N, B, ldb);
  }
  void gemm_prepacked(Trans trans_a, int64_t M, const float* A, int64_t lda, const PackedMatrix& B, float beta,
                      float* C, int64_t ldc) override {
    host_.gemm_prepacked(trans_a, M, A, lda, B, beta, C, ldc);
  }
  // (linear is not forwarded: Backend's own form runs fill_rows and the products above, so a
  // backend that overrides those runs its linear layers on its own kernels; the host's would not)
  std::unique_ptr<PackedExpert> new_packed_expert(Activation activation, Precision precision) override {
    return host_.new_packed_expert(activation, precision);
  }
  void pack_expert_forward(PackedExpert& packed, const float* w1, const float* w2, const float* b1, const float* b2,
                           int64_t M, int64_t H) override {
    host_.pack_expert_forward(packed, w1, w2, b1, b2, M, H);
  }
  void pack_expert_backward(PackedExpert& packed, const float* w1, const float* w2, int64_t M, int64_t H) override {
    host_.pack_expert_backward(packed, w1, w2, M, H);
  }
  void expert_forward(const PackedExpert& packed, int64_t rows, int64_t M, int64_t H, RowPointers u, float* saved,
                      RowsOut act, OutputRows y, ForwardFor use) override {
    host_.expert_forward(packed, rows, M, H, u, saved, act, y, use);
  }
  void expert_backward_input(const PackedExpert& packed, int64_t rows, int64_t M, int64_t H, DyRows dy,
                             const float* const* saved_rows, float* dhpre, OutputRows du) override {
    host_.expert_backward_input(packed, rows, M, H, dy, saved_rows, dhpre, du);
  }
  void expert_weight_grads(const ExpertGrads& grads, Activation activation, Precision precision, int64_t M,
                           int64_t H, const ExpertRows& rows) override {
    host_.expert_weight_grads(grads, activation, precision, M, H, rows);
  }

  void fill_rows(float* rows, int64_t n, int64_t width, const float* bias) override { host_.fill_rows(rows, n, width, bias); }
  void add_column_sums(const float* rows, int64_t n, int64_t width, float* sums) override {
    host_.add_column_sums(rows, n, width, sums);
  }
  void axpy(float alpha, const float* x, float* y, int64_t n) override { host_.axpy(alpha, x, y, n); }
  void copy_rows(RowsIn src, RowsOut dst, int64_t width, const std::vector<RowRun>& runs) override {
    host_.copy_rows(src, dst, width, runs);
  }
  void copy_rows_scaled(const float* src, RowsOut dst, int64_t width, const std::vector<RowRun>& runs,
                        const float* dst_scale) override {
    host_.copy_rows_scaled(src, dst, width, runs, dst_scale);
  }
  void gelu_forward(const float* in, float* out, int64_t n) override { host_.gelu_forward(in, out, n); }
  void gelu_backward(const float* in, const float* grad_out, float* grad_in, int64_t n) override {
    host_.gelu_backward(in, grad_out, grad_in, n);
  }
  void swiglu_rows_forward(const float* hpre, float* act, int64_t rows, int64_t n) override {
    host_.swiglu_rows_forward(hpre, act, rows, n);
  }
  void swiglu_rows_backward(const float* hpre, const float* dact, float* dhpre, int64_t rows, int64_t n) override {
    host_.swiglu_rows_backward(hpre, dact, dhpre, rows, n);
  }
  void softmax_rows(const float* logits, float* probs, int64_t rows, int64_t cols) override {
    host_.softmax_rows(logits, probs, rows, cols);
  }
  void softmax_rows_backward(const float* probs, const float* dprobs, float* dlogits, int64_t rows,
                             int64_t cols) override {
    host_.softmax_rows_backward(probs, dprobs, dlogits, rows, cols);
  }
  void topk_rows(const float* values, int64_t rows, int64_t cols, int k, int32_t* index, float* value) override {
    host_.topk_rows(values, rows, cols, k, index, value);
  }
  void layernorm_forward(const float* x, const float* gamma, const float* beta, int64_t rows, int64_t D, float eps,
                         float* y, float* mean, float* rstd) override {
    host_.layernorm_forward(x, gamma, beta, rows, D, eps, y, mean, rstd);
  }
  void layernorm_backward(const float* x, const float* gamma, const float* mean, const float* rstd, const float* dy,
                          int64_t rows, int64_t D, float* dx, float* dgamma, float* dbeta) override {
    host_.layernorm_backward(x, gamma, mean, rstd, dy, rows, D, dx, dgamma, dbeta);
  }
  void rmsnorm_forward(const float* x, const float* gamma, int64_t rows, int64_t D, float eps, float* y,
                       float* rstd) override {
    host_.rmsnorm_forward(x, gamma, rows, D, eps, y, rstd);
  }
  void rmsnorm_backward(const float* x, const float* gamma, const float* rstd, const float* dy, int64_t rows, int64_t D,
                        float* dx, float* dgamma) override {
    host_.rmsnorm_backward(x, gamma, rstd, dy, rows, D, dx, dgamma);
  }
  void rope_rotate(float* x, int64_t rows, int64_t ld, int64_t width, int64_t hd, const int64_t* pos, int64_t S,
                   const float* cos, const float* sin, bool inverse) override {
    host_.rope_rotate(x, rows, ld, width, hd, pos, S, cos, sin, inverse);
  }
  void attention_forward(const float* qkv, int64_t B, int64_t S, int64_t heads, int64_t kv_heads, int64_t hd,
                         float* probs, float* out) override {
    host_.attention_forward(qkv, B, S, heads, kv_heads, hd, probs, out);
  }
  void attention_backward(const float* qkv, const float* probs, const float* dout, int64_t B, int64_t S,
                          int64_t heads, int64_t kv_heads, int64_t hd, float* dqkv) override {
    host_.attention_backward(qkv, probs, dout, B, S, heads, kv_heads, hd, dqkv);
  }
  void attention_decode(const float* qkv, float* k_cache, float* v_cache, const int64_t* pos, const int64_t* rows,
                        int64_t B, int64_t S_max, int64_t heads, int64_t kv_heads, int64_t hd, float* out) override {
    host_.attention_decode(qkv, k_cache, v_cache, pos, rows, B, S_max, heads, kv_heads, hd, out);
  }
  void cross_entropy(const float* logits, const int32_t* targets, int64_t rows, int64_t V, float* losses,
                     float* dlogits, float scale) override {
    host_.cross_entropy(logits, targets, rows, V, losses, dlogits, scale);
  }
  void shard_row_max(const float* logits, int64_t rows, int64_t V, float* max) override {
    host_.shard_row_max(logits, rows, V, max);
  }
  void shard_exp_sums(const float* logits, const int32_t* targets, int64_t rows, int64_t V, int64_t lo,
                      const float* max, double* sums) override {
    host_.shard_exp_sums(logits, targets, rows, V, lo, max, sums);
  }
  void shard_cross_entropy(const float* logits, const int32_t* targets, int64_t rows, int64_t V, int64_t lo,
                           const float* max, const double* sums, float* losses, float* dlogits, float scale) override {
    host_.shard_cross_entropy(logits, targets, rows, V, lo, max, sums, losses, dlogits, scale);
  }
  void dispatch_rows(const float* x, int64_t T, int64_t M, int k, const int64_t* position, RowsOut slots) override {
    host_.dispatch_rows(x, T, M, k, position, slots);
  }
  void combine_rows(RowsIn slots, const float* gate, int64_t T, int64_t M, int k, const int64_t* position,
                    float* y) override {
    host_.combine_rows(slots, gate, T, M, k, position, y);
  }
  void dispatch_rows_backward(RowsIn dslots, int64_t T, int64_t M, int k, const int64_t* position,
                              float* dx) override {
    host_.dispatch_rows_backward(dslots, T, M, k, position, dx);
  }
  void combine_rows_backward_slots(const float* dy, const float* gate, int64_t T, int64_t M, int k,
                                   const int64_t* position, RowsOut dslots) override {
    host_.combine_rows_backward_slots(dy, gate, T, M, k, position, dslots);
  }
  void combine_rows_backward_gate(const float* dy, RowsIn slots, int64_t T, int64_t M, int k, const int64_t* position,
                                  float* dgate) override {
    host_.combine_rows_backward_gate(dy, slots, T, M, k, position, dgate);
  }

 protected:
  Backend& host_;
};

}  // namespace pm
