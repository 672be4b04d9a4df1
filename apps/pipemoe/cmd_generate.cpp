// pipemoe generate: text from a trained checkpoint, with a key/value cache.
//
//   build/pipemoe generate --checkpoint runs/demo --prompt "The jury said" [--prompt "..." ...]
//       [--prompts FILE] [--tokens 80] [--temperature 0.8 | --temperature 0 (greedy)] [--top-k 40]
//       [--top-p 0.95] [--seed 1] [--no-cache] [--no-prefix-reuse] [--json]
//       [--offload-experts host|disk --expert-cache N [--offload-mode prefetch|blocking|resident]]
// Every prompt is a sequence of one batch: each is run once (prefill; a prompt given again is copied,
// one that begins as an earlier one runs from a copy of that prefix), then every step decodes
// one new token of all of them together, each attending to its own cached keys and values. When
// a sequence fills the model's window (seq_len), it slides: its last half is run again. With one
// prompt the text goes to stdout as it is produced; with several, each is printed when done.
// tokens/s goes to stderr. --no-cache re-runs each sequence's whole window for every token (the
// same bits while the window is not full: a check, and the baseline the cache is measured against).
// Runs on any number of ranks that divides the experts (one is enough); routing is dropless.
// --offload-experts keeps each MoE layer's routed experts in host memory or in the checkpoint file
// (mapped) with at most N of them resident per layer (moe/expert_store.h): loaded when needed
// (blocking) or, as soon as the routing is known, on the copy lane (prefetch: ScMoE knows it one
// block early); resident loads all once, for comparison.
#include <algorithm>
#include <cmath>
#include <fstream>
#include <nlohmann/json.hpp>

#include "apps/pipemoe/prefix_store.h"
#include "apps/pipemoe/sampling.h"
#include "core/clock.h"
#include "core/error.h"
#include "core/log.h"
#include "core/rng.h"
#include "apps/pipemoe/command.h"
#include "apps/pipemoe/inference_model.h"
#include "moe/expert_store.h"

