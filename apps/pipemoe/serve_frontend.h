// What rank 0 of `pipemoe serve` does besides the model: the HTTP side (requests read, checked
// and queued as choices waiting for a row; /health, /v1/models, the API key) and the choices in
// the rows (each new token appended, streamed, scored; a request answered when its last choice
// finishes). cmd_serve.cpp runs the batch and asks it what each step admits and answers.
#pragma once

#include <atomic>
#include <cstdint>
#include <deque>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "apps/pipemoe/http_server.h"
#include "apps/pipemoe/inference_model.h"
#include "apps/pipemoe/openai_api.h"
#include "apps/pipemoe/serve_metrics.h"
#include "core/clock.h"

namespace pm::cli {

struct ServeOptions {
  std::string checkpoint, host = "127.0.0.1";
  std::string api_key;  // non-empty: every request but /health needs "Authorization: Bearer <key>"
  int port = 8000;
  int max_batch = 8;
  int64_t max_requests = 0;  // 0: until a signal
  int prefix_cache = 16;     // rows kept aside for finished sequences' keys and values
  bool prefix_reuse = true;  // a prompt starts from the longest prefix some row's cache holds
  OffloadOptions offload;
  std::string dtype;  // --dtype: "" runs the checkpoint's
};

class ServeFrontend {
 public:
  ServeFrontend(const ServeOptions& o, const Tokenizer& tokenizer, std::string model_name, const std::atomic<bool>& stop)
      : o_(o), stop_(stop), tokenizer_(tokenizer), model_name_(std::move(model_name)), forms_(tokenizer, model_name_),
        server_(o.host, o.port) {}
  int port() const { return server_.port(); }

  // Takes what arrived (waiting up to wait_s if no completion waits for a row); answers all but
  // completions at once; the completions queue for a row.
  void take_requests(double wait_s);
  // Choices that may take a row now (at most `free` of them); the choices of a request whose client
  // left are answered without one.
  std::vector<Completion> admit(int64_t free);
  // On the way out (a signal): the requests with choices no row took are answered 503 (a stream
  // already started is closed).
  void turn_away_pending();
  // Whether to stop: nothing live, and a signal came or --max-requests are answered.
  bool done(int64_t live) const;

  // The next token of c is `token`: appended, its text streamed; says whether c is finished.
  bool advance(Completion& c, int32_t token);
  // Whether c's client has left (its stream could not be written, or it closed the connection a
  // whole answer was to go to): c ends without a token.
  bool gone(Completion& c) const;

  // echo with logprobs: the prompt's tokens scored from its prefill, whose logits [n, V] are those
  // of the window's positions (a prompt longer than the window: its first tokens have none).
  void score_prompt(Completion& c, const float* window_logits, int64_t n) const;

  // c is finished: its request answered once its last choice is (a stream: c's last piece now).
  void answer(Completion& c);

  // /health's answer, and /metrics' (Prometheus's text format).
  nlohmann::json health(int64_t live) const;
  std::string metrics() const;
  // The rows decoding now (for /health and the peak).
  void set_live(int64_t live);
  // The key/value cache's bytes (every row, the prefix store's too): for /health and /metrics.
  void set_kv_cache_bytes(int64_t bytes) { kv_cache_bytes_ = bytes; }
  void set_dtype(std::string dtype) { dtype_ = std::move(dtype); }  // the precision the model runs in (/health)
  int64_t peak_live() const { return peak_live_; }
  // A prompt admitted to a row: copied whole from a row that ran the same prompt in that step
  // (shared), or run: `ran` of its tokens, after `reused` positions copied from another row's cache.
  void count_prompt(bool shared, int64_t ran, int64_t reused);
  // prompts_run, prompts_shared, prompt_tokens_run, prefix_hits, prefix_tokens_reused (/health and
  // the summary line).
  nlohmann::json prompt_counters() const;
  int64_t served() const { return served_; }
  int64_t tokens() const { return tokens_; }
  double seconds() const { return clock_.elapsed_s(); }

 private:
  // Whether the request carries the API key (compared in time that does not depend on where it differs).
  bool authorized(const HttpRequest& r) const;
  void handle(HttpRequest r);

  const ServeOptions& o_;
  const std::atomic<bool>& stop_;  // a signal came: no new requests
  const Tokenizer& tokenizer_;
  std::string model_name_;
  AnswerForms forms_;
  HttpServer server_;
  std::deque<Completion> pending_;
  int64_t accepted_ = 0, served_ = 0, tokens_ = 0, next_id_ = 0, live_ = 0, peak_live_ = 0, kv_cache_bytes_ = 0;
  std::string dtype_;
  int64_t prompts_run_ = 0, prompts_shared_ = 0, prompt_tokens_run_ = 0, prefix_hits_ = 0, prefix_tokens_reused_ = 0;
  LatencyHistogram first_token_s_, request_s_;
  Stopwatch clock_;
};

}  // namespace pm::cli
