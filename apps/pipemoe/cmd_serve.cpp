// pipemoe serve: completions from a trained checkpoint over HTTP, with continuous batching.
//
//   build/pipemoe serve --checkpoint runs/demo [--host 127.0.0.1] [--port 8000] [--max-batch 8]
//       [--max-requests N] [--offload-experts host|disk --expert-cache N ...]
//   mpirun -q -np 2 build/pipemoe serve --checkpoint runs/demo      (the experts spread over the ranks)
//
//   POST /v1/completions  {"prompt": "The jury said", "max_tokens": 64, "temperature": 0.8, "top_k": 40,
//                          "top_p": 1.0, "seed": 1, "stop": ["\n\n"], "stream": false}
//   GET  /health          {"status": "ok", "active": .., "waiting": .., "served": .., "tokens_per_s": ..,
//                          "peak_batch": the most rows decoded together so far, "prompts_run",
//                          "prompts_shared": prompts prefilled, and copied from a row that ran the same one,
//                          "prompt_tokens_run", "prefix_hits", "prefix_tokens_reused": prompts begun from a
//                          prefix some row's cache held (prefix_store.h)}
//   GET  /metrics         the same counts and two latency histograms, Prometheus's text format
//   POST /v1/chat/completions  {"messages": [{"role": "user", "content": "Tell me of the jury"}], ...the
//                          same fields; "max_completion_tokens" for "max_tokens"}
//   logprobs: completions "logprobs": N (0-5) and "echo": true (the prompt's text and its tokens'
//   log-probabilities first, as evaluation harnesses ask); chat "logprobs": true, "top_logprobs": N
//   (0-20). The model's own log-probabilities (log-softmax of the logits, whatever the sampling);
//   streamed too, each piece with its tokens' (not with echo).
//   "prompt" may be a list (several prompts); "n": choices per prompt (1-16), prompt p's choice i
//   at index p*n+i, sampled as `generate` samples that row of the prompts each repeated n times;
//   streamed, the pieces of the choices interleave, each naming its index.
//   GET  /v1/models
// The subset of OpenAI's completions API that applies (prompts as strings or token ids; fields it
// does not know are ignored). A chat's messages become one prompt by
// chat_prompt's template (the models trained here are plain language models: they have no chat
// format of their own), and its answer is that prompt's completion in the chat API's form (a
// message, or deltas when streamed). A request's text is the one `generate --prompt P --tokens
// max_tokens` gives with the same sampling and seed, whatever else is being served beside it: every
// sequence decodes in one batch of rows, and a row's logits never depend on the others (dropless
// routing; each GEMM element's sum runs in a fixed order, whatever the number of rows).
//
// Continuous batching: the model holds --max-batch rows; each choice of a request takes one.
// Each step, choices that arrived take the free rows (their prompts are prefilled), then every
// live row samples its next token and the rows still going decode it together; a finished choice's
// row is taken over by the last live one, so that the live rows stay first. Rank 0 listens and
// decides; each step it broadcasts what the step does (admissions, row moves, window slides, the
// tokens), and every rank runs the same passes. Connections are kept alive between whole answers
// (HTTP/1.1; see http_server.h). SIGINT or SIGTERM: no new requests (503), the live choices finish,
// those no row took are answered 503, then the server exits 0; so does --max-requests N once it
// has answered N requests. On exit, a JSON line of what was served.
#include <algorithm>
#include <array>
#include <csignal>
#include <cstdlib>
#include <ctime>
#include <nlohmann/json.hpp>

#include "apps/pipemoe/command.h"
#include "apps/pipemoe/prefix_store.h"
#include "apps/pipemoe/sampling.h"
#include "apps/pipemoe/serve_frontend.h"
#include "core/clock.h"
#include "core/error.h"
#include "core/log.h"

