// The GPT model's parts that its three source files share (gpt.cpp: construction, parameters,
// schedules' choices and bookkeeping; gpt_forward.cpp: the forward and inference passes;
// gpt_backward.cpp: the backward pass; gpt_parallel.cpp: the tensor-parallel dense steps and a
// pipeline stage's stashed micro-batches). Internal to model/: nothing outside includes it.
#pragma once

#include <functional>
#include <string>
#include <variant>
#include <vector>

#include "model/gpt.h"
#include "moe/row_buffer.h"

namespace pm {
namespace gpt_internal {


inline constexpr float kLayerNormEps = 1e-5f;  // LayerNorm's and RMSNorm's

// The backbone's norm (config "norm"): LayerNorm (mean, gamma and beta), or RMSNorm (gamma only:
// beta is empty and mean[T] unused).
inline void norm_forward(Backend& k, bool rms, const float* x, const Tensor& g, const Tensor& b, int64_t T, int64_t D,
                         float* y, float* mean, float* rstd) {
  if (rms)
    k.rmsnorm_forward(x, g.f32(), T, D, kLayerNormEps, y, rstd);
  else
    k.layernorm_forward(x, g.f32(), b.f32(), T, D, kLayerNormEps, y, mean, rstd);
}
// dx overwritten; dg (and LayerNorm's db) added to.
inline void norm_backward(Backend& k, bool rms, const float* x, const Tensor& g, const float* mean, const float* rstd,
                          const float* dy, int64_t T, int64_t D, float* dx, Tensor& dg, Tensor& db) {
  if (rms)
    k.rmsnorm_backward(x, g.f32(), rstd, dy, T, D, dx, dg.f32());
  else
    k.layernorm_backward(x, g.f32(), mean, rstd, dy, T, D, dx, dg.f32(), db.f32());
}

// y[T, N] = x[T, K] w[K, N] + b[N]; its GEMM in `p` (bf16: on bf16 operands, fp32 accumulation),
// with w packed once beforehand when `packed` is given (frozen weights: the same bits). x may be
// bf16 rows (an activation kept in bf16, which needs p bf16).
inline void linear_forward(Backend& k, Precision p, RowsIn x, const Tensor& w, const Tensor& b, int64_t T,
                           float* y, const PackedMatrix* packed = nullptr) {
  k.linear(p, T, w.dim(1), w.dim(0), x, w.f32(), packed, b.f32(), y);
}

// From dy[T, N]: dw += x^T dy, db += colsum(dy), dx = dy w^T (dx may be null); GEMMs in `p`.
// x may be bf16 rows (an activation kept in bf16, which needs p bf16).
inline void linear_backward(Backend& k, Precision p, RowsIn x, const Tensor& w, const float* dy, int64_t T,
                            Tensor& dw, Tensor& db, float* dx) {
  const int64_t K = w.dim(0), N = w.dim(1);
  if (x.bf16)
    k.gemm_bf16(Trans::yes, Trans::no, K, N, T, x, K, dy, N, 1.0f, dw.f32(), N);
  else
    k.gemm_as(p, Trans::yes, Trans::no, K, N, T, x.f32, K, dy, N, 1.0f, dw.f32(), N);
  k.add_column_sums(dy, T, N, db.f32());
  if (dx) k.gemm_as(p, Trans::no, Trans::yes, T, K, N, dy, N, w.f32(), N, 0.0f, dx, K);
}

// The dense MLPs' activation (the dense blocks' and the shared expert's): act[T, n] from the
// pre-activation fc, [T, n] (GeLU) or [T, 2n] = [g | v] (SwiGLU).
inline void activation_forward(Backend& k, bool swiglu, const float* fc, float* act, int64_t T, int64_t n) {
  if (swiglu)
    k.swiglu_rows_forward(fc, act, T, n);
  else
    k.gelu_forward(fc, act, T * n);
}
// Its backward: the gradient of fc from dact[T, n], GeLU's in place in dact, SwiGLU's in scratch
// [T, 2n]; returns where it is.
inline const float* activation_backward(Backend& k, bool swiglu, const float* fc, float* dact, int64_t T, int64_t n,
                                        ScratchBuffer<float>& scratch) {
  if (!swiglu) {
    k.gelu_backward(fc, dact, dact, T * n);
    return dact;
  }
  scratch.resize(T * 2 * n);
  k.swiglu_rows_backward(fc, dact, scratch.data(), T, n);
  return scratch.data();
}

// Activations that only the dense GEMMs read (LayerNorm 1's output, attention's output, the dense
// MLP's activation) are kept in the dense GEMMs' precision: in bf16 a GEMM rounds them to bf16
// anyway, so keeping them in bf16 gives the same bits in half the bytes. They are computed in
// floats (in the kept buffer itself in fp32, in this thread's scratch in bf16), kept, and the
// forward's GEMM reads the kept rows (in bf16 it reads them in place where it would have rounded
// the floats as it packed them: one pass over the rows less).
inline float* compute_into(RowBuffer& kept, int64_t rows, int64_t width, Precision p) {
  kept.resize(rows, width, p);
  if (p == Precision::fp32) return kept.out(0).f32;
  thread_local std::vector<float> scratch;  // grown only: a resize up zero-fills what it adds
  if (static_cast<int64_t>(scratch.size()) < rows * width) scratch.resize(rows * width);
  return scratch.data();
}
inline void keep(Backend& k, RowBuffer& kept, const float* values, int64_t rows) {
  if (kept.precision() == Precision::bf16) k.copy_rows(values, kept.out(0), kept.width(), {{0, 0, rows}});
}

inline std::string indexed(const char* name, int i) { return std::string(name) + "[" + std::to_string(i) + "]"; }

// A pass's graph is built from a list of steps: dense tasks in order, and the points where an
// MoE layer joins (its rows leave right there; its experts come after the dense steps of its slot).
struct DenseStep {
  std::string name;
  std::function<int(TaskGraph&, int last)> add;  // appends the task after `last` (-1: none); its id
  int needs_moe = -1;  // the MoE block whose output this step reads: its experts come before it
};
struct MoeJoin {
  int block;
};
using Step = std::variant<DenseStep, MoeJoin>;

inline std::vector<int> after(int last) { return last >= 0 ? std::vector<int>{last} : std::vector<int>{}; }
inline std::vector<int> plus(std::vector<int> a, std::initializer_list<int> more) {
  for (int m : more)
    if (m >= 0) a.push_back(m);
  return a;
}


// Lays the steps into the graph; at each MoE join the layer's tasks go in, with up to `slot`
// following dense steps between its way out and its experts (never past the step that reads its
// output).
template <typename Join>
void lay_out(TaskGraph& g, std::vector<Step>& steps, Join&& join) {
  int last = -1;
  for (std::size_t i = 0; i < steps.size();) {
    if (auto* d = std::get_if<DenseStep>(&steps[i])) {
      last = d->add(g, last);
      ++i;
      continue;
    }
    const int block = std::get<MoeJoin>(steps[i]).block;
    std::size_t next = i + 1;
    std::vector<std::string> candidates;  // the dense steps the slot may take
    for (std::size_t j = next; j < steps.size(); ++j) {
      auto* d = std::get_if<DenseStep>(&steps[j]);
      if (!d || d->needs_moe == block) break;
      candidates.push_back(d->name);
    }
    auto between = [&](TaskGraph& graph, int slot) {
      for (int k = 0; k < slot; ++k) last = std::get<DenseStep>(steps[next++]).add(graph, last);
    };
    join(block, last, candidates, between);
    i = next;
  }
}

}  // namespace gpt_internal

struct GptModel::Block {
  // parameters and gradients; shapes in comments (D model, F dense hidden, G shared-expert hidden)
  Tensor ln1_g, ln1_b, ln2_g, ln2_b;  // [D] (the b's LayerNorm's only)
  Tensor w_qkv, b_qkv;                // [D, 3D], [3D]
  Tensor w_proj, b_proj;              // [D, D], [D]
  Tensor w_fc, b_fc, w_out, b_out;    // dense: [D, F] ([D, 2F] SwiGLU), [F] ([2F]), [F, D], [D]
  Tensor se_w_fc, se_b_fc, se_w_out, se_b_out, se_w_cg, se_b_cg;  // shared expert: [D, G], [G], [G, D], [D], [D, 1], [1]
  Tensor ln_moe_g, ln_moe_b;          // ScMoE: the routed experts' own LayerNorm [D]
  Tensor d_ln1_g, d_ln1_b, d_ln2_g, d_ln2_b, d_w_qkv, d_b_qkv, d_w_proj, d_b_proj, d_w_fc, d_b_fc, d_w_out, d_b_out;
  Tensor d_se_w_fc, d_se_b_fc, d_se_w_out, d_se_b_out, d_se_w_cg, d_se_b_cg, d_ln_moe_g, d_ln_moe_b;
  std::unique_ptr<MoeLayer> moe;      // MoE blocks only
  // activations of the last forward
  Buffer<float> x_in, ln1_mean, ln1_rstd, qkv, probs, x_mid, ln2_out, ln2_mean, ln2_rstd, fc;
  RowBuffer ln1_out, attn, act;       // only GEMMs read them: kept in the dense precision (compute_into)
  Buffer<float> se_fc, se_act, se_raw, coef, se_out;  // [T, G], [T, G], [T, D], [T], [T, D]
  Buffer<float> moe_in, moe_mean, moe_rstd, moe_out;  // ScMoE's LN of the tap [T, D], [T], [T]; the MoE's output [T, D]
  std::shared_ptr<MoePass> moe_pass;  // what the MoE layer's backward needs
  Buffer<float> k_cache, v_cache;     // inference: keys [rows, D, seq_len] (transposed), values [rows, seq_len, D]
  // backward: ScMoE's own copy of the output gradient, the MoE's input gradient, and the tap's
  Buffer<float> moe_dy, dmoe_in, dtap;

