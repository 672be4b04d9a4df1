// OpenAI's completions and chat completions APIs as `pipemoe serve` speaks them: a request's
// fields read and checked into a Completion, and the answers' JSON forms (whole, streamed pieces,
// log-probabilities). No sockets and no model here: serve_frontend.cpp and cmd_serve.cpp do those.
#pragma once

#include <cstdint>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "apps/pipemoe/sampling.h"
#include "core/rng.h"
#include "model/tokenizer.h"

namespace pm::cli {

constexpr int kMaxTokensLimit = 8192;
constexpr int kDefaultMaxTokens = 64;
constexpr int kMaxChoices = 16;             // n
constexpr int kMaxChoicesPerRequest = 256;  // prompts x n

// What the n choices of one request share: its connection, and what is answered so far. The
// request is answered (and counted as served) when its last choice finishes.
struct Request {
  int fd = -1;
  bool keep_alive = false;        // after the whole answer the connection takes the next request
  int choices_total = 1;          // over the request's prompts: n per prompt
  int finished = 0;               // choices done
  int64_t prompt_tokens = 0;      // over the request's prompts
  int64_t cached_tokens = 0;      // of those, the positions taken from a row's cache instead of run
  bool stream = false;
  bool usage_chunk = false;       // stream_options.include_usage: a last chunk of no choices, the usage
  bool started = false;           // a stream's headers are sent (when its first choice took a row)
  bool gone = false;              // the client left (closed its stream or connection): the choices end at once
  int64_t completion_tokens = 0;  // over the finished choices
  double arrived_s = 0;           // on the frontend's clock: for /metrics' latencies
  bool first_token = false;       // a choice has generated a token
  std::vector<nlohmann::json> choices;  // the finished choices' whole forms (not streamed)
};

// One choice of a completion, in a row of the batch (rank 0).
struct Completion {
  std::shared_ptr<Request> request;
  int index = 0;                  // which of the request's choices
  bool first_of_prompt = true;    // choice 0 of its prompt (each prompt's usage is counted once)
  std::string id;
  bool chat = false;            // asked by /v1/chat/completions: answered in its form
  int max_tokens = kDefaultMaxTokens;
  Sampling sampling;
  uint64_t seed = 1;
  bool stream = false;
  std::vector<std::string> stop;
  std::vector<int32_t> text;  // prompt and generated tokens: the source of window slides
  int64_t prompt_tokens = 0;
  std::vector<int32_t> generated;
  std::string output;           // the generated text so far (cut at a stop string)
  std::size_t streamed = 0;     // bytes of output sent as events
  std::optional<Rng> rng;
  std::vector<float> logits;    // the last position's, to sample the next token from
  std::string finish;           // "length", "stop", or "gone" (the client closed the stream)
  bool role_sent = false;       // a streamed chat: its first delta named the role
  // log-probabilities: asked for (and how many alternatives per token), the prompt's (echo) and
  // the generated tokens'
  bool logprobs = false, echo = false;
  int top_logprobs = 0;
  struct Scored {
    int32_t token;
    std::optional<double> logprob;  // none: a prompt token with nothing before it in the window
    std::vector<std::pair<int32_t, double>> top;
  };
  std::vector<Scored> prompt_scores, scores;
  std::size_t scores_sent = 0, scored_bytes = 0;  // streamed: the scores sent and the bytes of their text
};

// A chat's messages as one prompt (see chat_prompt in openai_api.cpp for the template).
std::string chat_prompt(const nlohmann::json& messages);
// A completion request's fields, checked, as its choices: n per prompt, prompt p's choice i at
// index p * n + i, which samples with sequence_rng(seed, index) as `generate` samples that row of
// the prompts each given n times; they share one Request whose fd the caller sets. Throws a usage
// error naming the field. `chat`: the chat API's request (messages instead
// of a prompt).
std::vector<Completion> parse_completion(const std::string& body, const Tokenizer& tokenizer, const std::string& id, bool chat);
// JSON text with invalid UTF-8 (a young model writes any bytes) replaced.
std::string dump(const nlohmann::json& j);

// The answers' forms for a completion, in its API's shape.
class AnswerForms {
 public:
  AnswerForms(const Tokenizer& tokenizer, std::string model_name)
      : tokenizer_(tokenizer), model_name_(std::move(model_name)) {}
  // A streamed piece of text, the output's next bytes after c.streamed (a chat's first one names
  // the role), with the log-probabilities of the tokens whose text it completes (asked for);
  // finish: null or the reason (the last piece: the tokens whose text starts in it).
  nlohmann::json piece(Completion& c, const std::string& text, const nlohmann::json& finish) const;
  // The whole answer, with the log-probabilities and echo asked for.
  nlohmann::json whole(const Completion& c) const;
  // A stream's closing chunk: no choices (the caller adds the usage).
  nlohmann::json no_choices(const Completion& c) const;

 private:
  nlohmann::json answer_json(const Completion& c, const char* object, nlohmann::json choice) const;
  std::vector<Completion::Scored> answered(const Completion& c) const;
  std::vector<Completion::Scored> echoed_and_answered(const Completion& c) const;
  std::vector<Completion::Scored> scores_to_stream(Completion& c, std::size_t bytes, bool last) const;
  nlohmann::json completion_logprobs(const std::vector<Completion::Scored>& scored, std::size_t offset) const;
  nlohmann::json chat_logprobs(const std::vector<Completion::Scored>& scored) const;

  const Tokenizer& tokenizer_;
  std::string model_name_;
};

}  // namespace pm::cli
