// The CUDA backend's cases, against the CPU backend bit for bit: included by the GPU test
// (tests/unit/test_cuda_backend.cpp, suite CudaBackend) and by the emulation
// (tests/cuda_emulation, suite CudaEmulated: the same code on CPU threads and a fake runtime).
// Define PM_CUDA_TEST_SUITE before including.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <string>
#include <vector>

#include "comm/inprocess_communicator.h"
#include "core/rng.h"
#include "core/tensor.h"
#include "kernels/backend.h"
#include "kernels/cuda/cuda_backend.h"
#include "model/gpt.h"
#include "model/grad_sync.h"
#include "model/optimizer.h"
#include "moe/moe_layer.h"
#include "sched/executor.h"

namespace pm::cuda_cases {

std::vector<float> random_values(int64_t n, uint64_t stream, float scale = 1.0f) {
  std::vector<float> v(std::max<int64_t>(n, 1));
  Rng(7, stream).fill_normal(v.data(), n, 0.0f, scale);
  return v;
}

std::vector<uint16_t> to_bf16(const std::vector<float>& v) {
  std::vector<uint16_t> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) out[i] = float_to_bf16(v[i]);
  return out;
}

::testing::AssertionResult same_bits(const std::vector<float>& a, const std::vector<float>& b) {
  if (a.size() != b.size()) return ::testing::AssertionFailure() << "sizes " << a.size() << " and " << b.size();
  for (size_t i = 0; i < a.size(); ++i)
    if (std::memcmp(&a[i], &b[i], sizeof(float)) != 0)
      return ::testing::AssertionFailure() << "element " << i << ": " << a[i] << " (cpu) vs " << b[i] << " (cuda)";
  return ::testing::AssertionSuccess();
}

Backend* gpu_or_skip() {
  std::string why;
  if (!cuda_available(&why)) return nullptr;
  return &cuda_backend();
}

#define SKIP_WITHOUT_GPU(gpu)                                       \
  Backend* gpu = gpu_or_skip();                                    \
  if (!gpu) {                                                      \
    std::string why;                                               \
    cuda_available(&why);                                          \
    GTEST_SKIP() << "no CUDA backend here: " << why;               \
  }

struct GemmCase {
  int64_t M, N, K;
};
// The large tiling, with partial tiles and an odd depth: on the emulated GPU (3 multiprocessors)
// {200, 150, 37} and {128, 257, 9}; on a real one (an H200 has 132) the last, 12 x 13 tiles (a
// minute emulated: left to the GPU).
const GemmCase kGemmCases[] = {{1, 1, 1},    {7, 33, 5},      {65, 130, 77},  {128, 64, 300},
                               {3, 200, 0},  {100, 17, 1031}, {200, 150, 37}, {128, 257, 9},
#if !PM_CUDA_EMULATION
                               {1500, 1600, 19}
#endif
};

TEST(PM_CUDA_TEST_SUITE, GemmGivesTheCpuBits) {
  SKIP_WITHOUT_GPU(gpu);
  Backend& cpu = cpu_backend();
  for (const GemmCase& s : kGemmCases)
    for (Trans ta : {Trans::no, Trans::yes})
      for (Trans tb : {Trans::no, Trans::yes})
        for (float beta : {0.0f, 1.0f})
          for (Precision precision : {Precision::fp32, Precision::bf16}) {
            SCOPED_TRACE(::testing::Message() << s.M << "x" << s.N << "x" << s.K << " ta " << (ta == Trans::yes)
                                              << " tb " << (tb == Trans::yes) << " beta " << beta << " bf16 "
                                              << (precision == Precision::bf16));
            // leading dimensions wider than the matrices: strided copies both ways
            const int64_t lda = (ta == Trans::no ? s.K : s.M) + 3, ldb = (tb == Trans::no ? s.N : s.K) + 2,
                          ldc = s.N + 5;
            const std::vector<float> A = random_values((ta == Trans::no ? s.M : s.K) * lda, 1);
            const std::vector<float> B = random_values((tb == Trans::no ? s.K : s.N) * ldb, 2);
            std::vector<float> c_cpu = random_values(s.M * ldc, 3), c_gpu = c_cpu;
            cpu.gemm_as(precision, ta, tb, s.M, s.N, s.K, A.data(), lda, B.data(), ldb, beta, c_cpu.data(), ldc);
            gpu->gemm_as(precision, ta, tb, s.M, s.N, s.K, A.data(), lda, B.data(), ldb, beta, c_gpu.data(), ldc);
            EXPECT_TRUE(same_bits(c_cpu, c_gpu));
            if (precision == Precision::bf16) {  // A given as bf16 rows
              const std::vector<uint16_t> A16 = to_bf16(A);
              std::vector<float> d_cpu = random_values(s.M * ldc, 4), d_gpu = d_cpu;
              cpu.gemm_bf16(ta, tb, s.M, s.N, s.K, A16.data(), lda, B.data(), ldb, beta, d_cpu.data(), ldc);
              gpu->gemm_bf16(ta, tb, s.M, s.N, s.K, A16.data(), lda, B.data(), ldb, beta, d_gpu.data(), ldc);
              EXPECT_TRUE(same_bits(d_cpu, d_gpu));
            }
            // prepacked B (inference's weights)
            std::vector<float> e_cpu = random_values(s.M * ldc, 5), e_gpu = e_cpu;
            auto p_cpu = cpu.pack_matrix(precision, tb, s.K, s.N, B.data(), ldb);
            auto p_gpu = gpu->pack_matrix(precision, tb, s.K, s.N, B.data(), ldb);
            cpu.gemm_prepacked(ta, s.M, A.data(), lda, *p_cpu, beta, e_cpu.data(), ldc);
            gpu->gemm_prepacked(ta, s.M, A.data(), lda, *p_gpu, beta, e_gpu.data(), ldc);
            EXPECT_TRUE(same_bits(e_cpu, e_gpu));
          }
}

