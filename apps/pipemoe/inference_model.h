// The model of a checkpoint, loaded for inference on every rank: what `generate` and `serve`
// share. Its experts are spread over the ranks of this run (all-to-all), whatever layout trained
// them (the checkpoint holds whole tensors); routing is dropless once inference starts.
#pragma once

#include <memory>
#include <string>

#include "model/gpt.h"
#include "model/tokenizer.h"
#include "model/train_config.h"
#include "sched/executor.h"

namespace CLI {
class App;  // CLI11's (apps/pipemoe/command.h): not included here, which keeps its 7 s of compiling
}           // out of the files that only use the model (serve_frontend.cpp)

namespace pm::cli {

struct Context;  // command.h

// --offload-experts host|disk --expert-cache N --offload-mode MODE (moe/expert_store.h).
struct OffloadOptions {
  std::string place;  // "", host, disk
  int expert_cache = 0;
  std::string mode = "prefetch";
  void add_to(CLI::App* cmd);
};

struct InferenceModel {
  TrainConfig config;
  Tokenizer tokenizer;
  std::unique_ptr<Executor> executor;
  std::unique_ptr<GptModel> model;
};

// --dtype fp32|bf16: the precision the checkpoint's model runs in (default "": the one it was
// trained in). The weights are fp32 masters either way; bf16 rounds the GEMMs' operands (fp32
// accumulation), which on a CPU with AVX512_BF16 runs its bf16 kernels.
void add_inference_dtype_option(CLI::App* cmd, std::string& dtype);

// Reads `checkpoint` (collective); usage errors name what is wrong with it. dtype: as above.
InferenceModel load_inference_model(Context& ctx, const std::string& checkpoint, const OffloadOptions& offload,
                                    const std::string& dtype = "");

}  // namespace pm::cli
