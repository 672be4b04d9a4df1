// pipemoe eval: how well a checkpoint predicts a text: loss per token, perplexity, bits per byte.
//
//   build/pipemoe eval --checkpoint runs/demo --data data/brown [--split validation|train|all]
//       [--stride S] [--batch 8] [--max-windows N] [--json] [--dump DIR] [--offload-experts ...]
//   mpirun -q -np 2 build/pipemoe eval ...       (the experts spread, the windows shared out)
//
// The text (a Brown corpus folder or a plain-text file, split as `train` splits it: --split
// validation is the part a run held out) is tokenized with the checkpoint's tokenizer and cut into
// windows of the model's seq_len: window k starts at token k * stride and predicts each next token;
// with a stride below seq_len (sliding windows) a window scores only its last `stride` positions
// (the first window all of them), so every token is scored once, each with at least seq_len -
// stride tokens before it. Routing is dropless, as in generate and serve: a window's losses never
// depend on the windows beside it, so the figures are the same bits on any number of ranks and any
// --batch (rank 0 adds the windows up in order). Losses are computed in double from the logits.
#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "apps/pipemoe/command.h"
#include "apps/pipemoe/inference_model.h"
#include "core/clock.h"
#include "core/error.h"
#include "core/log.h"
#include "core/npy.h"
#include "model/dataset.h"