// One expert's forward, input backward and weight gradients on both backends.
struct ExpertRun {
  std::vector<float> saved, act, y, dhpre, du, w1g, b1g, w2g, b2g;
  std::vector<uint16_t> act16;
};

// out_rows: y and du written to rows by pointer (OutputRows::by_pointer), in reverse order in
// memory (the all-to-all's rows), then read back into r.y and r.du. scaled_dy (float rows): the
// output gradients read by pointer, each row times a gate value (DyRows::scaled, ExpertRows::dy_scale).
ExpertRun run_expert(Backend& be, Activation activation, Precision precision, bool bf16_rows, ForwardFor use,
                     int64_t rows, int64_t M, int64_t H, bool out_rows = false, bool scaled_dy = false) {
  const int64_t H1 = fc1_width(activation, H);
  const std::vector<float> w1 = random_values(M * H1, 11, 0.2f), w2 = random_values(H * M, 12, 0.2f);
  const std::vector<float> b1 = random_values(H1, 13, 0.1f), b2 = random_values(M, 14, 0.1f);
  const std::vector<float> u = random_values(rows * M, 15), dy = random_values(rows * M, 16);
  const std::vector<uint16_t> u16 = to_bf16(u), dy16 = to_bf16(dy);  // bf16 rows: u, act and dy
  ExpertRun r;
  r.saved.assign(rows * H1, 0.0f), r.act.assign(rows * H, 0.0f), r.act16.assign(rows * H, 0), r.y.assign(rows * M, 0.0f);
  auto packed = be.new_packed_expert(activation, precision);
  be.pack_expert_forward(*packed, w1.data(), w2.data(), b1.data(), b2.data(), M, H);
  // the input rows through pointers, in reverse order in memory (where an all-to-all left them)
  std::vector<const float*> u_rows(rows);
  std::vector<const uint16_t*> u16_rows(rows);
  std::vector<float> u_rev(u.size());
  std::vector<uint16_t> u16_rev(u16.size());
  for (int64_t i = 0; i < rows; ++i) {
    const int64_t at = (rows - 1 - i) * M;
    std::copy(u.begin() + i * M, u.begin() + (i + 1) * M, u_rev.begin() + at);
    std::copy(u16.begin() + i * M, u16.begin() + (i + 1) * M, u16_rev.begin() + at);
    u_rows[i] = u_rev.data() + at, u16_rows[i] = u16_rev.data() + at;
  }
  RowPointers u_in = bf16_rows ? RowPointers(u16_rows.data()) : RowPointers(u_rows.data());
  RowsOut act_out = bf16_rows ? RowsOut(r.act16.data()) : RowsOut(r.act.data());
  std::vector<float> out_rev(rows * M);
  std::vector<float*> out_at(rows);
  for (int64_t i = 0; i < rows; ++i) out_at[i] = &out_rev[(rows - 1 - i) * M];
  auto read_back = [&](std::vector<float>& to) {
    for (int64_t i = 0; i < rows; ++i) std::memcpy(&to[i * M], out_at[i], M * sizeof(float));
  };
  be.expert_forward(*packed, rows, M, H, u_in, r.saved.data(), act_out,
                    out_rows ? OutputRows::by_pointer(out_at.data()) : OutputRows(r.y.data()), use);
  if (out_rows) read_back(r.y);
  if (use == ForwardFor::inference) return r;
  be.pack_expert_backward(*packed, w1.data(), w2.data(), M, H);
  // the saved rows in reverse order in memory: the backward reads them through pointers
  std::vector<float> saved_rev(r.saved.size());
  std::vector<const float*> saved_rows(rows);
  for (int64_t i = 0; i < rows; ++i) {
    std::memcpy(&saved_rev[(rows - 1 - i) * H1], &r.saved[i * H1], H1 * sizeof(float));
    saved_rows[i] = &saved_rev[(rows - 1 - i) * H1];
  }
  r.dhpre.assign(rows * H1, 0.0f), r.du.assign(rows * M, 0.0f);
  RowsIn dy_in = bf16_rows ? RowsIn(dy16.data()) : RowsIn(dy.data());
  const std::vector<float> gate = random_values(rows, 21, 0.5f);
  std::vector<const float*> dy_at(rows);
  for (int64_t i = 0; i < rows; ++i) dy_at[i] = &dy[i * M];
  be.expert_backward_input(*packed, rows, M, H, scaled_dy ? DyRows::scaled(dy_at.data(), gate.data()) : DyRows(dy_in),
                           saved_rows.data(), r.dhpre.data(),
                           out_rows ? OutputRows::by_pointer(out_at.data()) : OutputRows(r.du.data()));
  if (out_rows) read_back(r.du);
  r.w1g = random_values(M * H1, 17), r.b1g = random_values(H1, 18), r.w2g = random_values(H * M, 19),
  r.b2g = random_values(M, 20);
  ExpertRows er;
  for (int64_t i = 0; i < rows; ++i) {
    if (bf16_rows) {
      er.u_bf16.push_back(&u16[i * M]);
      er.act_bf16.push_back(&r.act16[i * H]);
      er.dy_bf16.push_back(&dy16[i * M]);
    } else {
      er.u.push_back(&u[i * M]);
      er.act.push_back(&r.act[i * H]);
      er.dy.push_back(&dy[i * M]);
      if (scaled_dy) er.dy_scale.push_back(gate[i]);
    }
    er.dhpre.push_back(&r.dhpre[i * H1]);
  }
  be.expert_weight_grads({r.w1g.data(), r.b1g.data(), r.w2g.data(), r.b2g.data()}, activation, precision, M, H, er);
  return r;
}