namespace pm::cli {
namespace {


std::atomic<bool> g_stop{false};
extern "C" void stop_serving(int) { g_stop = true; }

// The last n tokens of a sequence (all of them when shorter).
std::vector<int32_t> last_tokens(const std::vector<int32_t>& text, int64_t n, int64_t drop_newest = 0) {
  const int64_t end = static_cast<int64_t>(text.size()) - drop_newest;
  const int64_t take = std::min<int64_t>(n, end);
  return std::vector<int32_t>(text.begin() + (end - take), text.begin() + end);
}

// What one step does, decided by rank 0 and run by every rank.
struct Step {
  bool stop = false;
  std::vector<std::pair<int64_t, std::vector<int32_t>>> admit;  // row, prompt window
  // per admission: -1, or the earlier row of this step whose cache it copies instead of running the
  // same prompt again (another choice, or a request with the same prompt: the same bits, one prefill)
  std::vector<int64_t> admit_copies;
  // per admission: the row whose cache holds the first positions of its prompt window and how many
  // (-1, 0: none); the admission's tokens are then the rest of the window (prefix_store.h)
  std::vector<std::pair<int64_t, int64_t>> admit_prefix;
  std::vector<std::array<int64_t, 3>> keep;                     // finished: row, store row, positions
  std::vector<std::pair<int64_t, int64_t>> moves;               // from, to
  int64_t rows = 0;                                             // live rows after the moves
  std::vector<std::pair<int64_t, std::vector<int32_t>>> slide;  // row, window before its new token
  std::vector<int32_t> next;                                    // each live row's new token
};

std::string encode(const Step& s) {
  return nlohmann::json{{"stop", s.stop},   {"admit", s.admit}, {"admit_copies", s.admit_copies},
                        {"admit_prefix", s.admit_prefix}, {"keep", s.keep}, {"moves", s.moves},
                        {"rows", s.rows},   {"slide", s.slide}, {"next", s.next}}
      .dump();
}

Step decode_step(const std::string& text) {
  const nlohmann::json j = nlohmann::json::parse(text);
  Step s;
  s.stop = j["stop"].get<bool>();
  j["admit"].get_to(s.admit);
  j["admit_copies"].get_to(s.admit_copies);
  j["admit_prefix"].get_to(s.admit_prefix);
  j["keep"].get_to(s.keep);
  j["moves"].get_to(s.moves);
  s.rows = j["rows"].get<int64_t>();
  j["slide"].get_to(s.slide);
  j["next"].get_to(s.next);
  return s;
}

// Runs a step's admissions: the prompts in as few passes as their order allows (one, unless a prompt
// copies from a row admitted in the same step, which must have run first: then a second pass, and so
// on), each pass GptModel::extend_many over all that can run; copies of a same-step row's prompt after
// it. done(row, copied_from, logits of the tokens run [n, V], n) per admission, in the order they
// finish (copied_from -1 unless copied).
template <typename Done>
void run_admissions(GptModel& model, const Step& s, int64_t first_row, int64_t V, Done done) {
  const std::size_t count = s.admit.size();
  std::vector<bool> finished(count, false);
  auto ready = [&](int64_t source) {  // rows before this step's are ready; this step's once finished
    return source < first_row || source >= first_row + static_cast<int64_t>(count) || finished[source - first_row];
  };
  for (std::size_t left = count; left > 0;) {
    const std::size_t before = left;
    std::vector<GptModel::ExtendSpan> spans;
    std::vector<std::size_t> in_pass;
    for (std::size_t i = 0; i < count; ++i) {
      if (finished[i]) continue;
      const auto& [row, tokens] = s.admit[i];
      if (const int64_t from = s.admit_copies[i]; from >= 0) {
        if (!ready(from)) continue;
        model.move_inference_row(from, row);
        done(row, from, nullptr, 0);
        finished[i] = true, --left;
        continue;
      }
      const auto [source, reused] = s.admit_prefix[i];
      if (reused > 0 && !ready(source)) continue;
      if (reused > 0) model.copy_inference_prefix(source, row, reused);
      spans.push_back({row, reused, tokens.data(), static_cast<int64_t>(tokens.size())});
      in_pass.push_back(i);
    }
    const float* logits = model.extend_many(spans);
    for (std::size_t j = 0; j < spans.size(); ++j) {
      done(spans[j].row, -1, logits, spans[j].n);
      logits += spans[j].n * V;
      finished[in_pass[j]] = true, --left;
    }
    PM_CHECK(left < before, "{} admissions wait on rows that never run", left);  // sources come first: never
  }
}

int run_serve(Context& ctx, const ServeOptions& given) {
  ServeOptions o = given;
  PM_REQUIRE(!o.checkpoint.empty(), "serve needs --checkpoint DIR");
  // the key from the environment where no flag gives one (a flag's value shows in `ps`)
  if (o.api_key.empty())
    if (const char* key = std::getenv("PIPEMOE_API_KEY")) o.api_key = key;
  PM_REQUIRE(o.max_batch >= 1 && o.max_batch <= 1024, "--max-batch must be 1 to 1024, got {}", o.max_batch);
  PM_REQUIRE(o.max_requests >= 0, "--max-requests must be 0 (no limit) or positive, got {}", o.max_requests);
  PM_REQUIRE(o.prefix_cache >= 0 && o.prefix_cache <= 4096, "--prefix-cache must be 0 to 4096 rows, got {}",
             o.prefix_cache);
  const int64_t store_rows = o.prefix_reuse ? o.prefix_cache : 0;
  InferenceModel loaded = load_inference_model(ctx, o.checkpoint, o.offload, o.dtype);
  GptModel& model = *loaded.model;
  const int64_t S = loaded.config.model.seq_len, V = loaded.config.model.vocab_size;
  model.start_inference(o.max_batch + store_rows);  // the store's rows after the decoded ones
  model.set_inference_rows(0);
  const auto& mc = loaded.config.model;
  const double row_mb = model.kv_cache_bytes_per_row() / 1e6;
  const int64_t kv_cache_bytes = model.kv_cache_bytes_per_row() * (o.max_batch + store_rows);
  if (ctx.rank() == 0) {
    log::info("serve: key/value cache {:.1f} MB: {} rows of {:.2f} MB ({} key/value heads of {}); the model in {}",
              kv_cache_bytes / 1e6, o.max_batch + store_rows, row_mb, mc.kv_heads_or_all(), mc.heads, mc.dtype);
    if (store_rows > 0)
      log::info("serve: {} of the rows kept for finished sequences' prefixes ({:.1f} MB)", store_rows, store_rows * row_mb);
  }

  // rank 0 listens (every rank learns whether it could)
  std::unique_ptr<ServeFrontend> front;
  std::string error;
  if (ctx.rank() == 0) {
    try {
      std::string name = o.checkpoint;
      while (name.size() > 1 && name.back() == '/') name.pop_back();
      front = std::make_unique<ServeFrontend>(o, loaded.tokenizer, name.substr(name.find_last_of('/') + 1), g_stop);
      front->set_kv_cache_bytes(kv_cache_bytes);
      front->set_dtype(mc.dtype);
    } catch (const Error& e) {
      error = e.what();
    }
  }
  agree_or_throw(ctx.comm, error);
  g_stop = false;
  std::signal(SIGINT, stop_serving);
  std::signal(SIGTERM, stop_serving);
  if (front) {
    std::printf("pipemoe serve: listening on http://%s:%d (POST /v1/completions, /v1/chat/completions; %d rows per batch, %d rank(s))\n",
                o.host.c_str(), front->port(), o.max_batch, ctx.world());
    std::fflush(stdout);
  }

  std::vector<Completion> live;  // rank 0: row r's completion
  PrefixStore cached(o.max_batch, store_rows);  // rank 0: the tokens each row's cache holds
  Stopwatch since_log;
  int64_t rows = 0;
  for (;;) {
    // 1. admissions: new completions take the free rows and run their prompts
    Step admit;
    if (front) {
      front->set_live(rows);
      front->take_requests(rows == 0 ? 0.2 : 0.0);
      admit.stop = front->done(rows);
      for (Completion& c : front->admit(admit.stop ? 0 : o.max_batch - rows)) {
        const int64_t row = rows + static_cast<int64_t>(admit.admit.size());
        // a prompt already run in this step (another choice, or another request with the same
        // text) is not run again: its row's cache is copied
        int64_t copy_from = -1;
        for (int64_t r = rows; r < row && copy_from < 0; ++r)
          if (admit.admit_copies[r - rows] < 0 && live[r].text == c.text) copy_from = r;
        std::vector<int32_t> window = last_tokens(c.text, S);
        // else the longest prefix of its window some row holds (not for a prompt to score: its
        // positions' logits come from running it whole)
        PrefixStore::Match prefix;
        if (copy_from < 0 && o.prefix_reuse && !(c.echo && c.logprobs)) prefix = cached.longest_prefix(window, row);
        cached.set_row(row, window);
        const int64_t run = copy_from >= 0 ? 0 : static_cast<int64_t>(window.size()) - prefix.length;
        admit.admit.push_back({row, std::vector<int32_t>(window.end() - run, window.end())});
        admit.admit_copies.push_back(copy_from);
        admit.admit_prefix.push_back({prefix.row, prefix.length});
        front->count_prompt(copy_from >= 0, run, prefix.length);
        // OpenAI's usage.prompt_tokens_details.cached_tokens: each prompt once, by its first choice
        if (c.first_of_prompt) c.request->cached_tokens += static_cast<int64_t>(window.size()) - run;
        live.push_back(std::move(c));
      }
    }
    admit = decode_step(ctx.comm.broadcast_string(front ? encode(admit) : std::string(), 0));
    if (admit.stop) {
      if (front) front->turn_away_pending();
      break;
    }
    if (!admit.admit.empty()) model.set_inference_rows(rows + static_cast<int64_t>(admit.admit.size()));
    run_admissions(model, admit, rows, V, [&](int64_t row, int64_t from, const float* logits, int64_t n) {
      if (!front) return;
      if (from >= 0) {  // a copy of a row that ran the same prompt
        live[row].logits = live[from].logits;
        live[row].prompt_scores = live[from].prompt_scores;
        return;
      }
      live[row].logits.assign(logits + (n - 1) * V, logits + n * V);
      front->score_prompt(live[row], logits, n);  // a prompt to score ran whole (no prefix reused)
    });
    rows += static_cast<int64_t>(admit.admit.size());
    if (front) front->set_live(rows);
    if (rows == 0) continue;

    // 2. every live row's next token; the finished ones answered and their rows refilled
    Step step;
    if (front) {
      std::vector<Completion> kept;
      for (int64_t r = 0; r < rows; ++r) {
        Completion& c = live[r];
        const bool gone = front->gone(c), scored_only = !gone && c.max_tokens == 0;  // echo of a prompt, no tokens
        if (scored_only) c.finish = "length";
        const int32_t token = gone || scored_only ? 0 : sample_next(c.logits.data(), V, c.sampling, *c.rng, c.generated);
        if (gone || scored_only || front->advance(c, token)) {
          front->answer(c);
          // its keys and values kept for a prompt that starts as it does (before its row is reused)
          if (const int64_t to = cached.keep(r); to >= 0) step.keep.push_back({r, to, cached.positions_of(r)});
          continue;
        }
        const int64_t to = static_cast<int64_t>(kept.size());
        if (r != to) step.moves.push_back({r, to});
        // a full window slides to its last half (the new token then decodes into it), as generate's does
        if (model.position(r) >= S) step.slide.push_back({to, last_tokens(c.text, std::max<int64_t>(1, S / 2 - 1), 1)});
        step.next.push_back(token);
        kept.push_back(std::move(c));
      }
      live = std::move(kept);
      step.rows = static_cast<int64_t>(live.size());
    }
    step = decode_step(ctx.comm.broadcast_string(front ? encode(step) : std::string(), 0));
    for (const auto& [row, to, n] : step.keep) model.copy_inference_prefix(row, to, n);
    for (const auto& [from, to] : step.moves) {
      model.move_inference_row(from, to);
      if (front) cached.move(from, to);
    }
    model.set_inference_rows(step.rows);
    rows = step.rows;
    for (const auto& [row, tokens] : step.slide) {
      model.prefill(row, tokens.data(), static_cast<int64_t>(tokens.size()));
      if (front) cached.set_row(row, tokens);
    }
    if (front)
      for (int64_t r = 0; r < rows; ++r) cached.append(r, step.next[r]);
    if (rows > 0) {
      const float* logits = model.decode(step.next.data());
      if (front)
        for (int64_t r = 0; r < rows; ++r) live[r].logits.assign(logits + r * V, logits + (r + 1) * V);
    }
    if (front && since_log.elapsed_s() > 10) {
      log::info("serve: {}", dump(front->health(rows)));
      since_log = Stopwatch();
    }
  }
  std::signal(SIGINT, SIG_DFL);
  std::signal(SIGTERM, SIG_DFL);
  if (front) {
    nlohmann::json summary = {{"served", front->served()}, {"tokens", front->tokens()}, {"seconds", front->seconds()},
                              {"tokens_per_s", front->tokens() / std::max(1e-9, front->seconds())},
                              {"max_batch", o.max_batch}, {"peak_batch", front->peak_live()}, {"ranks", ctx.world()},
                              {"kv_cache_bytes", kv_cache_bytes}, {"dtype", mc.dtype}};
    summary.update(front->prompt_counters());
    std::printf("%s\n", summary.dump().c_str());
    std::fflush(stdout);
  }
  return 0;
}

}  // namespace

void add_serve_command(CLI::App& app, CommandFn& run) {
  auto o = std::make_shared<ServeOptions>();
  CLI::App* cmd = app.add_subcommand("serve", "serve completions from a checkpoint over HTTP (continuous batching)");
  cmd->add_option("--checkpoint", o->checkpoint, "checkpoint folder (pipemoe train --save)");
  cmd->add_option("--host", o->host, "address to listen on (0.0.0.0: every interface)")->capture_default_str();
  cmd->add_option("--api-key", o->api_key, "require 'Authorization: Bearer KEY' on every request but /health "
                                          "(default: $PIPEMOE_API_KEY; none: no key)");
  cmd->add_option("--port", o->port, "port to listen on (0: any free one; the first line printed says which)")
      ->capture_default_str();
  cmd->add_option("--max-batch", o->max_batch, "sequences decoded together (rows of the batch)")->capture_default_str();
  cmd->add_option("--max-requests", o->max_requests, "exit after answering N requests (0: run until SIGINT/SIGTERM)")
      ->capture_default_str();
  cmd->add_option("--prefix-cache", o->prefix_cache,
                  "rows kept for finished sequences' keys and values: a prompt that starts as one of them (or as a "
                  "sequence being decoded) runs only its new tokens")
      ->capture_default_str();
  cmd->add_flag("--no-prefix-reuse{false}", o->prefix_reuse, "run every prompt whole (no prefix copied from a row)");
  o->offload.add_to(cmd);
  add_inference_dtype_option(cmd, o->dtype);
  cmd->callback([o, &run] { run = [o](Context& ctx) { return run_serve(ctx, *o); }; });
}

}  // namespace pm::cli
