// pipemoe generate: sample text from a trained checkpoint.
//
//   build/pipemoe generate --checkpoint runs/demo --prompt "The jury said" [--tokens 80]
//       [--temperature 0.8 | --temperature 0 (greedy)] [--top-k 40] [--top-p 0.95] [--seed 1]
// Runs on any number of ranks that divides the experts (one is enough). The text goes to stdout as
// it is produced; tokens/s to stderr at the end. (Each token re-runs the model on its window: a
// KV cache comes with the inference path.)
#include <algorithm>
#include <cmath>

#include "apps/pipemoe/command.h"
#include "core/clock.h"
#include "core/error.h"
#include "core/log.h"
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
  double temperature = 0.8;  // 0: greedy
  int top_k = 40;
  double top_p = 1.0;        // nucleus: the fewest most likely tokens whose probability reaches p
  uint64_t seed = 1;
};

// The next token from the last position's logits[V]: greedy at temperature 0, else drawn among
// the top-k, then the top-p of those, at the temperature. Every rank draws the same from the
// same numbers.
int32_t sample_next(const float* logits, int64_t V, const GenerateOptions& o, Rng& rng) {
  std::vector<int32_t> order(V);
  for (int32_t i = 0; i < V; ++i) order[i] = i;
  const int k = o.temperature == 0 ? 1 : std::min<int>(o.top_k, static_cast<int>(V));
  std::partial_sort(order.begin(), order.begin() + k, order.end(),
                    [&](int32_t a, int32_t b) { return logits[a] > logits[b] || (logits[a] == logits[b] && a < b); });
  if (k == 1) return order[0];
  std::vector<double> p(k);
  double sum = 0;
  for (int i = 0; i < k; ++i) sum += p[i] = std::exp((logits[order[i]] - logits[order[0]]) / o.temperature);
  int keep = k;  // top-p: cut the tail once the kept mass reaches p
  double mass = 0;
  for (int i = 0; i < k && o.top_p < 1; ++i)
    if ((mass += p[i] / sum) >= o.top_p) {
      keep = i + 1;
      break;
    }
  double kept = 0;
  for (int i = 0; i < keep; ++i) kept += p[i];
  double u = rng.uniform() * kept;
  int pick = 0;
  while (pick + 1 < keep && (u -= p[pick]) > 0) ++pick;
  return order[pick];
}

int run_generate(Context& ctx, const GenerateOptions& o) {
  PM_REQUIRE(!o.checkpoint.empty(), "generate needs --checkpoint DIR");
  PM_REQUIRE(o.tokens > 0, "--tokens must be positive, got {}", o.tokens);
  PM_REQUIRE(o.temperature >= 0 && std::isfinite(o.temperature), "--temperature must be 0 (greedy) or positive, got {}",
             o.temperature);
  PM_REQUIRE(o.top_k >= 1, "--top-k must be at least 1, got {}", o.top_k);
  PM_REQUIRE(o.top_p > 0 && o.top_p <= 1, "--top-p must be in (0, 1], got {}", o.top_p);
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
  if (ctx.rank() == 0) {
    std::fputs(tokenizer.decode(tokens).c_str(), stdout);
    std::fflush(stdout);
  }
  Stopwatch watch;
  for (int n = 0; n < o.tokens; ++n) {
    // the last S tokens, left-padded with the first token when the text is shorter
    int64_t have = std::min<int64_t>(S, tokens.size());
    std::fill(window.begin(), window.end(), tokens[tokens.size() - have]);
    std::copy(tokens.end() - have, tokens.end(), window.end() - have);
    model.forward(window.data(), nullptr, 1, 0.0f);
    int32_t next = sample_next(model.logits() + (S - 1) * V, V, o, rng);
    ctx.comm.broadcast(&next, 1, DType::i32, 0);
    tokens.push_back(next);
    if (ctx.rank() == 0) {
      std::fputs(tokenizer.decode({next}).c_str(), stdout);  // the text as it comes
      std::fflush(stdout);
    }
  }
  const double seconds = watch.elapsed_s();
  if (ctx.rank() == 0) std::printf("\n");
  log::info("generate: {} tokens in {:.2f} s, {:.1f} tokens/s ({} rank(s), window {} re-run per token)", o.tokens,
            seconds, o.tokens / seconds, ctx.world(), S);
  return 0;
}

}  // namespace

void add_generate_command(CLI::App& app, CommandFn& run) {
  auto o = std::make_shared<GenerateOptions>();
  CLI::App* cmd = app.add_subcommand("generate", "sample text from a trained checkpoint");
  cmd->add_option("--checkpoint", o->checkpoint, "checkpoint folder (pipemoe train --save)");
  cmd->add_option("--prompt", o->prompt, "text to continue");
  cmd->add_option("--tokens", o->tokens, "tokens to generate")->capture_default_str();
  cmd->add_option("--temperature", o->temperature, "sampling temperature; 0: greedy (the most likely token)")
      ->capture_default_str();
  cmd->add_option("--top-k", o->top_k, "sample among the k most likely tokens")->capture_default_str();
  cmd->add_option("--top-p", o->top_p, "then among the fewest of those whose probability reaches p (nucleus)")
      ->capture_default_str();
  cmd->add_option("--seed", o->seed, "random seed")->capture_default_str();
  cmd->callback([o, &run] { run = [o](Context& ctx) { return run_generate(ctx, *o); }; });
}

}  // namespace pm::cli