TEST(PM_CUDA_TEST_SUITE, ExpertsGiveTheCpuBits) {
  SKIP_WITHOUT_GPU(gpu);
  for (Activation activation : {Activation::gelu, Activation::swiglu})
    for (Precision precision : {Precision::fp32, Precision::bf16})
      for (bool bf16_rows : {false, true})
        for (ForwardFor use : {ForwardFor::backward, ForwardFor::inference})
          for (int64_t rows : {1, 37, 130})
            for (bool out_rows : {false, true}) {  // outputs into one block, or rows by pointer (the GPU's)
            if (bf16_rows && precision != Precision::bf16) continue;
            SCOPED_TRACE(::testing::Message() << "swiglu " << (activation == Activation::swiglu) << " bf16 "
                                              << (precision == Precision::bf16) << " bf16 rows " << bf16_rows
                                              << " inference " << (use == ForwardFor::inference) << " rows " << rows
                                              << " output rows by pointer " << out_rows);
            // with the outputs by pointer, experts of float rows also read their output gradients scaled
            // by pointer (a bf16 expert rounds the products to bf16)
            const bool scaled_dy = out_rows && !bf16_rows;
            const ExpertRun c = run_expert(cpu_backend(), activation, precision, bf16_rows, use, rows, 48, 72, false,
                                           scaled_dy);
            const ExpertRun g = run_expert(*gpu, activation, precision, bf16_rows, use, rows, 48, 72, out_rows, scaled_dy);
            if (use == ForwardFor::backward) {
              EXPECT_TRUE(same_bits(c.saved, g.saved)) << "saved";
            }
            EXPECT_TRUE(same_bits(c.act, g.act)) << "act";
            EXPECT_EQ(c.act16, g.act16) << "act (bf16)";
            EXPECT_TRUE(same_bits(c.y, g.y)) << "y";
            EXPECT_TRUE(same_bits(c.dhpre, g.dhpre)) << "dhpre";
            EXPECT_TRUE(same_bits(c.du, g.du)) << "du";
            EXPECT_TRUE(same_bits(c.w1g, g.w1g)) << "w1 grad";
            EXPECT_TRUE(same_bits(c.b1g, g.b1g)) << "b1 grad";
            EXPECT_TRUE(same_bits(c.w2g, g.w2g)) << "w2 grad";
            EXPECT_TRUE(same_bits(c.b2g, g.b2g)) << "b2 grad";
          }
}

