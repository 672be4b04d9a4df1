// The model's parts that need no ranks: tokenizer, corpus text, safetensors, configuration,
// learning-rate schedule, one AdamW step.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>

#include "comm/inprocess_communicator.h"
#include "core/error.h"
#include "model/corpus.h"
#include "model/optimizer.h"
#include "model/safetensors.h"
#include "model/tokenizer.h"
#include "model/train_config.h"

namespace pm {
namespace {

TEST(Tokenizer, LearnsMergesAndRoundTripsAnyBytes) {
  std::string text;
  for (int i = 0; i < 200; ++i) text += "the cat sat on the mat. the dog sat on the log.\n";
  Tokenizer t = Tokenizer::train(text, 300);
  EXPECT_GT(t.vocab_size(), 256);
  EXPECT_LE(t.vocab_size(), 300);
  auto ids = t.encode(text);
  EXPECT_LT(ids.size(), text.size() / 2);  // merges compress repeated words
  EXPECT_EQ(t.decode(ids), text);
  std::string odd = "caf\xc3\xa9  \t\n\x01\xff tab\tend";  // UTF-8, control bytes, runs of spaces
  EXPECT_EQ(t.decode(t.encode(odd)), odd);
  Tokenizer back = Tokenizer::from_json(t.to_json(), "test");
  EXPECT_EQ(back.encode(text), ids);
  EXPECT_EQ(Tokenizer::train(text, 300).to_json(), t.to_json());  // deterministic
  EXPECT_THROW(Tokenizer::from_json("{\"type\": \"byte-bpe\", \"merges\": [[900, 1]], \"vocab_size\": 257}", "bad"), Error);
}

TEST(Tokenizer, WordsKeepTheirLeadingSpace) {
  const std::string text = "Hello  world, ok";  // (the words are views into it)
  EXPECT_EQ(split_words(text), (std::vector<std::string_view>{"Hello", " ", " world", ",", " ok"}));
}

TEST(Corpus, BrownTagsAreStripped) {
  std::string tagged = "\n\n\tThe/at jury/nn said/vbd ``/`` no/at evidence/nn ''/'' ./.\n\n\tIt/pps 's/bez fine/jj ,/, yes/rb ./.\n";
  EXPECT_EQ(brown_file_to_text(tagged), "The jury said \" no evidence \".\nIt's fine, yes.\n");
  EXPECT_NEAR(unigram_entropy({0, 1, 0, 1}, 4), std::log(2.0), 1e-12);
}

TEST(Safetensors, RoundTripAndCorruption) {
  Tensor a = Tensor::empty({2, 3}), b = Tensor::empty({5});
  for (int i = 0; i < 6; ++i) a.f32()[i] = 0.25f * i;
  for (int i = 0; i < 5; ++i) b.f32()[i] = -1.0f * i;
  std::string bytes = encode_safetensors({{"a", a}, {"b.c", b}}, {{"step", "7"}});
  std::map<std::string, std::string> meta;
  auto back = decode_safetensors(bytes, "test", &meta);
  ASSERT_EQ(back.size(), 2u);
  EXPECT_EQ(meta["step"], "7");
  for (const auto& t : back) {
    const Tensor& want = t.name == "a" ? a : b;
    EXPECT_EQ(t.tensor.shape(), want.shape());
    EXPECT_EQ(0, std::memcmp(t.tensor.raw(), want.raw(), want.nbytes()));
  }
  EXPECT_THROW(decode_safetensors(bytes.substr(0, bytes.size() - 4), "cut", nullptr), Error);
  EXPECT_THROW(decode_safetensors("1234", "short", nullptr), Error);
  std::string garbage = bytes;
  garbage[10] = '!';
  EXPECT_THROW(decode_safetensors(garbage, "garbage", nullptr), Error);
}

TEST(TrainConfig, UnknownKeysBadTypesAndImpossibleValues) {
  TrainConfig c;
  c.apply(nlohmann::json{{"d_model", 64}, {"heads", 4}, {"data", "x.txt"}}, "t");
  EXPECT_EQ(c.model.d_model, 64);
  EXPECT_THROW(c.apply(nlohmann::json{{"dmodel", 64}}, "t"), Error);
  EXPECT_THROW(c.apply(nlohmann::json{{"d_model", "big"}}, "t"), Error);
  EXPECT_THROW(c.apply(nlohmann::json{{"layers", 2.5}}, "t"), Error);
  TrainConfig bad = c;
  bad.model.heads = 3;
  EXPECT_THROW(bad.validate(1), Error);
  TrainConfig odd = c;
  odd.model.experts = 4;
  EXPECT_THROW(odd.validate(3), Error);
  EXPECT_NO_THROW(odd.validate(2));
  // the backbone's keys
  for (const nlohmann::json& j : {nlohmann::json{{"norm", "batchnorm"}}, nlohmann::json{{"position", "alibi"}},
                                  nlohmann::json{{"rope_theta", 1.0}}, nlohmann::json{{"mlp_activation", "relu"}},
                                  nlohmann::json{{"position", "rope"}, {"d_model", 60}, {"heads", 4}},
                                  nlohmann::json{{"kv_heads", 3}}, nlohmann::json{{"kv_heads", 5}},
                                  nlohmann::json{{"kv_heads", -1}}}) {
    TrainConfig backbone = c;
    backbone.apply(j, "t");
    EXPECT_THROW(backbone.validate(1), Error) << j.dump();
  }
  TrainConfig llama = c;
  llama.apply(nlohmann::json{{"norm", "rmsnorm"}, {"position", "rope"}, {"rope_theta", 5e5}, {"mlp_activation", "swiglu"}},
              "t");
  EXPECT_NO_THROW(llama.validate(1));
  TrainConfig round = c;
  round.apply(c.to_json(), "itself");
  EXPECT_EQ(round.to_json(), c.to_json());
}

TEST(TrainConfig, ANumberForATextKeyIsItsText) {
  // `--set degree=2` parses as the number 2, and so does "degree": 2 in a file: both mean "2"
  TrainConfig c;
  nlohmann::json overrides;
  apply_set_option(overrides, "degree=2");
  c.apply(overrides, "--set");
  EXPECT_EQ(c.degree, "2");
  c.apply(nlohmann::json{{"degree", 4}}, "t");
  EXPECT_EQ(c.degree, "4");
  c.apply(nlohmann::json{{"degree", "auto"}}, "t");
  EXPECT_EQ(c.degree, "auto");
  try {
    c.apply(nlohmann::json{{"degree", nlohmann::json::array({1, 2})}}, "t");
    FAIL() << "a list for a text key was taken";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("'degree' must be a string, got"), std::string::npos) << e.what();
  }
}

TEST(TrainConfig, PathsInAFileAreRelativeToItsFolderButPlotNoneIsAWord) {
  TrainConfig c;
  c.apply(nlohmann::json{{"plot", "curve.png"}, {"log_csv", "log.csv"}}, "f.json", "/runs/a");
  EXPECT_EQ(c.plot, "/runs/a/curve.png");
  EXPECT_EQ(c.log_csv, "/runs/a/log.csv");
  c.apply(nlohmann::json{{"plot", "none"}}, "f.json", "/runs/a");
  EXPECT_EQ(c.plot, "none");  // no PNG at all, not a file named "none"
  c.apply(nlohmann::json{{"log_csv", "none"}}, "f.json", "/runs/a");
  EXPECT_EQ(c.log_csv, "/runs/a/none");  // only the plot has the word
}

TEST(Optimizer, ScheduleAndOneAdamWStep) {
  TrainConfig c;
  c.lr = 1.0, c.min_lr = 0.1, c.warmup_steps = 10, c.max_steps = 110;
  EXPECT_DOUBLE_EQ(learning_rate(c, 0), 0.1);
  EXPECT_DOUBLE_EQ(learning_rate(c, 9), 1.0);
  EXPECT_NEAR(learning_rate(c, 60), 0.55, 1e-12);  // half way down the cosine
  EXPECT_NEAR(learning_rate(c, 110), 0.1, 1e-12);
  Tensor w = Tensor::empty({2}), g = Tensor::empty({2});
  w.f32()[0] = 1.0f, w.f32()[1] = -2.0f, g.f32()[0] = 0.5f, g.f32()[1] = -0.25f;
  std::vector<Parameter> params = {{"w", &w, &g, false, true}};
  AdamW opt(params);
  c.weight_decay = 0.1, c.beta1 = 0.9, c.beta2 = 0.95, c.adam_eps = 1e-8;
  opt.step(c, 0.01);
  // first step: m_hat = g, v_hat = g^2, so the update is lr * sign(g) (plus decay)
  EXPECT_NEAR(w.f32()[0], 1.0 * (1 - 0.01 * 0.1) - 0.01, 1e-6);
  EXPECT_NEAR(w.f32()[1], -2.0 * (1 - 0.01 * 0.1) + 0.01, 1e-6);
}

// The trainer's clipping: AdamW reads each gradient times clip_scale's factor, where
// clip_by_global_norm wrote the scaled gradients first: the same weights, bit for bit, clipped
// and not.
TEST(Optimizer, ClippingAsTheUpdateReadsGivesTheBitsOfClippingFirst) {
  TrainConfig c;
  c.weight_decay = 0.1, c.beta1 = 0.9, c.beta2 = 0.95, c.adam_eps = 1e-8;
  for (const double max_norm : {0.3, 100.0}) {  // clipped, and within the bound
    Tensor w1 = Tensor::empty({5}), g1 = Tensor::empty({5}), w2 = Tensor::empty({5}), g2 = Tensor::empty({5});
    for (int i = 0; i < 5; ++i) w1.f32()[i] = w2.f32()[i] = 0.3f * i - 0.7f;
    std::vector<Parameter> first = {{"w", &w1, &g1, false, true}}, fused = {{"w", &w2, &g2, false, true}};
    AdamW opt1(first), opt2(fused);
    run_ranks_in_process(1, [&](Communicator& comm) {
      for (int step = 0; step < 3; ++step) {
        for (int i = 0; i < 5; ++i) g1.f32()[i] = g2.f32()[i] = 0.37f * (i + step) - 0.9f;
        clip_by_global_norm(first, comm, max_norm);
        opt1.step(c, 0.01);
        const double norm = global_grad_norm(fused, comm);
        opt2.step(c, 0.01, clip_scale(norm, max_norm));
      }
    });
    EXPECT_EQ(std::memcmp(w1.f32(), w2.f32(), 5 * sizeof(float)), 0) << "max norm " << max_norm;
    EXPECT_EQ(clip_scale(10.0, max_norm), max_norm < 10 ? static_cast<float>(max_norm / 10.0) : 1.0f);
  }
  EXPECT_EQ(clip_scale(std::nan(""), 1.0), 1.0f);  // not a number: left to the trainer's check
  EXPECT_EQ(clip_scale(5.0, 0.0), 1.0f);           // 0: no clipping
}

// The norm's squares are summed in 32 running sums (value i into sum i % 32), then sum k + 16 into
// sum k, k + 8 into k, ..., 1 into 0: for a value of 2^27 (its square 2^54, where a double's step
// is 4) then 31 ones, 2^54 meets 1, 2, 4, 8 and 16 in turn; 1 and 2 round away: 2^54 + 28. One
// running sum gave 2^54 (every 1 rounds away).
// Sizes around 32 and a long one check the tail against a long double sum.
TEST(Optimizer, GradientNormSumsItsSquaresIn32RunningSums) {
  run_ranks_in_process(1, [&](Communicator& comm) {
    Tensor w = Tensor::empty({32}), g = Tensor::empty({32});
    g.f32()[0] = 134217728.0f;  // 2^27
    for (int i = 1; i < 32; ++i) g.f32()[i] = 1.0f;
    std::vector<Parameter> one = {{"w", &w, &g, false, true}};
    EXPECT_EQ(global_grad_norm(one, comm), std::sqrt(18014398509481984.0 + 28.0));
    for (const int64_t n : {1, 31, 33, 65, 100003}) {
      Tensor wn = Tensor::empty({n}), gn = Tensor::empty({n});
      long double sum = 0;
      for (int64_t i = 0; i < n; ++i) {
        gn.f32()[i] = std::sin(0.37f * static_cast<float>(i)) * 1e-3f;
        sum += static_cast<long double>(gn.f32()[i]) * gn.f32()[i];
      }
      std::vector<Parameter> params = {{"w", &wn, &gn, false, true}};
      const double norm = global_grad_norm(params, comm), want = std::sqrt(static_cast<double>(sum));
      EXPECT_NEAR(norm, want, 1e-14 * want) << n << " values";
    }
  });
}

}  // namespace
}  // namespace pm
