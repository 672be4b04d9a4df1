// The GPT model on ranks run as threads: ScMoE's schedules change time, never bits. Where the
// experts sit among the dense tasks (the slot, fixed or by the balancing rule) and whether the
// gradient all-reduce overlaps the backward give the same losses and gradients, step after step;
// and every rank adds its collectives in an order the others match (the in-process transport
// stops at the first collective that does not).
#include <gtest/gtest.h>

#include <algorithm>
#include <mutex>
#include <set>

#include "comm/inprocess_communicator.h"
#include "core/rng.h"
#include "model/gpt.h"
#include "model/grad_sync.h"
#include "model/optimizer.h"
#include "support/synthetic_profile.h"

namespace pm {
namespace {

TrainConfig tiny(const std::string& arch, int slot, bool overlap) {
  TrainConfig c;
  c.model.vocab_size = 97;
  c.model.seq_len = 16;
  c.model.d_model = 32;
  c.model.layers = 4;
  c.model.heads = 2;
  c.model.mlp_hidden = 48;
  c.model.moe_every = 2;
  c.model.experts = 4;
  c.model.top_k = 1;
  c.model.expert_hidden = 40;
  c.model.arch = arch;
  c.model.scmoe_tap = "pos2";
  c.model.scmoe_slot = slot;
  c.model.shared_expert_hidden = 40;
  c.model.coef_gate = true;
  c.batch_size = 3;
  c.overlap_grad_allreduce = overlap;
  c.warmup_steps = 1;
  c.max_steps = 4;
  return c;
}

// The backbone: "gpt2" (LayerNorm, learned positions, GeLU MLPs, multi-head) or "llama" (RMSNorm,
// rotary embeddings, SwiGLU MLPs, grouped-query: one key/value head for the two query heads, the
// cache half the size).
void set_backbone(ModelConfig& m, const std::string& backbone) {
  if (backbone == "gpt2") return;
  m.norm = "rmsnorm";
  m.position = "rope";
  m.mlp_activation = "swiglu";
  m.kv_heads = 1;
}

// Per rank: the loss of each step and every gradient of the last.
struct RankRun {
  std::vector<double> losses;
  std::vector<std::vector<float>> grads;
  bool operator==(const RankRun&) const = default;
};

// profile: ScMoE's windows (slot and degree) planned from it before every pass.
std::vector<RankRun> train_steps(const TrainConfig& c, int ranks, int steps, const PerfProfile* profile = nullptr,
                                 std::set<std::pair<int, int>>* windows = nullptr) {
  std::vector<RankRun> out(ranks);
  std::mutex m;
  run_ranks_in_process(ranks, [&](Communicator& comm) {
    Executor executor;
    GptModel model(c.model, comm, executor, cpu_backend());
    GradientSync sync(model.parameters(), c.model.layers, comm, c.overlap_grad_allreduce);
    model.set_grads_ready([&](TaskGraph& g, int block, const std::vector<int>& ready) { sync.grads_ready(g, block, ready); });
    model.init_parameters(5);
    model.plan_windows_with(profile);
    AdamW optimizer(model.parameters());
    RankRun run;
    const int64_t T = c.batch_size * c.model.seq_len;
    for (int step = 0; step < steps; ++step) {
      std::vector<int32_t> in(T), tg(T);
      Rng rng(9, stream_id(60, step, comm.rank()));
      for (int64_t i = 0; i < T; ++i) in[i] = static_cast<int32_t>(rng.next_u64() % c.model.vocab_size);
      for (int64_t i = 0; i < T; ++i) tg[i] = static_cast<int32_t>(rng.next_u64() % c.model.vocab_size);
      model.zero_grads();
      run.losses.push_back(model.forward(in.data(), tg.data(), c.batch_size, 1.0f / ranks));
      model.backward();
      if (step + 1 == steps)
        for (const Parameter& p : model.parameters()) run.grads.emplace_back(p.grad->f32(), p.grad->f32() + p.grad->numel());
      clip_by_global_norm(model.parameters(), comm, c.grad_clip);
      optimizer.step(c, learning_rate(c, step));
      std::lock_guard lock(m);
      if (windows)
        for (const auto* planned : {&model.forward_windows(), &model.backward_windows()})
          for (const auto& [block, w] : *planned) windows->insert({w.degree, w.slot});
    }
    std::lock_guard lock(m);
    out[comm.rank()] = std::move(run);
  });
  return out;
}

TEST(ModelOnThreadRanks, ScmoeSlotsAndTheOverlappedAllReduceChangeNoBits) {
  const std::vector<RankRun> base = train_steps(tiny("scmoe", 0, true), 2, 4);
  for (int slot : {-1, 1, 2, 3}) EXPECT_TRUE(train_steps(tiny("scmoe", slot, true), 2, 4) == base) << "slot " << slot;
  EXPECT_TRUE(train_steps(tiny("scmoe", -1, false), 2, 4) == base) << "all-reduce after the backward";
  for (double loss : base[0].losses) EXPECT_TRUE(std::isfinite(loss) && loss > 0);
}

TEST(ModelOnThreadRanks, ScmoeWindowsPlannedFromAProfileChangeNoBits) {
  const std::vector<RankRun> base = train_steps(tiny("scmoe", 0, true), 2, 4);
  // a slow link pipelines, a fast one with costly tasks does not: windows of several degrees
  std::set<std::pair<int, int>> windows;
  for (const PerfProfile& p : {synthetic_profile(2.0, 0.01, 0), synthetic_profile(1e-6, 1000, 1e-3)})
    EXPECT_TRUE(train_steps(tiny("scmoe", -1, true), 2, 4, &p, &windows) == base);
  std::set<int> degrees;
  for (auto [degree, slot] : windows) degrees.insert(degree);
  EXPECT_GT(degrees.size(), 1u) << "the planner chose more than one degree";
  EXPECT_TRUE(degrees.count(1));
}

TEST(ModelOnThreadRanks, ThreeAndFourRanksTrainTheMoeModelAndScmoeWithoutAMismatchedCollective) {
  for (int ranks : {3, 4}) {
    TrainConfig c = tiny("scmoe", -1, true);
    c.model.experts = 12;
    std::vector<RankRun> runs = train_steps(c, ranks, 3);
    ASSERT_EQ(static_cast<int>(runs.size()), ranks);
    TrainConfig m = tiny("moe", -1, true);
    m.model.experts = 12;
    m.model.top_k = 2;
    runs = train_steps(m, ranks, 3);
    ASSERT_EQ(static_cast<int>(runs.size()), ranks);
  }
}

}  // namespace
}  // namespace pm