// The MoE layer on the GPU: forward and backward, 2 ranks as threads, pipelined, both
// strategies, fp32 and bf16, GeLU and SwiGLU: the CPU backend's bits.
std::vector<float> normal_values(int64_t n, uint64_t seed, uint64_t stream) {
  std::vector<float> v(n);
  Rng(seed, stream).fill_normal(v.data(), n, 0.0f, 1.0f);
  return v;
}

struct LayerResults {
  std::vector<float> y, dx;
  std::vector<std::vector<float>> grads;
  bool operator==(const LayerResults&) const = default;
};

LayerResults run_layer_on(Backend& backend, const std::string& strategy, const MoeShape& shape) {
  std::vector<LayerResults> out(2);
  run_ranks_in_process(2, [&](Communicator& comm) {
    Executor ex;
    auto layer = moe_strategy(strategy).make_layer(shape, comm, backend);
    layer->init_parameters(5);
    layer->set_degrees(2, 3);
    const auto x = normal_values(shape.tokens * shape.model_dim, 9, stream_id(1, comm.rank()));
    const auto dy = normal_values(shape.tokens * shape.model_dim, 9, stream_id(2, comm.rank()));
    LayerResults r;
    r.y.assign(x.size(), 0.0f);
    r.dx.assign(x.size(), 0.0f);
    layer->zero_grads();
    std::shared_ptr<MoePass> pass = forward_alone(*layer, ex, x.data(), shape.tokens, r.y.data());
    backward_alone(*layer, ex, *pass, dy.data(), r.dx.data(), 0.05f);
    for (const Parameter& p : layer->parameters()) r.grads.emplace_back(p.grad->f32(), p.grad->f32() + p.grad->numel());
    out[comm.rank()] = std::move(r);
  });
  // both ranks' results, one after the other
  LayerResults all = out[0];
  all.y.insert(all.y.end(), out[1].y.begin(), out[1].y.end());
  all.dx.insert(all.dx.end(), out[1].dx.begin(), out[1].dx.end());
  all.grads.insert(all.grads.end(), out[1].grads.begin(), out[1].grads.end());
  return all;
}

TEST(PM_CUDA_TEST_SUITE, TheMoeLayerGivesTheCpuBits) {
  SKIP_WITHOUT_GPU(gpu);
  for (const char* strategy : {"ep", "ppmoe"})
    for (Precision precision : {Precision::fp32, Precision::bf16})
      for (Activation activation : {Activation::gelu, Activation::swiglu}) {
        SCOPED_TRACE(::testing::Message() << strategy << " bf16 " << (precision == Precision::bf16) << " swiglu "
                                          << (activation == Activation::swiglu));
        MoeShape shape{48, 16, 24, 4, 2, 1.25, 2};
        shape.precision = precision;
        shape.activation = activation;
        const LayerResults on_cpu = run_layer_on(cpu_backend(), strategy, shape);
        const LayerResults on_gpu = run_layer_on(*gpu, strategy, shape);
        EXPECT_TRUE(on_cpu.y == on_gpu.y) << "y";
        EXPECT_TRUE(on_cpu.dx == on_gpu.dx) << "dx";
        EXPECT_TRUE(on_cpu.grads == on_gpu.grads) << "parameter gradients";
      }
}

// The GPT model, 3 training steps on 2 ranks (attention, LayerNorm, the dense MLPs and the loss on
// the host, every GEMM and the experts on the GPU): the losses and the last step's gradients of
// the CPU backend, bit for bit. Top-2 GeLU experts in fp32; SwiGLU experts with a shared expert in
// bf16.
// A GPT of 2 blocks (the second MoE: 4 experts, top-2), small enough for the emulated GPU.
TrainConfig tiny_model() {
  TrainConfig c;
  c.model.vocab_size = 97;
  c.model.seq_len = 16;
  c.model.d_model = 32;
  c.model.layers = 2;
  c.model.heads = 2;
  c.model.mlp_hidden = 48;
  c.model.moe_every = 2;
  c.model.experts = 4;
  c.model.top_k = 2;
  c.model.expert_hidden = 40;
  return c;
}