namespace pm::cli {
namespace {

struct GenerateOptions {
  std::string checkpoint, prompts_file;
  std::vector<std::string> prompts;
  int tokens = 80;
  Sampling sampling;
  uint64_t seed = 1;
  bool no_cache = false;
  bool prefix_reuse = true;
  bool json = false;
  OffloadOptions offload;
  std::string dtype;  // "": the checkpoint's
};

std::vector<std::string> read_prompts(const GenerateOptions& o) {
  std::vector<std::string> prompts = o.prompts;
  if (!o.prompts_file.empty()) {
    std::ifstream in(o.prompts_file);
    PM_REQUIRE(in.good(), "cannot read the prompts file {}", o.prompts_file);
    for (std::string line; std::getline(in, line);)
      if (!line.empty()) prompts.push_back(line);
  }
  if (prompts.empty()) prompts.push_back("\n");
  return prompts;
}

int run_generate(Context& ctx, const GenerateOptions& o) {
  PM_REQUIRE(!o.checkpoint.empty(), "generate needs --checkpoint DIR");
  PM_REQUIRE(o.tokens > 0, "--tokens must be positive, got {}", o.tokens);
  check_sampling(o.sampling);
  const std::vector<std::string> prompts = read_prompts(o);
  InferenceModel loaded = load_inference_model(ctx, o.checkpoint, o.offload, o.dtype);
  const TrainConfig& config = loaded.config;
  const Tokenizer& tokenizer = loaded.tokenizer;
  GptModel& model = *loaded.model;

  const int64_t S = config.model.seq_len, V = config.model.vocab_size, rows = static_cast<int64_t>(prompts.size());
  model.start_inference(rows);
  std::vector<std::vector<int32_t>> text(rows), generated(rows);  // generated: what the penalties count
  std::vector<Rng> rngs;
  for (int64_t r = 0; r < rows; ++r) {
    text[r] = tokenizer.encode(prompts[r]);
    if (text[r].empty()) text[r] = tokenizer.encode("\n");
    rngs.push_back(sequence_rng(o.seed, r));
  }
  const bool stream = rows == 1 && ctx.rank() == 0 && !o.json;
  if (stream) {
    std::fputs(tokenizer.decode(text[0]).c_str(), stdout);
    std::fflush(stdout);
  }
  // Runs sequence r's window again (the whole of it, or its last half when it is full): its
  // cache restarts from there; returns the logits of its last position.
  // (each row's logits are copied out: the model's logits buffer serves the next pass)
  std::vector<std::vector<float>> logits(rows);
  auto prefill = [&](int64_t r, int64_t keep) {
    const int64_t n = std::min<int64_t>(keep, static_cast<int64_t>(text[r].size()));
    const float* out = model.prefill(r, text[r].data() + text[r].size() - n, n);
    logits[r].assign(out, out + V);
  };
  Stopwatch watch;
  std::vector<int32_t> next(rows);
  PrefixStore windows(rows, 0);  // what each row's cache holds
  int64_t reused = 0;
  for (int64_t r = 0; r < rows; ++r) {
    // a prompt given again (samples of one prompt) runs once: its keys and values are copied (the
    // same bits); one that begins as an earlier one (a shared system prompt) runs from a copy of
    // that prefix (GptModel::extend: the bits of running it whole)
    const int64_t same = std::find(text.begin(), text.begin() + r, text[r]) - text.begin();
    const std::vector<int32_t> window(text[r].end() - std::min<int64_t>(S, text[r].size()), text[r].end());
    const bool reuse = o.prefix_reuse && !o.no_cache;
    const PrefixStore::Match prefix = reuse ? windows.longest_prefix(window, r) : PrefixStore::Match{};
    windows.set_row(r, window);
    if (same < r) {
      model.move_inference_row(same, r);
      logits[r] = logits[same];
    } else if (prefix.length > 0) {
      model.copy_inference_prefix(prefix.row, r, prefix.length);
      const float* out = model.extend(r, prefix.length, window.data() + prefix.length,
                                      static_cast<int64_t>(window.size()) - prefix.length);
      logits[r].assign(out, out + V);
      reused += prefix.length;
    } else {
      prefill(r, S);
    }
  }
  for (int n = 0; n < o.tokens; ++n) {
    for (int64_t r = 0; r < rows; ++r) {
      next[r] = sample_next(logits[r].data(), V, o.sampling, rngs[r], generated[r]);
      ctx.comm.broadcast(&next[r], 1, DType::i32, 0);
      text[r].push_back(next[r]);
      if (o.sampling.adjusts_logits()) generated[r].push_back(next[r]);
    }
    if (stream) {
      std::fputs(tokenizer.decode({next[0]}).c_str(), stdout);  // the text as it comes
      std::fflush(stdout);
    }
    if (n + 1 == o.tokens) break;
    bool slid = false;
    for (int64_t r = 0; r < rows && !o.no_cache; ++r)
      slid |= model.position(r) >= S;  // the window is full: slide by half
    if (o.no_cache || slid) {
      for (int64_t r = 0; r < rows; ++r) prefill(r, o.no_cache ? S : S / 2);
      // the new token was part of the prefill; a sequence whose window was not full re-ran as well
      continue;
    }
    const float* all = model.decode(next.data());
    for (int64_t r = 0; r < rows; ++r) logits[r].assign(all + r * V, all + (r + 1) * V);
  }
  const double seconds = watch.elapsed_s();
  // what expert offloading kept resident and cost, over the MoE layers of this rank
  int64_t peak = 0, all = 0, loads = 0;
  double load_s = 0;
  for (MoeLayer* l : model.moe_layers())
    if (const ExpertCache* cache = l->expert_cache()) {
      peak += cache->peak_resident_bytes();
      all += cache->bytes_per_expert() * cache->store().local_experts();
      loads += cache->loads(), load_s += cache->load_s();
    }
  if (stream && !o.json) std::printf("\n");
  nlohmann::json result = {{"sequences", rows}, {"tokens", o.tokens}, {"seconds", seconds},
                           {"tokens_per_s", rows * o.tokens / seconds}, {"kv_cache", !o.no_cache},
                           {"ranks", ctx.world()}, {"prefix_tokens_reused", reused},
                           {"kv_cache_bytes", model.kv_cache_bytes_per_row() * rows}, {"dtype", config.model.dtype}};
  if (!o.offload.place.empty())
    result.update({{"offload_experts", o.offload.place}, {"offload_mode", o.offload.mode}, {"expert_cache", o.offload.expert_cache},
                   {"expert_loads", loads}, {"expert_load_s", load_s}, {"resident_expert_bytes_peak", peak},
                   {"all_expert_bytes", all}});
  if (ctx.rank() == 0 && o.json) {
    std::vector<std::string> texts;
    for (const auto& t : text) texts.push_back(tokenizer.decode(t));
    result["texts"] = texts;
    std::printf("%s\n", result.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace).c_str());
  } else if (!stream && ctx.rank() == 0) {
    for (int64_t r = 0; r < rows; ++r) std::printf("%s\n", tokenizer.decode(text[r]).c_str());
  }
  std::fflush(stdout);  // the text ends before the summary line on stderr starts
  log::info("generate: {} sequence(s) x {} tokens in {:.2f} s: {:.1f} tokens/s ({}, {}, {} rank(s))", rows, o.tokens,
            seconds, rows * o.tokens / seconds, o.no_cache ? "no cache: the window re-run per token" : "key/value cache",
            config.model.dtype, ctx.world());
  if (!o.offload.place.empty())
    log::info("experts offloaded to {} ({}): {} loads, {:.3f} s loading, resident at most {:.2f} MB of {:.2f} MB",
              o.offload.place, o.offload.mode, loads, load_s, peak / 1e6, all / 1e6);
  return 0;
}

}  // namespace

