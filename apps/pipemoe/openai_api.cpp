#include "apps/pipemoe/openai_api.h"

#include <algorithm>
#include <climits>
#include <cstdlib>
#include <ctime>

#include "core/error.h"

namespace pm::cli {

// A chat's messages as one prompt: "System: ...", "User: ...", "Assistant: ..." lines, each
// message on its own line, then "Assistant:" for the model to go on from. Content is a string or
// a list of text parts ({"type": "text", "text": ...}), as OpenAI's API allows.
std::string chat_prompt(const nlohmann::json& messages) {
  PM_REQUIRE(messages.is_array() && !messages.empty(), "messages must be a non-empty list");
  std::string prompt;
  for (const nlohmann::json& m : messages) {
    PM_REQUIRE(m.is_object() && m.contains("role") && m["role"].is_string(), "each message needs a role");
    const std::string role = m["role"].get<std::string>();
    PM_REQUIRE(role == "system" || role == "developer" || role == "user" || role == "assistant",
               "a message's role must be system, developer, user or assistant, got '{}'", role);
    PM_REQUIRE(m.contains("content"), "each message needs content");
    std::string content;
    const nlohmann::json& c = m["content"];
    if (c.is_string()) {
      content = c.get<std::string>();
    } else {
      PM_REQUIRE(c.is_array(), "a message's content must be a string or a list of text parts");
      for (const nlohmann::json& part : c) {
        PM_REQUIRE(part.is_object() && part.value("type", "") == "text" && part.contains("text") && part["text"].is_string(),
                   "a message's content parts must be text parts ({{\"type\": \"text\", \"text\": ...}})");
        content += part["text"].get<std::string>();
      }
    }
    const std::string name = role == "user" ? "User" : role == "assistant" ? "Assistant" : "System";
    prompt += name + ": " + content + "\n";
  }
  return prompt + "Assistant:";
}

// The completions API's prompt: a string, token ids, or a list of those (prompts side by side).
std::vector<std::vector<int32_t>> read_prompts(const nlohmann::json& p, const Tokenizer& tokenizer) {
  const auto ids = [](const nlohmann::json& x) {
    return x.is_array() && !x.empty() && std::all_of(x.begin(), x.end(), [](const auto& t) { return t.is_number_integer(); });
  };
  const bool several = p.is_array() && !p.empty() && std::all_of(p.begin(), p.end(), [&](const auto& x) {
                         return x.is_string() || ids(x);
                       });
  PM_REQUIRE(p.is_string() || ids(p) || several,
             "prompt must be a string, a list of token ids, or a list of those (one prompt each)");
  std::vector<std::vector<int32_t>> prompts;
  for (const nlohmann::json& one : several ? p : nlohmann::json::array({p})) {
    if (one.is_string()) {
      prompts.push_back(tokenizer.encode(one.get<std::string>()));
      continue;
    }
    prompts.emplace_back();
    for (const auto& t : one) {
      PM_REQUIRE(t.get<int64_t>() >= 0 && t.get<int64_t>() < tokenizer.vocab_size(),
                 "prompt token {} is outside the vocabulary (0 to {})", t.get<int64_t>(), tokenizer.vocab_size() - 1);
      prompts.back().push_back(t.get<int32_t>());
    }
  }
  return prompts;
}

// A completion request's fields, checked; throws a usage error naming the field.
std::vector<Completion> parse_completion(const std::string& body, const Tokenizer& tokenizer, const std::string& id, bool chat) {
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(body);
  } catch (const nlohmann::json::exception& e) {
    throw Error(ErrorKind::usage, std::string("the body is not JSON: ") + e.what());
  }
  PM_REQUIRE(j.is_object(), "the body must be a JSON object");
  Completion c;
  c.id = id;
  c.chat = chat;
  std::vector<std::vector<int32_t>> prompts;  // each prompt's tokens
  if (chat) {
    PM_REQUIRE(j.contains("messages"), "a chat completion needs messages");
    prompts.push_back(tokenizer.encode(chat_prompt(j["messages"])));
  } else {
    PM_REQUIRE(j.contains("prompt"), "a completion needs a prompt");
    prompts = read_prompts(j["prompt"], tokenizer);
  }
  auto number = [&](const char* key, auto& into) {
    if (!j.contains(key) || j[key].is_null()) return;
    PM_REQUIRE(j[key].is_number(), "{} must be a number", key);
    into = j[key].get<std::decay_t<decltype(into)>>();
  };
  number("max_tokens", c.max_tokens);
  if (chat) number("max_completion_tokens", c.max_tokens);  // the chat API's newer name
  PM_REQUIRE(c.max_tokens >= 0 && c.max_tokens <= kMaxTokensLimit, "max_tokens must be 1 to {} (0 with echo), got {}",
             kMaxTokensLimit, c.max_tokens);
  number("temperature", c.sampling.temperature);
  number("top_k", c.sampling.top_k);
  number("top_p", c.sampling.top_p);
  number("min_p", c.sampling.min_p);
  number("presence_penalty", c.sampling.presence_penalty);
  number("frequency_penalty", c.sampling.frequency_penalty);
  if (j.contains("logit_bias") && !j["logit_bias"].is_null()) {
    // {"token id": bias}, as OpenAI's API takes it
    PM_REQUIRE(j["logit_bias"].is_object(), "logit_bias must be an object of token ids and biases");
    for (const auto& [key, bias] : j["logit_bias"].items()) {
      char* end = nullptr;
      const long id = std::strtol(key.c_str(), &end, 10);
      PM_REQUIRE(!key.empty() && *end == '\0' && bias.is_number(), "logit_bias: '{}' must be a token id with a number", key);
      c.sampling.logit_bias.push_back({static_cast<int32_t>(std::clamp<long>(id, -1, INT32_MAX)), bias.get<double>()});
    }
  }
  check_sampling(c.sampling, /*json_names=*/true, tokenizer.vocab_size());
  if (j.contains("seed") && !j["seed"].is_null()) {
    PM_REQUIRE(j["seed"].is_number_unsigned(), "seed must be a whole number >= 0");
    c.seed = j["seed"].get<uint64_t>();
  }
  auto request = std::make_shared<Request>();
  int n = 1;  // choices per prompt
  if (j.contains("n") && !j["n"].is_null()) {
    PM_REQUIRE(j["n"].is_number_integer() && j["n"].get<int64_t>() >= 1 && j["n"].get<int64_t>() <= kMaxChoices,
               "n must be a whole number from 1 to {} (choices of the one prompt)", kMaxChoices);
    n = j["n"].get<int>();
  }
  if (j.contains("stream") && !j["stream"].is_null()) {
    PM_REQUIRE(j["stream"].is_boolean(), "stream must be true or false");
    c.stream = j["stream"].get<bool>();
  }
  if (j.contains("stream_options") && !j["stream_options"].is_null()) {
    const nlohmann::json& so = j["stream_options"];
    PM_REQUIRE(c.stream && so.is_object(), "stream_options needs stream: true and an object");
    if (so.contains("include_usage") && !so["include_usage"].is_null()) {
      PM_REQUIRE(so["include_usage"].is_boolean(), "stream_options.include_usage must be true or false");
      request->usage_chunk = so["include_usage"].get<bool>();
    }
  }
  // fields whose meaning this server cannot honour are refused rather than ignored: an answer
  // that silently differs from what was asked is worse than an error
  const auto given = [&](const char* key) { return j.contains(key) && !j[key].is_null(); };
  if (given("best_of"))
    PM_REQUIRE(j["best_of"].is_number_integer() && j["best_of"].get<int64_t>() == n,
               "best_of is not served (no ranking of extra samples): leave it out or equal to n");
  PM_REQUIRE(!given("suffix") || (j["suffix"].is_string() && j["suffix"].get<std::string>().empty()),
             "suffix is not served (no fill-in-the-middle): leave it out");
  for (const char* key : {"tools", "functions"})
    PM_REQUIRE(!given(key) || (j[key].is_array() && j[key].empty()),
               "{} are not served: the models trained here have no tool-call format", key);
  PM_REQUIRE(!given("response_format") || (j["response_format"].is_object() && j["response_format"].value("type", "") == "text"),
             "response_format: only {{\"type\": \"text\"}} is served (no constrained JSON output)");
  auto flag = [&](const char* key, bool& into) {
    if (!j.contains(key) || j[key].is_null()) return;
    PM_REQUIRE(j[key].is_boolean(), "{} must be true or false", key);
    into = j[key].get<bool>();
  };
  auto count = [&](const char* key, int most, int& into) {
    PM_REQUIRE(j[key].is_number_integer() && j[key].get<int64_t>() >= 0 && j[key].get<int64_t>() <= most,
               "{} must be a whole number from 0 to {}", key, most);
    into = j[key].get<int>();
  };
  if (chat) {
    flag("logprobs", c.logprobs);
    if (j.contains("top_logprobs") && !j["top_logprobs"].is_null()) {
      PM_REQUIRE(c.logprobs, "top_logprobs needs logprobs: true");
      count("top_logprobs", 20, c.top_logprobs);
    }
  } else {
    if (j.contains("logprobs") && !j["logprobs"].is_null()) {
      count("logprobs", 5, c.top_logprobs);
      c.logprobs = true;
    }
    flag("echo", c.echo);
  }
  PM_REQUIRE(!c.stream || !c.echo, "echo is not served with stream: ask without it");
  // max_tokens 0: the prompt scored, nothing generated (what scoring clients ask with echo)
  PM_REQUIRE(c.max_tokens > 0 || c.echo, "max_tokens must be 1 to {} (0 with echo), got 0", kMaxTokensLimit);
  if (j.contains("stop") && !j["stop"].is_null()) {
    const nlohmann::json& s = j["stop"];
    PM_REQUIRE(s.is_string() || s.is_array(), "stop must be a string or a list of strings");
    for (const auto& one : s.is_string() ? nlohmann::json::array({s}) : s) {
      PM_REQUIRE(one.is_string() && !one.get<std::string>().empty(), "stop must hold non-empty strings");
      c.stop.push_back(one.get<std::string>());
    }
    PM_REQUIRE(c.stop.size() <= 4, "stop takes at most 4 strings, got {}", c.stop.size());
  }
  PM_REQUIRE(static_cast<int64_t>(prompts.size()) * n <= kMaxChoicesPerRequest,
             "a request asks for at most {} choices (prompts x n), got {} x {}", kMaxChoicesPerRequest, prompts.size(), n);
  request->stream = c.stream;
  c.request = request;
  std::vector<Completion> choices;
  for (std::vector<int32_t>& text : prompts) {
    if (text.empty()) text = tokenizer.encode("\n");  // as generate does
    request->prompt_tokens += static_cast<int64_t>(text.size());
    for (int i = 0; i < n; ++i) {
      choices.push_back(c);
      Completion& choice = choices.back();
      choice.text = text;
      choice.prompt_tokens = static_cast<int64_t>(text.size());
      choice.index = static_cast<int>(choices.size()) - 1;
      choice.first_of_prompt = i == 0;
      choice.rng = sequence_rng(c.seed, choice.index);  // `generate --seed S` with this prompt in row `index`
    }
  }
  request->choices_total = static_cast<int>(choices.size());
  return choices;
}