struct ModelRun {
  std::vector<double> losses;
  std::vector<std::vector<float>> grads;
  bool operator==(const ModelRun&) const = default;
};

std::vector<ModelRun> train_on(Backend& backend, const TrainConfig& c, int steps) {
  std::vector<ModelRun> out(2);
  run_ranks_in_process(2, [&](Communicator& comm) {
    Executor executor;
    GptModel model(c.model, comm, executor, backend);
    GradientSync sync(model.parameters(), c.model.layers, comm, c.overlap_grad_allreduce);
    model.set_grads_ready([&](TaskGraph& g, int block, const std::vector<int>& ready) { sync.grads_ready(g, block, ready); });
    model.init_parameters(5);
    AdamW optimizer(model.parameters());
    ModelRun run;
    const int64_t T = c.batch_size * c.model.seq_len;
    for (int step = 0; step < steps; ++step) {
      std::vector<int32_t> in(T), tg(T);
      Rng rng(9, stream_id(61, step, comm.rank()));
      for (int64_t i = 0; i < T; ++i) in[i] = static_cast<int32_t>(rng.next_u64() % c.model.vocab_size);
      for (int64_t i = 0; i < T; ++i) tg[i] = static_cast<int32_t>(rng.next_u64() % c.model.vocab_size);
      model.zero_grads();
      run.losses.push_back(model.forward(in.data(), tg.data(), c.batch_size, 0.5f));
      model.backward();
      if (step + 1 == steps)
        for (const Parameter& p : model.parameters()) run.grads.emplace_back(p.grad->f32(), p.grad->f32() + p.grad->numel());
      clip_by_global_norm(model.parameters(), comm, c.grad_clip);
      optimizer.step(c, learning_rate(c, step));
    }
    out[comm.rank()] = std::move(run);
  });
  return out;
}

TEST(PM_CUDA_TEST_SUITE, TrainingTheModelGivesTheCpuBits) {
  SKIP_WITHOUT_GPU(gpu);
  for (bool deepseek : {false, true}) {
    SCOPED_TRACE(deepseek ? "SwiGLU, shared expert, bf16" : "top-2 GeLU, fp32");
    TrainConfig c = tiny_model();
    if (deepseek) {
      c.model.expert_activation = "swiglu";
      c.model.shared_expert_hidden = 24;
      c.model.dtype = "bf16";
    }
    c.batch_size = 3;
    c.warmup_steps = 1;
    c.max_steps = 3;
    const std::vector<ModelRun> on_cpu = train_on(cpu_backend(), c, 3), on_gpu = train_on(*gpu, c, 3);
    EXPECT_TRUE(on_cpu == on_gpu);
    for (double loss : on_cpu[0].losses) EXPECT_TRUE(std::isfinite(loss) && loss > 0);
  }
}

// Inference with the key/value cache (the prepacked weights, the experts' inference forward):
// prefill two prompts and decode four tokens on 2 ranks; every logit the CPU backend's bits.
std::vector<std::vector<float>> generate_on(Backend& backend, const TrainConfig& c) {
  std::vector<std::vector<float>> logits;  // rank 0's: prefill of each prompt, then each decode step
  run_ranks_in_process(2, [&](Communicator& comm) {
    Executor executor;
    GptModel model(c.model, comm, executor, backend);
    model.init_parameters(3);
    const int64_t V = c.model.vocab_size, rows = 2;
    model.start_inference(rows);
    std::vector<std::vector<float>> mine;
    std::vector<int32_t> prompt = {5, 17, 3, 40, 2, 9};
    for (int64_t r = 0; r < rows; ++r) {
      const float* out = model.prefill(r, prompt.data() + r, 4 + r);
      mine.emplace_back(out, out + V);
    }
    std::vector<int32_t> next = {7, 11};
    for (int step = 0; step < 4; ++step) {
      const float* all = model.decode(next.data());
      mine.emplace_back(all, all + rows * V);
      for (int64_t r = 0; r < rows; ++r) next[r] = static_cast<int32_t>((next[r] * 31 + step) % V);
    }
    if (comm.rank() == 0) logits = std::move(mine);
  });
  return logits;
}

TEST(PM_CUDA_TEST_SUITE, InferenceGivesTheCpuBits) {
  SKIP_WITHOUT_GPU(gpu);
  TrainConfig c = tiny_model();
  const auto on_cpu = generate_on(cpu_backend(), c), on_gpu = generate_on(*gpu, c);
  ASSERT_EQ(on_cpu.size(), 6u);
  EXPECT_TRUE(on_cpu == on_gpu);
}

}  // namespace pm::cuda_cases