namespace pm {
namespace {

// The key/value cache changes time, never bits: decoding token by token gives the logits of a
// forward over the whole sequence at its last position, for every sequence of a batch, on 1 and
// 2 ranks, with ScMoE or not, GPT-2's backbone and Llama's (rotary embeddings turn the cached keys).
TEST(ModelOnThreadRanks, DecodingWithTheCacheGivesTheBitsOfTheWholeSequence) {
  for (const char* backbone : {"gpt2", "llama"})
  for (const char* arch : {"moe", "scmoe"})
    for (int ranks : {1, 2}) {
      TrainConfig c = tiny(arch, -1, true);
      set_backbone(c.model, backbone);
      const int64_t V = c.model.vocab_size;
      run_ranks_in_process(ranks, [&](Communicator& comm) {
        Executor executor;
        GptModel model(c.model, comm, executor, cpu_backend());
        model.init_parameters(7);
        const std::vector<std::vector<int32_t>> prompts = {{5, 17, 3}, {40, 2, 2, 9, 11, 60}};
        model.start_inference(2);
        std::vector<std::vector<int32_t>> seq = prompts;
        std::vector<int32_t> next(2);
        for (int r = 0; r < 2; ++r) {
          const float* logits = model.prefill(r, seq[r].data(), static_cast<int64_t>(seq[r].size()));
          next[r] = static_cast<int32_t>(std::max_element(logits, logits + V) - logits);
        }
        for (int step = 0; step < 6; ++step) {
          for (int r = 0; r < 2; ++r) seq[r].push_back(next[r]);
          std::vector<float> cached(model.decode(next.data()), model.decode_logits_end(V));
          for (int r = 0; r < 2; ++r) {
            // the whole sequence again, in a model of its own with the same weights
            Executor ex2;
            GptModel whole(c.model, comm, ex2, cpu_backend());
            whole.init_parameters(7);
            whole.start_inference(1);
            const float* full = whole.prefill(0, seq[r].data(), static_cast<int64_t>(seq[r].size()));
            EXPECT_TRUE(std::equal(full, full + V, cached.begin() + r * V))
                << backbone << " " << arch << ", " << ranks << " ranks, sequence " << r << ", step " << step;
            next[r] = static_cast<int32_t>(std::max_element(full, full + V) - full) % 50 + 1;
          }
        }
      });
    }
}

// Prefix reuse (serve): a prompt that starts from a copy of another row's first positions, kept
// aside in a row that is not decoded, and runs only its remaining tokens gives the bits of its
// whole prompt, and so do the tokens decoded after it; 1 and 2 ranks, ScMoE or not, fp32 and bf16,
// GPT-2's backbone and Llama's.
TEST(ModelOnThreadRanks, APromptContinuingACachedPrefixGivesTheBitsOfTheWholePrompt) {
  for (const char* backbone : {"gpt2", "llama"})
  for (const char* arch : {"moe", "scmoe"})
    for (const char* dtype : {"fp32", "bf16"})
      for (int ranks : {1, 2}) {
        TrainConfig c = tiny(arch, -1, true);
        c.model.dtype = dtype;
        set_backbone(c.model, backbone);
        const int64_t V = c.model.vocab_size;
        run_ranks_in_process(ranks, [&](Communicator& comm) {
          auto whole_prompt = [&](const std::vector<int32_t>& tokens) {
            Executor ex;
            GptModel whole(c.model, comm, ex, cpu_backend());
            whole.init_parameters(7);
            whole.start_inference(1);
            const float* l = whole.prefill(0, tokens.data(), static_cast<int64_t>(tokens.size()));
            return std::vector<float>(l, l + V);
          };
          Executor executor;
          GptModel model(c.model, comm, executor, cpu_backend());
          model.init_parameters(7);
          model.start_inference(3);
          model.set_inference_rows(2);  // row 2: the store
          const std::vector<int32_t> first = {5, 17, 3, 44, 9, 21, 8};
          model.prefill(0, first.data(), static_cast<int64_t>(first.size()));
          model.copy_inference_prefix(0, 2, 5);
          for (int64_t reused : {1, 3, 5}) {
            std::vector<int32_t> prompt(first.begin(), first.begin() + reused);
            for (int32_t t : {30, 2, 2, 61}) prompt.push_back(t);
            const int64_t n = static_cast<int64_t>(prompt.size());
            model.copy_inference_prefix(2, 1, reused);
            const float* got = model.extend(1, reused, prompt.data() + reused, n - reused);
            EXPECT_EQ(whole_prompt(prompt), std::vector<float>(got, got + V))
                << backbone << " " << arch << " " << dtype << ", " << ranks << " ranks, " << reused << " positions reused";
            EXPECT_EQ(model.position(1), n);
          }
          // then decoding goes on from it as from a prompt run whole
          std::vector<int32_t> seq = {5, 17, 3, 44, 9, 30, 2, 2, 61};
          model.prefill(0, first.data(), static_cast<int64_t>(first.size()));
          for (int step = 0; step < 3; ++step) {
            const std::vector<int32_t> next = {11, static_cast<int32_t>(20 + step)};
            seq.push_back(next[1]);
            std::vector<float> decoded(model.decode(next.data()), model.decode_logits_end(V));
            EXPECT_EQ(whole_prompt(seq), std::vector<float>(decoded.begin() + V, decoded.end()))
                << backbone << " " << arch << " " << dtype << ", " << ranks << " ranks, step " << step;
          }
          // several rows in one pass (serve's admissions): a whole prompt and one continuing a
          // cached prefix, each with the bits it gets alone, at every position of the whole one
          const std::vector<int32_t> alone = {7, 7, 13, 2}, continued = {5, 17, 3, 30, 2};
          model.copy_inference_prefix(2, 1, 3);
          const float* both = model.extend_many({{0, 0, alone.data(), 4}, {1, 3, continued.data() + 3, 2}});
          const std::vector<float> all(both, both + 6 * V);
          for (int64_t n = 1; n <= 4; ++n)
            EXPECT_EQ(whole_prompt(std::vector<int32_t>(alone.begin(), alone.begin() + n)),
                      std::vector<float>(all.begin() + (n - 1) * V, all.begin() + n * V))
                << backbone << " " << arch << " " << dtype << ", " << ranks << " ranks, one pass, position " << n - 1;
          EXPECT_EQ(whole_prompt(continued), std::vector<float>(all.begin() + 5 * V, all.end()))
              << backbone << " " << arch << " " << dtype << ", " << ranks << " ranks, one pass, the continued prompt";
          EXPECT_EQ(model.position(0), 4);
          EXPECT_EQ(model.position(1), 5);
        });
      }
}

// Inference packs the weights once (start_inference, or the experts as a checkpoint loads): a
// prompt's logits are the bits of a training forward over the same tokens (dropless too), in fp32
// and bf16, on 1 and 2 ranks, both backbones.
TEST(ModelOnThreadRanks, WeightsPackedOnceForInferenceGiveTheTrainingForwardsBits) {
  for (const char* backbone : {"gpt2", "llama"})
  for (const char* dtype : {"fp32", "bf16"})
    for (int ranks : {1, 2}) {
      TrainConfig c = tiny("moe", -1, true);
      c.model.dtype = dtype;
      set_backbone(c.model, backbone);
      const int64_t V = c.model.vocab_size, S = c.model.seq_len;
      run_ranks_in_process(ranks, [&](Communicator& comm) {
        std::vector<int32_t> tokens(S), targets(S);
        for (int64_t i = 0; i < S; ++i) tokens[i] = static_cast<int32_t>((i * 37 + 11) % V), targets[i] = 1;
        Executor ex_train;
        GptModel training(c.model, comm, ex_train, cpu_backend());
        training.init_parameters(9);
        for (MoeLayer* l : training.moe_layers()) l->set_capacity_factor(0);  // as inference routes
        training.forward(tokens.data(), targets.data(), 1, 1.0f);
        const std::vector<float> trained(training.logits(), training.logits() + S * V);
        Executor ex_infer;
        GptModel inference(c.model, comm, ex_infer, cpu_backend());
        inference.init_parameters(9);
        inference.start_inference(1);
        for (int pass = 0; pass < 2; ++pass) {  // the second pass reuses the packing
          inference.start_inference(1);
          const float* last = inference.prefill(0, tokens.data(), S);
          EXPECT_TRUE(std::equal(last, last + V, trained.begin() + (S - 1) * V))
              << backbone << " " << dtype << ", " << ranks << " ranks, pass " << pass;
        }
        auto masters_gone = [&](GptModel& m, const char* when) {
          for (MoeLayer* l : m.moe_layers())
            for (const Parameter& p : l->parameters())
              EXPECT_TRUE((p.name != "w1" && p.name != "w2") || p.value->raw() == nullptr) << p.name << " " << when;
        };
        // packed for good: the experts' fp32 W1 and W2 are gone (the second pass ran without them)
        masters_gone(inference, "after the passes");
        // packed before the first pass, as a checkpoint's load does layer by layer: the same bits
        Executor ex_early;
        GptModel early(c.model, comm, ex_early, cpu_backend());
        early.init_parameters(9);
        for (MoeLayer* l : early.moe_layers()) l->set_inference(), l->pack_for_inference();
        masters_gone(early, "packed at load");
        early.start_inference(1);
        const float* last = early.prefill(0, tokens.data(), S);
        EXPECT_TRUE(std::equal(last, last + V, trained.begin() + (S - 1) * V))
            << backbone << " " << dtype << ", " << ranks << " ranks, packed at load";
      });
    }
}

}  // namespace
}  // namespace pm