std::string dump(const nlohmann::json& j) { return j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace); }

// One choice in the answer's form: the completions API's text, or the chat API's message (the
// whole answer) or delta (a streamed piece: the first one names the role).
nlohmann::json AnswerForms::answer_json(const Completion& c, const char* object, nlohmann::json choice) const {
  choice["index"] = c.index;
  if (!choice.contains("logprobs")) choice["logprobs"] = nullptr;
  return {{"id", c.id}, {"object", object}, {"created", static_cast<int64_t>(std::time(nullptr))},
          {"model", model_name_}, {"choices", nlohmann::json::array({choice})}};
}
nlohmann::json AnswerForms::piece(Completion& c, const std::string& text, const nlohmann::json& finish) const {
  nlohmann::json logprobs = nullptr;
  if (c.logprobs) {
    const std::size_t first = c.scored_bytes;
    const std::vector<Completion::Scored> scored = scores_to_stream(c, c.streamed + text.size(), !finish.is_null());
    logprobs = c.chat ? chat_logprobs(scored) : completion_logprobs(scored, first);
  }
  if (!c.chat) return answer_json(c, "text_completion", {{"text", text}, {"finish_reason", finish}, {"logprobs", logprobs}});
  nlohmann::json delta = {{"content", text}};
  if (!c.role_sent) delta["role"] = "assistant";
  c.role_sent = true;
  return answer_json(c, "chat.completion.chunk", {{"delta", delta}, {"finish_reason", finish}, {"logprobs", logprobs}});
}
nlohmann::json AnswerForms::whole(const Completion& c) const {
  const std::string prompt = c.echo ? tokenizer_.decode({c.text.begin(), c.text.begin() + c.prompt_tokens}) : "";
  if (!c.chat)
    return answer_json(c, "text_completion", {{"text", prompt + c.output}, {"finish_reason", c.finish},
                                              {"logprobs", c.logprobs ? completion_logprobs(echoed_and_answered(c), 0) : nullptr}});
  nlohmann::json j = answer_json(c, "chat.completion", {{"message", {{"role", "assistant"}, {"content", c.output}}},
                                                        {"finish_reason", c.finish}});
  if (c.logprobs) j["choices"][0]["logprobs"] = chat_logprobs(answered(c));
  return j;
}
nlohmann::json AnswerForms::no_choices(const Completion& c) const {
  nlohmann::json j = answer_json(c, c.chat ? "chat.completion.chunk" : "text_completion", nlohmann::json::object());
  j["choices"] = nlohmann::json::array();
  return j;
}
// The generated tokens that made the answer's text (a stop string cuts the rest off).
std::vector<Completion::Scored> AnswerForms::answered(const Completion& c) const {
  std::vector<Completion::Scored> kept;
  std::size_t offset = 0;
  for (const Completion::Scored& s : c.scores) {
    if (offset >= c.output.size()) break;
    offset += tokenizer_.decode({s.token}).size();
    kept.push_back(s);
  }
  return kept;
}
// A stream's next scores: the generated tokens not yet sent whose text ends within the output's
// first `bytes` (last: whose text starts there, as answered() counts them).
std::vector<Completion::Scored> AnswerForms::scores_to_stream(Completion& c, std::size_t bytes, bool last) const {
  std::vector<Completion::Scored> next;
  for (; c.scores_sent < c.scores.size(); ++c.scores_sent) {
    const std::size_t size = tokenizer_.decode({c.scores[c.scores_sent].token}).size();
    if (last ? c.scored_bytes >= bytes : c.scored_bytes + size > bytes) break;
    next.push_back(c.scores[c.scores_sent]);
    c.scored_bytes += size;
  }
  return next;
}
// The prompt's scores (echo) and the answer's.
std::vector<Completion::Scored> AnswerForms::echoed_and_answered(const Completion& c) const {
  std::vector<Completion::Scored> all = c.echo ? c.prompt_scores : std::vector<Completion::Scored>{};
  const std::vector<Completion::Scored> generated = answered(c);
  all.insert(all.end(), generated.begin(), generated.end());
  return all;
}
// The completions API's form: tokens, token_logprobs, top_logprobs ({token: logprob}) and each
// token's byte offset in the text (the first one's: offset).
nlohmann::json AnswerForms::completion_logprobs(const std::vector<Completion::Scored>& scored, std::size_t offset) const {
  nlohmann::json tokens = nlohmann::json::array(), lps = nlohmann::json::array(), tops = nlohmann::json::array(),
                 offsets = nlohmann::json::array();
  for (const Completion::Scored& s : scored) {
    const std::string piece = tokenizer_.decode({s.token});
    tokens.push_back(piece);
    lps.push_back(s.logprob ? nlohmann::json(*s.logprob) : nlohmann::json(nullptr));
    nlohmann::json top = nlohmann::json::object();
    for (const auto& [id, lp] : s.top) top[tokenizer_.decode({id})] = lp;
    tops.push_back(s.logprob ? top : nlohmann::json(nullptr));
    offsets.push_back(offset);
    offset += piece.size();
  }
  return {{"tokens", tokens}, {"token_logprobs", lps}, {"top_logprobs", tops}, {"text_offset", offsets}};
}
// The chat API's form: content [{token, logprob, bytes, top_logprobs [{token, logprob, bytes}]}].
nlohmann::json AnswerForms::chat_logprobs(const std::vector<Completion::Scored>& scored) const {
  auto entry = [&](int32_t id, double lp) {
    const std::string piece = tokenizer_.decode({id});
    std::vector<int> bytes;
    for (unsigned char b : piece) bytes.push_back(b);
    return nlohmann::json{{"token", piece}, {"logprob", lp}, {"bytes", bytes}};
  };
  nlohmann::json content = nlohmann::json::array();
  for (const Completion::Scored& s : scored) {
    nlohmann::json e = entry(s.token, *s.logprob);
    e["top_logprobs"] = nlohmann::json::array();
    for (const auto& [id, lp] : s.top) e["top_logprobs"].push_back(entry(id, lp));
    content.push_back(e);
  }
  return {{"content", content}};
}

}  // namespace pm::cli
