// pipemoe generate: sample text from a trained checkpoint.
//
//   build/pipemoe generate --checkpoint runs/demo --prompt "The jury said" [--tokens 80]
//       [--temperature 0.8] [--top-k 40] [--seed 1]
// Runs on any number of ranks that divides the experts (one is enough).
#include <algorithm>
#include <cmath>

#include "apps/pipemoe/command.h"
#include "core/error.h"
#include "core/rng.h"
#include "model/checkpoint.h"
#include "model/gpt.h"
#include "model/tokenizer.h"
#include "sched/executor.h"

namespace pm::cli {
namespace {

struct GenerateOptions {
  std::string checkpoint, prompt;
  int tokens = 80;
  double temperature = 0.8;
  int top_k = 40;
  uint64_t seed = 1;
};

int run_generate(Context& ctx, const GenerateOptions& o) {
  PM_REQUIRE(!o.checkpoint.empty(), "generate needs --checkpoint DIR");
  PM_REQUIRE(o.tokens > 0, "--tokens must be positive, got {}", o.tokens);
  PM_REQUIRE(o.temperature > 0, "--temperature must be positive, got {}", o.temperature);
  PM_REQUIRE(o.top_k >= 1, "--top-k must be at least 1, got {}", o.top_k);
  CheckpointState state = read_checkpoint_state(ctx.comm, o.checkpoint);
  TrainConfig config;
  config.apply(state.config, o.checkpoint + "/state.json");
  Tokenizer tokenizer = Tokenizer::from_json(state.tokenizer_json, o.checkpoint + "/tokenizer.json");
  config.model.vocab_size = tokenizer.vocab_size();
  PM_REQUIRE(config.model.moe_layers() == 0 || config.model.experts % ctx.world() == 0,
             "the checkpoint's {} experts cannot be spread over {} ranks", config.model.experts, ctx.world());
  Executor executor;
  GptModel model(config.model, ctx.comm, executor, ctx.backend);
  load_checkpoint_tensors(ctx.comm, o.checkpoint, model.parameters(), nullptr);

  std::vector<int32_t> tokens = tokenizer.encode(o.prompt.empty() ? "\n" : o.prompt);
  const int64_t S = config.model.seq_len, V = config.model.vocab_size;
  Rng rng(o.seed, stream_id(50));
  std::vector<int32_t> window(S);
  for (int n = 0; n < o.tokens; ++n) {
    // the last S tokens, left-padded with the first token when the text is shorter
    int64_t have = std::min<int64_t>(S, tokens.size());
    std::fill(window.begin(), window.end(), tokens[tokens.size() - have]);
    std::copy(tokens.end() - have, tokens.end(), window.end() - have);
    model.forward(window.data(), nullptr, 1, 0.0f);
    const float* last = model.logits() + (S - 1) * V;
    // top-k sampling at the temperature; every rank draws the same token from the same numbers
    std::vector<int32_t> order(V);
    for (int32_t i = 0; i < V; ++i) order[i] = i;
    int k = std::min<int>(o.top_k, static_cast<int>(V));
    std::partial_sort(order.begin(), order.begin() + k, order.end(), [&](int32_t a, int32_t b) { return last[a] > last[b]; });
    std::vector<double> p(k);
    double sum = 0;
    for (int i = 0; i < k; ++i) sum += p[i] = std::exp((last[order[i]] - last[order[0]]) / o.temperature);
    double u = rng.uniform() * sum;
    int pick = 0;
    while (pick + 1 < k && (u -= p[pick]) > 0) ++pick;
    int32_t next = order[pick];
    ctx.comm.broadcast(&next, 1, DType::i32, 0);
    tokens.push_back(next);
  }
  if (ctx.rank() == 0) std::printf("%s\n", tokenizer.decode(tokens).c_str());
  return 0;
}

}  // namespace

void add_generate_command(CLI::App& app, CommandFn& run) {
  auto o = std::make_shared<GenerateOptions>();
  CLI::App* cmd = app.add_subcommand("generate", "sample text from a trained checkpoint");
  cmd->add_option("--checkpoint", o->checkpoint, "checkpoint folder (pipemoe train --save)");
  cmd->add_option("--prompt", o->prompt, "text to continue");
  cmd->add_option("--tokens", o->tokens, "tokens to generate")->capture_default_str();
  cmd->add_option("--temperature", o->temperature, "sampling temperature")->capture_default_str();
  cmd->add_option("--top-k", o->top_k, "sample among the k most likely tokens")->capture_default_str();
  cmd->add_option("--seed", o->seed, "random seed")->capture_default_str();
  cmd->callback([o, &run] { run = [o](Context& ctx) { return run_generate(ctx, *o); }; });
}

}  // namespace pm::cli