namespace pm::cli {
namespace {

struct EvalOptions {
  std::string checkpoint, data, split = "validation", dump;
  int64_t stride = 0;  // 0: seq_len (windows side by side)
  int64_t batch = 8;
  int64_t max_windows = 0;  // 0: all
  bool json = false;
  OffloadOptions offload;
};

// The windows over `tokens`: their first tokens, and from which position each is scored.
struct Windows {
  std::vector<int64_t> start, scored_from;
};
Windows cut_windows(int64_t tokens, int64_t S, int64_t stride, int64_t max_windows) {
  Windows w;
  for (int64_t at = 0; at + S + 1 <= tokens; at += stride) {
    if (max_windows > 0 && static_cast<int64_t>(w.start.size()) >= max_windows) break;
    w.start.push_back(at);
    w.scored_from.push_back(at == 0 ? 0 : S - stride);
  }
  return w;
}

// -log p(target) at every position of a window: log-sum-exp of the logits minus the target's.
void window_losses(const float* logits, const int32_t* targets, int64_t S, int64_t V, double* out) {
  for (int64_t i = 0; i < S; ++i) {
    const float* row = logits + i * V;
    const double most = *std::max_element(row, row + V);
    double sum = 0;
    for (int64_t v = 0; v < V; ++v) sum += std::exp(static_cast<double>(row[v]) - most);
    out[i] = most + std::log(sum) - row[targets[i]];
  }
}

int run_eval(Context& ctx, const EvalOptions& o) {
  PM_REQUIRE(!o.checkpoint.empty(), "eval needs --checkpoint DIR");
  PM_REQUIRE(!o.data.empty(), "eval needs --data (a Brown corpus folder or a plain-text file)");
  PM_REQUIRE(o.split == "validation" || o.split == "train" || o.split == "all",
             "--split must be validation, train or all, got '{}'", o.split);
  PM_REQUIRE(o.batch >= 1 && o.batch <= 4096, "--batch must be 1 to 4096, got {}", o.batch);
  PM_REQUIRE(o.max_windows >= 0, "--max-windows must be 0 (all) or positive, got {}", o.max_windows);
  InferenceModel loaded = load_inference_model(ctx, o.checkpoint, o.offload);
  GptModel& model = *loaded.model;
  const int64_t S = loaded.config.model.seq_len, V = loaded.config.model.vocab_size;
  const int64_t stride = o.stride == 0 ? S : o.stride;
  PM_REQUIRE(stride >= 1 && stride <= S, "--stride must be 1 to the model's seq_len {}, got {}", S, o.stride);

  // the text, tokenized on rank 0 and sent to all
  std::string error, description;
  std::vector<int32_t> tokens;
  if (ctx.rank() == 0) {
    try {
      TextSplits text = read_text_splits(o.data, &description);
      const std::string& part = o.split == "train" ? text.train : o.split == "validation" ? text.validation : "";
      tokens = loaded.tokenizer.encode(o.split == "all" ? text.train + text.validation : part);
      PM_REQUIRE(static_cast<int64_t>(tokens.size()) >= S + 1, "the {} split of {} has {} tokens: a window needs {}",
                 o.split, o.data, tokens.size(), S + 1);
    } catch (const Error& e) {
      error = e.what();
    }
  }
  agree_or_throw(ctx.comm, error);
  int64_t count = static_cast<int64_t>(tokens.size());
  ctx.comm.broadcast(&count, 1, DType::i64, 0);
  tokens.resize(count);
  ctx.comm.broadcast(tokens.data(), count, DType::i32, 0);
  const Windows windows = cut_windows(count, S, stride, o.max_windows);
  const int64_t W = static_cast<int64_t>(windows.start.size());

  // window k runs on rank k mod world; every rank runs the same number of batches (a rank short of
  // windows fills its batch with window 0 again, and drops those losses)
  model.start_inference(1);
  const int64_t world = ctx.world(), mine = (W - ctx.rank() + world - 1) / world;
  const int64_t passes = (W + world * o.batch - 1) / (world * o.batch);
  std::vector<int32_t> in(o.batch * S), tg(o.batch * S);
  std::vector<double> losses(o.batch * S);
  nlohmann::json my_windows = nlohmann::json::array();  // [window, loss sum, scored tokens]
  Stopwatch watch, since_log;
  for (int64_t pass = 0; pass < passes; ++pass) {
    if (since_log.elapsed_s() > 10) {  // long evaluations say how far they are
      log::info("eval: {} of {} windows ({:.0f} tokens/s)", std::min(W, pass * o.batch * world), W,
                static_cast<double>(pass * o.batch * world * S) / watch.elapsed_s());
      since_log = Stopwatch();
    }
    std::vector<int64_t> ids;
    for (int64_t b = 0; b < o.batch; ++b) {
      const int64_t local = pass * o.batch + b, k = local < mine ? local * world + ctx.rank() : -1;
      ids.push_back(k);
      const int64_t at = windows.start[std::max<int64_t>(k, 0)];
      std::copy_n(tokens.data() + at, S, in.data() + b * S);
      std::copy_n(tokens.data() + at + 1, S, tg.data() + b * S);
    }
    model.forward(in.data(), nullptr, o.batch, 0.0f);
    for (int64_t b = 0; b < o.batch; ++b) {
      if (ids[b] < 0) continue;
      window_losses(model.logits() + b * S * V, tg.data() + b * S, S, V, losses.data() + b * S);
      const int64_t from = windows.scored_from[ids[b]];
      double sum = 0;
      for (int64_t i = from; i < S; ++i) sum += losses[b * S + i];
      my_windows.push_back({ids[b], sum, S - from});
    }
  }
  const double seconds = watch.elapsed_s();

  // rank 0 adds the windows up in window order: the same sum whatever the ranks and batch
  std::vector<std::string> parts = ctx.comm.gather_strings(my_windows.dump(), 0);
  if (ctx.rank() != 0) return 0;
  std::vector<double> window_loss(W);
  std::vector<int64_t> window_tokens(W);
  for (const std::string& part : parts)
    for (const auto& w : nlohmann::json::parse(part))
      window_loss[w[0].get<int64_t>()] = w[1].get<double>(), window_tokens[w[0].get<int64_t>()] = w[2].get<int64_t>();
  double loss = 0;
  int64_t scored = 0, bytes = 0;
  std::vector<int64_t> token_bytes(V);
  for (int64_t v = 0; v < V; ++v) token_bytes[v] = static_cast<int64_t>(loaded.tokenizer.decode({static_cast<int32_t>(v)}).size());
  for (int64_t k = 0; k < W; ++k) {
    loss += window_loss[k], scored += window_tokens[k];
    for (int64_t i = S - window_tokens[k]; i < S; ++i) bytes += token_bytes[tokens[windows.start[k] + 1 + i]];
  }
  const double per_token = loss / scored;
  nlohmann::json result = {{"checkpoint", o.checkpoint}, {"data", o.data}, {"split", o.split},
                           {"windows", W}, {"tokens", scored}, {"bytes", bytes}, {"seq_len", S}, {"stride", stride},
                           {"loss", per_token}, {"perplexity", std::exp(per_token)},
                           {"bits_per_byte", loss / std::log(2.0) / std::max<int64_t>(1, bytes)},
                           {"routing", "dropless"}, {"seconds", seconds},
                           {"tokens_per_s", static_cast<double>(W) * S / std::max(1e-9, seconds)}, {"ranks", ctx.world()}};
  if (!o.dump.empty()) {  // each window's tokens and loss sum: what the tests check against PyTorch
    std::filesystem::create_directories(o.dump);
    std::vector<int32_t> window_tokens_all(W * (S + 1));
    for (int64_t k = 0; k < W; ++k) std::copy_n(tokens.data() + windows.start[k], S + 1, window_tokens_all.data() + k * (S + 1));
    write_npy(o.dump + "/windows.npy", Tensor::view_of(window_tokens_all.data(), {W, S + 1}, DType::i32));
    nlohmann::json meta = result;
    meta["window_loss"] = window_loss;
    meta["window_tokens"] = window_tokens;
    std::ofstream(o.dump + "/eval.json") << meta.dump(1) << "\n";
  }
  if (o.json) {
    std::printf("%s\n", result.dump().c_str());
  } else {
    std::printf("%s, %s split: %ld tokens in %ld windows of %ld (stride %ld)\n", description.c_str(), o.split.c_str(),
                static_cast<long>(scored), static_cast<long>(W), static_cast<long>(S), static_cast<long>(stride));
    std::printf("loss %.4f nats/token, perplexity %.2f, %.4f bits/byte (dropless routing; %.1f tokens/s, %d rank(s))\n",
                per_token, std::exp(per_token), result["bits_per_byte"].get<double>(), result["tokens_per_s"].get<double>(),
                ctx.world());
  }
  return 0;
}

}  // namespace

void add_eval_command(CLI::App& app, CommandFn& run) {
  auto o = std::make_shared<EvalOptions>();
  CLI::App* cmd = app.add_subcommand("eval", "loss per token, perplexity and bits per byte of a checkpoint on a text");
  cmd->add_option("--checkpoint", o->checkpoint, "checkpoint folder (pipemoe train --save)");
  cmd->add_option("--data", o->data, "a Brown corpus folder or a plain-text file");
  cmd->add_option("--split", o->split, "validation (what train held out), train or all")->capture_default_str();
  cmd->add_option("--stride", o->stride, "tokens between windows (default: seq_len; less: sliding windows)");
  cmd->add_option("--batch", o->batch, "windows per pass on each rank")->capture_default_str();
  cmd->add_option("--max-windows", o->max_windows, "score at most N windows (0: all)")->capture_default_str();
  cmd->add_flag("--json", o->json, "print one JSON object");
  cmd->add_option("--dump", o->dump, "write each window's tokens and loss to DIR (for checks)");
  o->offload.add_to(cmd);
  cmd->callback([o, &run] { run = [o](Context& ctx) { return run_eval(ctx, *o); }; });
}

}  // namespace pm::cli