  // Calls f on every activation the backward reads (what a pipeline stashes per micro-batch).
  template <typename F>
  void each_saved(F&& f) {
    for (Buffer<float>* a : {&x_in, &ln1_mean, &ln1_rstd, &qkv, &probs, &x_mid, &ln2_out, &ln2_mean, &ln2_rstd, &fc,
                             &se_fc, &se_act, &se_raw, &coef, &se_out, &moe_in, &moe_mean, &moe_rstd})
      f(*a);
  }
  template <typename F>
  void each_saved_rows(F&& f) {
    for (RowBuffer* a : {&ln1_out, &attn, &act}) f(*a);
  }
};

// What a forward leaves for its backward, moved out while other micro-batches pass (stash_pass).
struct GptModel::SavedPass {
  std::vector<int32_t> inputs, targets;
  int64_t B = 0, T = 0;
  float backward_scale = 0;
  Buffer<float> h_final, lnf_out, lnf_mean, lnf_rstd, dlogits;
  std::vector<std::vector<Buffer<float>>> block_buffers;  // [layers][each_saved]
  std::vector<std::vector<RowBuffer>> block_rows;         // [layers][each_saved_rows]
  std::vector<std::shared_ptr<MoePass>> moe_passes;       // [layers]
};

}  // namespace pm