void add_generate_command(CLI::App& app, CommandFn& run) {
  auto o = std::make_shared<GenerateOptions>();
  CLI::App* cmd = app.add_subcommand("generate", "generate text from a trained checkpoint (key/value cache, batched prompts)");
  cmd->add_option("--checkpoint", o->checkpoint, "checkpoint folder (pipemoe train --save)");
  cmd->add_option("--prompt", o->prompts, "text to continue; repeat for a batch of sequences");
  cmd->add_option("--prompts", o->prompts_file, "a file of prompts, one per line (a batch)");
  cmd->add_option("--tokens", o->tokens, "tokens to generate per sequence")->capture_default_str();
  cmd->add_option("--temperature", o->sampling.temperature, "sampling temperature; 0: greedy (the most likely token)")
      ->capture_default_str();
  cmd->add_option("--top-k", o->sampling.top_k, "sample among the k most likely tokens")->capture_default_str();
  cmd->add_option("--min-p", o->sampling.min_p, "then among those at least MIN_P times as likely as the most likely one")
      ->capture_default_str();
  cmd->add_option("--top-p", o->sampling.top_p, "then among the fewest of those whose probability reaches p (nucleus)")
      ->capture_default_str();
  cmd->add_option("--presence-penalty", o->sampling.presence_penalty,
                  "taken from the logit of every token generated already (-2 to 2, as OpenAI's)")->capture_default_str();
  cmd->add_option("--frequency-penalty", o->sampling.frequency_penalty,
                  "taken from a token's logit once per time it was generated (-2 to 2, as OpenAI's)")->capture_default_str();
  cmd->add_option("--seed", o->seed, "random seed")->capture_default_str();
  cmd->add_flag("--no-cache", o->no_cache, "re-run each sequence's window for every token (no key/value cache)");
  cmd->add_flag("--no-prefix-reuse{false}", o->prefix_reuse,
                "run every prompt whole (by default one that begins as an earlier one starts from a copy of its cached prefix)");
  cmd->add_flag("--json", o->json, "print one JSON object (texts, tokens/s, offloading figures) instead of the text");
  o->offload.add_to(cmd);
  add_inference_dtype_option(cmd, o->dtype);
  cmd->callback([o, &run] { run = [o](Context& ctx) { return run_generate(ctx, *o); }; });
}

}  // namespace pm::cli
