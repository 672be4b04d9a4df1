#include "apps/pipemoe/command.h"
#include "apps/pipemoe/inference_model.h"

#include <map>

#include "core/error.h"
#include "model/checkpoint.h"
#include "moe/expert_store.h"

namespace pm::cli {

void OffloadOptions::add_to(CLI::App* cmd) {
  cmd->add_option("--offload-experts", place, "keep routed experts in host memory or on disk (the checkpoint, mapped)")
      ->check(CLI::IsMember({"host", "disk"}));
  cmd->add_option("--expert-cache", expert_cache, "at most N routed experts of a layer resident (with --offload-experts)");
  cmd->add_option("--offload-mode", mode, "prefetch (on the copy lane), blocking (when needed) or resident")
      ->capture_default_str();
}

void add_inference_dtype_option(CLI::App* cmd, std::string& dtype) {
  cmd->add_option("--dtype", dtype,
                  "run the model in fp32 or bf16 (GEMMs on bf16 operands, fp32 accumulation; default: the dtype the "
                  "checkpoint was trained in)")
      ->check(CLI::IsMember({"fp32", "bf16"}));
}

InferenceModel load_inference_model(Context& ctx, const std::string& checkpoint, const OffloadOptions& offload,
                                    const std::string& dtype) {
  InferenceModel m;
  CheckpointState state = read_checkpoint_state(ctx.comm, checkpoint);
  TrainConfig& config = m.config;
  config.apply(state.config, checkpoint + "/state.json");
  m.tokenizer = Tokenizer::from_json(state.tokenizer_json, checkpoint + "/tokenizer.json");
  config.model.vocab_size = m.tokenizer.vocab_size();
  config.model.moe_strategy = "ep";
  config.model.tp = 1;
  config.dp = 0;
  config.pp = 1;  // every rank holds every block (a pp checkpoint holds whole tensors too)
  config.pipeline_split = "even";
  if (!dtype.empty()) config.model.dtype = dtype;
  // the order the checkpoint was trained in, so that eval gives training's bits (unless the command
  // line names one; a GPU sums in the dot order whatever the checkpoint's)
  if (!ctx.bf16_order_given && ctx.backend.device() == Device::cpu) apply_bf16_order(ctx, config.bf16_order);
  PM_REQUIRE(config.model.moe_layers() == 0 || config.model.experts % ctx.world() == 0,
             "the checkpoint's {} experts cannot be spread over {} ranks", config.model.experts, ctx.world());
  try {  // the model the checkpoint describes, checked as a training configuration is
    config.validate(ctx.world());
  } catch (const Error& e) {
    throw Error(ErrorKind::usage, fmt::format("{}: state.json describes an impossible model: {}", checkpoint, e.what()));
  }
  // One rank has no all-to-all to overlap: its lanes' tasks run in order on one thread, without the
  // hand-offs between lane threads that cost a decode step a fifth of its time (thread wake-ups).
  // Prefetching offloaded experts keeps its copy lane: that overlap is the point of it.
  const bool prefetch = !offload.place.empty() && parse_offload_mode(offload.mode) == OffloadMode::prefetch;
  m.executor = std::make_unique<Executor>(ctx.world() == 1 && !prefetch ? Executor::Mode::serial
                                                                        : Executor::Mode::overlapped);
  m.model = std::make_unique<GptModel>(config.model, ctx.comm, *m.executor, ctx.backend);
  if (!offload.place.empty()) {
    PM_REQUIRE(config.model.moe_layers() > 0, "--offload-experts: the checkpoint's model has no MoE layers");
    const OffloadMode mode = parse_offload_mode(offload.mode);
    PM_REQUIRE(mode == OffloadMode::resident || offload.expert_cache > 0,
               "--offload-experts needs --expert-cache N (how many of a layer's experts may be resident, 1 to {})",
               config.model.experts / ctx.world());
    m.model->offload_experts(offload.place, checkpoint_step_dir(checkpoint) + "/model.safetensors", offload.expert_cache,
                             mode);
  }
  // Each MoE layer packs its experts once their W1 and W2 are in and frees the fp32 values: the
  // load holds one layer's fp32 experts at a time beside the packed ones, where the first pass
  // packed them all after the whole model had been read in fp32 (docs/BENCHMARKS.md, "Experts
  // packed as they load").
  std::map<const Tensor*, MoeLayer*> expert_weights;
  std::map<MoeLayer*, int> arrived;
  for (MoeLayer* layer : m.model->moe_layers()) {
    layer->set_inference();
    for (const Parameter& p : layer->parameters())
      if (p.name == "w1" || p.name == "w2") expert_weights[p.value] = layer;
  }
  load_checkpoint_tensors(ctx.comm, checkpoint, m.model->parameters(), nullptr, 0, [&](const Parameter& p) {
    const auto it = expert_weights.find(p.value);
    if (it != expert_weights.end() && ++arrived[it->second] == 2) it->second->pack_for_inference();
  });
  return m;
}

}  // namespace pm::cli
