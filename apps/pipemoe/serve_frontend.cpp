#include "apps/pipemoe/serve_frontend.h"

#include <algorithm>
#include <optional>
#include <set>

#include "apps/pipemoe/sampling.h"
#include "core/error.h"

namespace pm::cli {

void ServeFrontend::take_requests(double wait_s) {
  for (std::optional<HttpRequest> r = server_.next(pending_.empty() ? wait_s : 0); r; r = server_.next(0))
    handle(std::move(*r));
}

std::vector<Completion> ServeFrontend::admit(int64_t free) {
  std::vector<Completion> admitted;
  while (free > 0 && !pending_.empty()) {
    Completion c = std::move(pending_.front());
    pending_.pop_front();
    Request& q = *c.request;
    if (q.stream && !q.started && !q.gone) {
      q.started = true;
      q.gone = !HttpServer::start_events(q.fd);
    }
    if (gone(c)) {  // its client left while it waited
      answer(c);
      continue;
    }
    admitted.push_back(std::move(c));
    --free;
  }
  return admitted;
}

void ServeFrontend::turn_away_pending() {
  std::set<const Request*> answered;
  for (const Completion& c : pending_) {
    const Request& q = *c.request;
    if (!answered.insert(&q).second || q.gone) continue;
    if (q.started) HttpServer::close_connection(q.fd);
    else HttpServer::respond(q.fd, 503, HttpServer::error_json("the server is shutting down"));
  }
  pending_.clear();
}

bool ServeFrontend::done(int64_t live) const {
  const bool all_answered = o_.max_requests > 0 && served_ >= o_.max_requests;
  return live == 0 && (stop_ || all_answered);
}

bool ServeFrontend::advance(Completion& c, int32_t token) {
  if (c.logprobs) {
    TokenLogprobs t = token_logprobs(c.logits.data(), static_cast<int64_t>(c.logits.size()), token, c.top_logprobs);
    c.scores.push_back({token, t.logprob, std::move(t.top)});
  }
  c.text.push_back(token);
  c.generated.push_back(token);
  ++tokens_;
  if (!c.request->first_token) {
    c.request->first_token = true;
    first_token_s_.observe(clock_.elapsed_s() - c.request->arrived_s);
  }
  c.output = tokenizer_.decode(c.generated);
  std::size_t longest_stop = 0;
  for (const std::string& s : c.stop) {
    longest_stop = std::max(longest_stop, s.size());
    if (const std::size_t at = c.output.find(s); at != std::string::npos) {
      c.output.resize(at);
      c.finish = "stop";
    }
  }
  if (c.finish.empty() && static_cast<int>(c.generated.size()) >= c.max_tokens) c.finish = "length";
  // stream what no stop string can still take back
  std::size_t safe = c.finish.empty() && longest_stop > 0 ? c.output.size() - std::min(c.output.size(), longest_stop - 1)
                                                          : c.output.size();
  // nor split a character: a UTF-8 sequence goes out whole (its continuation bytes are 10xxxxxx)
  while (c.finish.empty() && safe > c.streamed && safe < c.output.size() &&
         (static_cast<unsigned char>(c.output[safe]) & 0xC0) == 0x80)
    --safe;
  if (c.finish.empty() && safe == c.output.size()) {  // the last character may still be incomplete
    std::size_t lead = safe;
    while (lead > c.streamed && (static_cast<unsigned char>(c.output[lead - 1]) & 0xC0) == 0x80) --lead;
    if (lead > c.streamed) {
      const unsigned char first = static_cast<unsigned char>(c.output[lead - 1]);
      const std::size_t need = first >= 0xF0 ? 4 : first >= 0xE0 ? 3 : first >= 0xC0 ? 2 : 1;
      if (safe - (lead - 1) < need) safe = lead - 1;
    }
  }
  if (c.stream && !c.request->gone && safe > c.streamed) {
    if (!HttpServer::send_event(c.request->fd, dump(forms_.piece(c, c.output.substr(c.streamed, safe - c.streamed), nullptr))))
      c.request->gone = true;
    c.streamed = safe;
  }
  return gone(c) || !c.finish.empty();
}

bool ServeFrontend::gone(Completion& c) const {
  // a stream finds out when a piece cannot be written; a whole answer's client is asked (a client
  // that timed out and left would otherwise hold its row for all of max_tokens)
  Request& q = *c.request;
  if (!q.gone && !q.stream && HttpServer::peer_closed(q.fd)) q.gone = true;
  if (c.request->gone) c.finish = "gone";
  return c.request->gone;
}

void ServeFrontend::score_prompt(Completion& c, const float* window_logits, int64_t n) const {
  if (!c.echo || !c.logprobs) return;
  const int64_t V = static_cast<int64_t>(c.logits.size()), before = c.prompt_tokens - n;
  for (int64_t i = 0; i < c.prompt_tokens; ++i) {
    const int32_t token = c.text[i];
    if (i - before < 1) {
      c.prompt_scores.push_back({token, std::nullopt, {}});
      continue;
    }
    TokenLogprobs t = token_logprobs(window_logits + (i - before - 1) * V, V, token, c.top_logprobs);
    c.prompt_scores.push_back({token, t.logprob, std::move(t.top)});
  }
}

void ServeFrontend::answer(Completion& c) {
  Request& q = *c.request;
  ++q.finished;
  q.completion_tokens += static_cast<int64_t>(c.generated.size());
  const bool last = q.finished == q.choices_total;
  served_ += last;
  if (last && !q.gone) request_s_.observe(clock_.elapsed_s() - q.arrived_s);
  if (q.gone) {
    if (last) HttpServer::close_connection(q.fd);
    return;
  }
  const nlohmann::json usage = {{"prompt_tokens", q.prompt_tokens},
                                {"prompt_tokens_details", {{"cached_tokens", q.cached_tokens}}},
                                {"completion_tokens", q.completion_tokens},
                                {"total_tokens", q.prompt_tokens + q.completion_tokens}};
  if (q.stream) {
    nlohmann::json piece = forms_.piece(c, c.output.substr(std::min(c.streamed, c.output.size())), c.finish);
    if (last) piece["usage"] = usage;
    q.gone = !HttpServer::send_event(q.fd, dump(piece));
    if (last) {
      if (q.usage_chunk) {
        nlohmann::json chunk = forms_.no_choices(c);
        chunk["usage"] = usage;
        HttpServer::send_event(q.fd, dump(chunk));
      }
      HttpServer::send_event(q.fd, "[DONE]");
      HttpServer::close_connection(q.fd);
    }
    return;
  }
  nlohmann::json j = forms_.whole(c);
  q.choices.push_back(j["choices"][0]);
  if (!last) return;
  std::sort(q.choices.begin(), q.choices.end(), [](const auto& a, const auto& b) { return a["index"] < b["index"]; });
  j["choices"] = q.choices;
  j["usage"] = usage;
  server_.answer(q.fd, q.keep_alive, 200, dump(j));
}

nlohmann::json ServeFrontend::health(int64_t live) const {
  nlohmann::json h = {{"status", stop_ ? "stopping" : "ok"}, {"active", live},
                      {"waiting", static_cast<int64_t>(pending_.size())}, {"served", served_}, {"tokens", tokens_},
                      {"tokens_per_s", tokens_ / std::max(1e-9, clock_.elapsed_s())}, {"max_batch", o_.max_batch},
                      {"peak_batch", peak_live_}, {"kv_cache_bytes", kv_cache_bytes_}, {"dtype", dtype_}};
  h.update(prompt_counters());
  return h;
}

std::string ServeFrontend::metrics() const {
  auto counter = [](const char* name, const char* help, double v) { return MetricValue{name, help, "counter", v}; };
  auto gauge = [](const char* name, const char* help, double v) { return MetricValue{name, help, "gauge", v}; };
  const std::vector<MetricValue> values = {
      counter("pipemoe_requests_accepted_total", "Requests read and queued.", accepted_),
      counter("pipemoe_requests_served_total", "Requests answered whole (every choice finished).", served_),
      counter("pipemoe_generated_tokens_total", "Tokens generated, over all choices.", tokens_),
      counter("pipemoe_prompts_run_total", "Prompts run for a row (whole, or after a cached prefix).", prompts_run_),
      counter("pipemoe_prompts_shared_total", "Prompts copied from a row that ran the same one in that step.",
              prompts_shared_),
      counter("pipemoe_prompt_tokens_run_total", "Prompt tokens run through the model.", prompt_tokens_run_),
      counter("pipemoe_prefix_hits_total", "Prompts started from a prefix some row's cache held.", prefix_hits_),
      counter("pipemoe_prefix_tokens_reused_total", "Prompt positions copied from a cached prefix instead of run.",
              prefix_tokens_reused_),
      gauge("pipemoe_active_rows", "Rows of the batch decoding now.", live_),
      gauge("pipemoe_waiting_choices", "Choices waiting for a row.", pending_.size()),
      gauge("pipemoe_max_batch", "Rows of the batch (--max-batch).", o_.max_batch),
      gauge("pipemoe_peak_batch", "The most rows decoded together so far.", peak_live_),
      gauge("pipemoe_kv_cache_bytes", "The key/value cache's bytes (every row, the prefix store's too).",
            static_cast<double>(kv_cache_bytes_)),
      gauge("pipemoe_uptime_seconds", "Seconds since the server started.", clock_.elapsed_s())};
  return metrics_exposition(values, first_token_s_, request_s_);
}

void ServeFrontend::count_prompt(bool shared, int64_t ran, int64_t reused) {
  if (shared) {
    ++prompts_shared_;
    return;
  }
  ++prompts_run_;
  prompt_tokens_run_ += ran;
  prefix_hits_ += reused > 0;
  prefix_tokens_reused_ += reused;
}

nlohmann::json ServeFrontend::prompt_counters() const {
  return {{"prompts_run", prompts_run_},
          {"prompts_shared", prompts_shared_},
          {"prompt_tokens_run", prompt_tokens_run_},
          {"prefix_hits", prefix_hits_},
          {"prefix_tokens_reused", prefix_tokens_reused_}};
}

void ServeFrontend::set_live(int64_t live) {
  live_ = live;
  peak_live_ = std::max(peak_live_, live);
}

bool ServeFrontend::authorized(const HttpRequest& r) const {
  if (o_.api_key.empty()) return true;
  const std::string expected = "Bearer " + o_.api_key;
  unsigned char differ = r.authorization.size() != expected.size();
  for (std::size_t i = 0; i < expected.size(); ++i)
    differ |= static_cast<unsigned char>(i < r.authorization.size() ? r.authorization[i] ^ expected[i] : 1);
  return differ == 0;
}

void ServeFrontend::handle(HttpRequest r) {
  auto respond = [&](int status, const std::string& body) { server_.answer(r.fd, r.keep_alive, status, body); };
  if (r.path == "/health" && r.method == "GET") return respond(200, dump(health(live_)));
  if (r.path == "/metrics" && r.method == "GET")
    return server_.answer(r.fd, r.keep_alive, 200, metrics(), "text/plain; version=0.0.4; charset=utf-8");
  if (!authorized(r)) return respond(401, HttpServer::error_json("this server needs its API key: Authorization: Bearer <key>"));
  if (r.path == "/v1/models" && r.method == "GET")
    return respond(200, dump({{"object", "list"}, {"data", {{{"id", model_name_}, {"object", "model"}, {"owned_by", "pipemoe"}}}}}));
  const bool chat = r.path == "/v1/chat/completions";
  if (r.path != "/v1/completions" && !chat) return respond(404, HttpServer::error_json("no such path: " + r.path));
  if (r.method != "POST") return respond(405, HttpServer::error_json(r.path + " takes POST"));
  if (stop_ || (o_.max_requests > 0 && accepted_ >= o_.max_requests))
    return respond(503, HttpServer::error_json("the server is shutting down"));
  try {
    std::vector<Completion> choices =
        parse_completion(r.body, tokenizer_, (chat ? "chatcmpl-" : "cmpl-") + std::to_string(next_id_++), chat);
    choices.front().request->fd = r.fd;
    choices.front().request->arrived_s = clock_.elapsed_s();
    choices.front().request->keep_alive = r.keep_alive;
    ++accepted_;
    for (Completion& c : choices) pending_.push_back(std::move(c));
  } catch (const Error& e) {
    respond(400, HttpServer::error_json(e.what()));
  }
}

}  // namespace pm::cli
